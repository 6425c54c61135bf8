"""Launching and stopping SGLang server and sglang-router processes from the training job.

Each server is `python -m sglang.launch_server` in its own process group (so that stopping it
also stops its scheduler and detokenizer children), bound to the configured host. The device
decides a few launch flags: DEVICE_PROFILES is the one place that knows them.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Mapping

import requests

__all__ = ["ServerSpec", "ManagedProcess", "SGLangServer", "SGLangRouter", "detect_device",
           "DEVICE_PROFILES", "wait_healthy", "server_environment"]


# What a launcher tells each trainer process about its own place in the job. A server (or any
# other single-process child: the router, the demo's input builder) is not a rank of that job,
# and some of these change what it does: with torchrun's TORCHELASTIC_USE_AGENT_STORE=True,
# torch.distributed in SGLang's scheduler joins its own tcp:// store as a client of a store that
# nobody serves ("Init parallel begin", then nothing); an inherited MASTER_ADDR/MASTER_PORT
# names SGLang's CPU shared-memory all-reduce segments, so co-located servers would collide.
_LAUNCHER_VARS = frozenset({
    # torch.distributed / torchrun (torch.distributed.elastic.agent.server.local_elastic_agent)
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
    # Slurm, per task of a step (srun); job-level ones (SLURM_JOB_*, SLURM_NODELIST, ...) stay
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_GTIDS",
    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEPID", "SLURM_SRUN_COMM_HOST",
    "SLURM_SRUN_COMM_PORT", "SLURM_LAUNCH_NODE_IPADDR", "SLURM_DISTRIBUTION", "SLURM_LABELIO",
    "SLURM_PRIO_PROCESS",
    # MPI ranks that srun --mpi=pmi2/pmix hands each task
    "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
})
# TORCHELASTIC_*: torchrun's agent (USE_AGENT_STORE, RUN_ID, RESTART_COUNT, ERROR_FILE, ...).
# TORCH_NCCL_ASYNC_ERROR_HANDLING, which torchrun also sets, is a NCCL setting, not a place in
# the job, and may be the user's own: it stays.
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_STEP_", "SLURM_CPU_BIND", "OMPI_COMM_WORLD_")


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) without the launcher's rank and rendezvous variables
    (torchrun/torchelastic, Slurm per-task, MPI rank): the environment for a process the trainer
    starts that must run as a standalone program, whatever launched the trainer."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items()
            if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}


@dataclass(frozen=True)
class DeviceProfile:
    """Launch flags and environment that a device needs beyond the generic command."""

    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    supports_memory_saver: bool = False


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    # CUDA: SGLang's defaults (flashinfer/fa3 attention); memory saver for colocation.
    "cuda": DeviceProfile(supports_memory_saver=True),
    # CPU (the test harness, tests/harness/sglang_cpu): the CPU engine and the only attention
    # backend that works without compiled kernels. --sleep-on-idle: an idle scheduler otherwise
    # spins a whole core, which on CPU is the core the colocated trainer needs.
    "cpu": DeviceProfile(args=("--device", "cpu", "--attention-backend", "torch_native",
                               "--sleep-on-idle"),
                         env=(("SGLANG_USE_CPU_ENGINE", "1"),)),
}


def detect_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to launch one SGLang server."""

    model_path: str
    port: int
    host: str = "127.0.0.1"
    tp_size: int = 1
    mem_fraction_static: float = 0.6
    device: str = "auto"              # "auto" -> detect_device()
    dtype: str = "auto"
    colocated: bool = False           # memory saver on devices that support it
    max_total_tokens: int | None = None
    cpu_threads: int | None = None    # device cpu: OMP threads of the server; None: torch's default
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    log_path: str | None = None       # server stdout+stderr; None -> inherit

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def resolved_device(self) -> str:
        device = detect_device() if self.device == "auto" else self.device
        if device not in DEVICE_PROFILES:
            raise ValueError(f"ServerSpec.device={device!r}: known devices {sorted(DEVICE_PROFILES)}")
        return device

    def command(self) -> list[str]:
        device = self.resolved_device()
        profile = DEVICE_PROFILES[device]
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp_size),
               "--mem-fraction-static", str(self.mem_fraction_static), "--dtype", self.dtype,
               *profile.args]
        if self.colocated and profile.supports_memory_saver:
            cmd.append("--enable-memory-saver")
        if self.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = server_environment()
        env.update(dict(DEVICE_PROFILES[self.resolved_device()].env))
        if self.cpu_threads is not None and self.resolved_device() == "cpu":
            env["OMP_NUM_THREADS"] = str(self.cpu_threads)
        env.update(dict(self.env))
        return env


