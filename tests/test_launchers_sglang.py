"""The demo recipe with its real SGLang CPU server, started by the trainer under the launchers
users run it with: torchrun at 1 rank, torchrun at 2 ranks (DP=2 and TP=2), and a 2-task srun
step on the local Slurm (tests/harness/slurm_local, through slurm/mopd_70b.sh).

Each trainer rank gets its launcher's variables (torchrun: TORCHELASTIC_USE_AGENT_STORE, RANK,
MASTER_PORT, ...; srun: SLURM_PROCID, SLURM_STEP_*, ...). With torchrun's, a server never became
healthy ("Init parallel begin", then nothing); Slurm's did not hang it, but describe a rank the
server is not. rollout.server.server_environment removes both.
Each run must finish its steps with the parity probe (engine vs trainer log-probs after every
weight sync) in agreement, start its server without the launcher's per-rank variables (read
from the live server's /proc/<pid>/environ), and leave no SGLang process behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dist_helpers import free_port
from launch_helpers import MARK, left_behind, marked_processes
from test_slurm import _clean_env, _job_processes, _submit, _wait_job, local_slurm  # noqa: F401
from train_helpers import RECIPE, ROOT, recipe_overrides, tiny_inputs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                 reason="needs the SGLang CPU harness (tests/harness/sglang_cpu/setup.sh)")]

STEPS = 2
STARTUP_S = 240        # server start-up is 20-60 s on 2 cores; a hang fails the run after this
RUN_TIMEOUT_S = 600    # one trainer run, start-up to exit


def _overrides(tiny: Path, run: Path, port: int, extra: list[str] = ()) -> list[str]:
    # recipe_overrides points the demo at the tiny inputs and takes the in-process engine: put
    # the recipe's SGLang engine back (it starts from the HF student).
    return recipe_overrides(tiny, run, steps=STEPS, extra=[
        "rollout.engine=sglang", f"model.checkpoint={tiny}/student/hf", "model.checkpoint_format=hf",
        f"rollout.base_port={port}", f"rollout.startup_timeout_s={STARTUP_S}",
        f"rollout.server_log_dir={run}/sglang", "rollout.parity_interval=1",
        "rollout.server_cpu_threads=1", "train.cpu_threads=1", "checkpoint.hf_export_dir=null",
        *extra])


# The demo's own rollout: a dedicated server sampling one step off the trainer.
DEMO_ROLLOUT = ["rollout.mode=dedicated", "train.async_rollout=true"]


class ServerEnvWatcher:
    """Polls the process table while a run goes on and keeps the environment that the run's
    first `sglang.launch_server` process was started with (/proc/<pid>/environ)."""

    def __init__(self, marker: str):
        self.marker, self.env = marker, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while self.env is None and not self._stop.wait(0.5):
            for pid, cmd in marked_processes(self.marker).items():
                if "sglang.launch_server" in cmd:
                    try:
                        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    self.env = dict(kv.decode(errors="replace").split("=", 1)
                                    for kv in raw if b"=" in kv)
                    break

    def __enter__(self) -> "ServerEnvWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# Set for every trainer rank by the launchers, and must not reach the server.
RANK_VARS = {"torchrun": ["TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "RANK",
                          "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                          "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT"],
             "srun": ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS",
                      "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_TASK_PID", "MASTER_ADDR",
                      "MASTER_PORT"]}


def _check_server_env(watcher: ServerEnvWatcher, launcher: str, detail: str) -> None:
    env = watcher.env
    assert env is not None, f"no SGLang server process was seen\n{detail}"
    assert env.get(MARK) == watcher.marker                # the user's variables stay
    leaked = [k for k in RANK_VARS[launcher] if k in env]
    assert not leaked, f"the server got the trainer rank's {leaked}"
    if launcher == "srun":
        assert "SLURM_JOB_ID" in env          # job-level variables stay


def _check_run(run: Path, detail: str) -> None:
    """All steps logged, the parity probe after every weight sync, and agreement."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), detail
    for r in rows:
        assert "rollout/parity_mean_abs" in r, f"step {r['step']} has no parity probe\n{detail}"
        # The server runs the weights just pushed (fp32 both sides): float noise only.
        assert r["rollout/parity_mean_abs"] < 0.01, (r, detail)
        assert r["tokens/response"] > 0, (r, detail)
    logs = list((run / "sglang").glob("sglang_*.log"))
    assert len(logs) == 1 and "Init parallel begin" in logs[0].read_text(), detail


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_inputs(tmp_path_factory.mktemp("launchers") / "tiny")


# --- torchrun ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc,layout", [(1, []), (2, []), (2, ["parallel.tp=2"])],
                         ids=["1rank", "2ranks_dp2", "2ranks_tp2"])
def test_torchrun_sglang_demo(tiny, tmp_path, nproc, layout):
    run, marker = tmp_path / "run", uuid.uuid4().hex
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "-m", "mopd_megatron.trainer.cli", "--recipe", RECIPE]
    for o in _overrides(tiny, run, free_port(), DEMO_ROLLOUT + layout):
        args += ["--set", o]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{MARK: marker})
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out, ServerEnvWatcher(marker) as watcher:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # torchrun and its workers
            proc.wait()
            pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n"
                        f"{log.read_text()[-6000:]}")
        finally:
            left = left_behind(marker)
    detail = log.read_text()[-6000:]
    assert proc.returncode == 0, detail
    _check_run(run, detail)
    _check_server_env(watcher, "torchrun", detail)
    assert left == {}, f"processes outlived the run: {left}"


# --- Slurm: srun with 2 tasks, through the launcher users submit --------------------------------


def test_slurm_srun_two_tasks_sglang_demo(local_slurm, tiny, tmp_path):  # noqa: F811
    run, marker = tmp_path / "run", uuid.uuid4().hex
    run.mkdir()            # slurmstepd opens --output before the script runs
    # On CPU nodes the launcher refuses rollout.mode=dedicated (engines get GPU nodes of their
    # own): the trainer's rank 0 starts the server next to itself (colocated, synchronous).
    over = _overrides(tiny, run, free_port(), ["rollout.mode=colocated", "train.async_rollout=false"])
    assert not any(" " in o for o in over)       # MOPD_OVERRIDES is split on whitespace
    env = _clean_env(MOPD_RECIPE=str(Path(RECIPE).relative_to(ROOT)), MOPD_GPUS_PER_NODE="0",
                     MOPD_PYTHON=sys.executable, MOPD_LOG_DIR=str(run / "logs"),
                     MOPD_MASTER_PORT=str(free_port()), MOPD_OVERRIDES=" ".join(over),
                     OMP_NUM_THREADS="1", **{MARK: marker})
    jid = None
    with ServerEnvWatcher(marker) as watcher:
        try:
            jid = _submit(env, run, 2, "--time=00:40:00")
            f = _wait_job(jid, RUN_TIMEOUT_S)
        finally:
            left = left_behind(marker)
    out = run / f"slurm-{jid}.out"
    logs = "\n".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))
    detail = f"{out.read_text() if out.exists() else '(no batch output)'}\n{logs[-6000:]}"
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", f"{f}\n{detail}"
    assert "2 ranks on 1 node(s)" in detail, detail          # one srun step of 2 tasks
    _check_run(run, detail)
    _check_server_env(watcher, "srun", detail)
    assert left == {} and _job_processes(jid) == [], f"processes outlived the job: {left}"
