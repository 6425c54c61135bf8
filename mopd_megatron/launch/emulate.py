"""Several cluster nodes on one machine: what the multi-node tests and
benchmarks/bench_multinode.py run.

Each emulated node is one torchrun agent (``--nnodes N --node-rank i`` on localhost, c10d
rendezvous), so the trainer sees GROUP_RANK, LOCAL_RANK and LOCAL_WORLD_SIZE exactly as on a
cluster and places its colocated engines per node. Dedicated engines are started with the
Slurm launcher's own engine-task command (``launch/slurm.py::engine_command``), one task per
SLURM_LOCALID, as ``slurm/launch.sh`` runs them on engine nodes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["run_nodes", "start_engine_tasks", "stop_engine_tasks"]


def run_nodes(nodes: int, ranks_per_node: int, train_args: Sequence[str], log_dir: Path,
              env: dict[str, str], cwd: Path, timeout_s: float = 800.0) -> list[str]:
    """Run ``mopd train <train_args>`` as ``nodes`` torchrun agents of ``ranks_per_node`` ranks
    each; every agent's output (agent<i>.log in log_dir). Raises if one fails or times out."""
    from ..runtime import free_port
    rdzv = free_port("127.0.0.1")
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"agent{n}.log" for n in range(nodes)]
    agents = []
    try:
        for n in range(nodes):
            with open(logs[n], "w") as log:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                     "--node-rank", str(n), "--nproc-per-node", str(ranks_per_node),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
                     "-m", "mopd_megatron.cli", "train", *train_args],
                    cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for a in agents:
            a.wait(timeout=timeout_s)
    finally:
        for a in agents:
            a.kill()
    outs = [log.read_text() for log in logs]
    failed = [(n, a.returncode) for n, a in enumerate(agents) if a.returncode != 0]
    if failed:
        n, rc = failed[0]
        raise RuntimeError(f"emulated node {n} exited with {rc}; its output ends:\n"
                           f"{outs[n][-6000:]}")
    return outs


def start_engine_tasks(cfg, count: int, log_dir: Path, env: dict[str, str],
                       host: str = "127.0.0.1") -> list[subprocess.Popen]:
    """The dedicated-engine step of one engine node: ``count`` tasks of the launcher's engine
    command (SLURM_LOCALID 0..count-1, ports rollout.base_port + id), CPU servers. Each task
    runs in its own session so that stop_engine_tasks ends it whole."""
    from ..rollout.server import server_environment
    from .slurm import engine_command
    cmd = engine_command(cfg, sys.executable, device="cpu", host=host)
    log_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(count):
        task_env = {**server_environment(), **env, "SLURM_LOCALID": str(i)}
        with open(log_dir / f"engine_node_{i}.log", "wb") as log:
            tasks.append(subprocess.Popen(["bash", "-c", cmd], env=task_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return tasks


def stop_engine_tasks(tasks: Sequence[subprocess.Popen]) -> None:
    for t in tasks:
        try:
            os.killpg(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t.wait()