def wait_healthy(url: str, timeout_s: float, proc: "ManagedProcess | None" = None,
                 path: str = "/health") -> None:
    """Poll url+path until HTTP 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.returncode()} before becoming "
                               f"healthy; see {proc.log_path or 'its output'}")
        try:
            if requests.get(url + path, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not healthy after {timeout_s:.0f} s")


_LIVE: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:  # never leave servers behind when the trainer exits
    for proc in list(_LIVE):
        proc.stop()


# Run through sh, which first
# - ignores SIGUSR1: Slurm's --signal=USR1 (the trainer's cue to save and stop, see
#   trainer/preemption.py) reaches every process of the training step, and its default action
#   would kill the servers in the middle of the last rollout;
# - leaves a watcher in the process group that kills the group once the launching process is
#   gone: atexit and the trainer's close() do not run after SIGKILL or an OOM kill, and a
#   server in its own session would outlive the job holding its port and memory.
# then execs the command (its pid stays the group's).
_GUARD = ('trap "" USR1; parent=$1; shift; '
          '( while kill -0 "$parent" 2>/dev/null; do sleep 1; done; kill -KILL 0 ) & '
          'exec "$@"')


class ManagedProcess:
    """A child process in its own session, stopped as a whole process group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str | None):
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self._proc = subprocess.Popen(["/bin/sh", "-c", _GUARD, "sh", str(os.getpid()),
                                           *self.cmd], env=self.env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stop(self, grace_s: float = 10.0) -> None:
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Children (scheduler, detokenizer) may outlive the leader: always finish the group.
        self._signal_group(signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)
        self._proc = None

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)  # pgid == pid: start_new_session=True
        except ProcessLookupError:
            pass


class SGLangServer:
    """One launched SGLang server; restartable with the same spec (same URL)."""

    def __init__(self, spec: ServerSpec, startup_timeout_s: float = 600.0):
        self.spec, self.startup_timeout_s = spec, startup_timeout_s
        self.process = ManagedProcess(f"sglang server {spec.url}", spec.command(),
                                      spec.environment(), spec.log_path)
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self, wait: bool = True) -> "SGLangServer":
        self.process.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_healthy(self.url, self.startup_timeout_s, self.process)

    def alive(self) -> bool:
        return self.process.alive()

    def restart(self) -> None:
        self.process.stop(grace_s=5.0)
        self.restarts += 1
        self.start(wait=True)

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class RouterSpec:
    worker_urls: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    prometheus_port: int | None = None   # None -> port + 1
    policy: str = "round_robin"
    request_timeout_s: float = 600.0
    log_path: str | None = None
    extra_args: tuple[str, ...] = field(default=())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        prom = self.prometheus_port if self.prometheus_port is not None else self.port + 1
        # The router binds 0.0.0.0 for both its API and its metrics unless told otherwise.
        return [sys.executable, "-m", "sglang_router.launch_router",
                "--worker-urls", *self.worker_urls, "--host", self.host, "--port", str(self.port),
                "--prometheus-host", self.host, "--prometheus-port", str(prom),
                "--policy", self.policy, "--request-timeout-secs", str(int(self.request_timeout_s)),
                "--log-level", "warn", *self.extra_args]


class SGLangRouter:
    """sglang-router in front of several servers (one URL for the whole fleet)."""

    def __init__(self, spec: RouterSpec, startup_timeout_s: float = 120.0):
        self.spec, self.startup_timeout_s = spec, startup_timeout_s
        self.process = ManagedProcess(f"sglang-router {spec.url}", spec.command(),
                                      server_environment(), spec.log_path)

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> "SGLangRouter":
        self.process.start()
        try:
            wait_healthy(self.url, self.startup_timeout_s, self.process)
            self._wait_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_workers(self) -> None:
        # The router answers /health before it has registered its workers (registration runs
        # as a background job); sending requests then fails with "no workers".
        deadline = time.monotonic() + self.startup_timeout_s
        want = set(self.spec.worker_urls)
        while time.monotonic() < deadline:
            if want <= set(self.workers(healthy_only=True)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.url}: workers {sorted(want - set(self.workers()))} not "
                           f"registered and healthy after {self.startup_timeout_s:.0f} s")

    def workers(self, healthy_only: bool = False) -> list[str]:
        body = requests.get(self.url + "/workers", timeout=10).json()
        return [w.get("url") for w in body.get("workers", [])
                if not healthy_only or w.get("is_healthy", False)]

    def stop(self) -> None:
        self.process.stop()
