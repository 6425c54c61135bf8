"""Preemption and requeue: SIGTERM/SIGUSR1 make every rank finish its step, save a committed
checkpoint and exit 75; slurm/launch.sh requeues the job on 75 and `checkpoint.resume: auto`
continues it. The resumed run's per-step losses equal an uninterrupted run's, bitwise (CPU,
fp32, deterministic), as after kill -9 (tests/test_train_resume.py).

- on the real local Slurm: `scancel --signal=TERM` mid-run, the launcher's requeue, the second
  run of the batch script;
- under torchrun (2 ranks): SIGTERM to one rank only stops both after the same step;
- without a checkpoint directory: exit 143, nothing to continue from.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_helpers import free_port
from test_slurm import _clean_env, _job_fields, _submit, _wait_job, local_slurm  # noqa: F401
from train_helpers import RECIPE, ROOT, jsonl_losses, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_inputs(tmp_path_factory.mktemp("preempt") / "tiny")


def _over(tiny: Path, run: Path, extra=()) -> list[str]:
    return recipe_overrides(tiny, run, steps=STEPS, extra=[
        "checkpoint.save_interval=0", "checkpoint.hf_export_dir=null",
        "logging.tensorboard_dir=null", "train.cpu_threads=1", *extra])


def _sets(over: list[str]) -> list[str]:
    return [a for o in over for a in ("--set", o)]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "mopd_megatron.cli", "train", "--recipe", RECIPE,
                        *_sets(_over(tiny, run))], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    losses = jsonl_losses(run / "metrics.jsonl")
    assert len(losses) == STEPS
    return losses


def _wait_for_step(metrics: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.1)


def _committed_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*"))


def test_scancel_term_saves_requeues_and_resumes_bitwise(local_slurm, tiny, reference, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()            # slurmstepd opens --output before the script runs
    over = _over(tiny, run)
    assert not any(" " in o for o in over)       # MOPD_OVERRIDES is split on whitespace
    env = _clean_env(MOPD_RECIPE=str(Path(RECIPE).relative_to(ROOT)), MOPD_GPUS_PER_NODE="0",
                     MOPD_PYTHON=sys.executable, MOPD_LOG_DIR=str(run / "logs"),
                     MOPD_MASTER_PORT=str(free_port()), MOPD_OVERRIDES=" ".join(over),
                     OMP_NUM_THREADS="1")
    jid = _submit(env, run, 1, "--time=00:40:00", "--requeue", "--open-mode=append")
    try:
        _wait_for_step(run / "metrics.jsonl")
        # To the job's steps (the ranks), as a preemption or a plain `scancel --signal` does.
        subprocess.run(["scancel", "--signal=TERM", jid], check=True, timeout=30)
        deadline = time.monotonic() + 300
        while _job_fields(jid).get("Restarts", "0") == "0":
            assert time.monotonic() < deadline, f"never requeued: {_job_fields(jid)}"
            time.sleep(0.5)
        stopped_at = _committed_steps(run / "ckpt")
        # Slurm holds a requeued job back ~2 minutes (its BeginTime). Releasing it earlier
        # (scontrol update StartTime=now) raced slurmd: "Killing non-startable batch job: Job
        # credential revoked" (CI, 2026-12-06). Wait as a cluster would.
        f = _wait_job(jid, 600)
    finally:
        subprocess.run(["scancel", jid], timeout=30)
    out = (run / f"slurm-{jid}.out").read_text()
    logs = "\n".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))
    detail = f"{f}\n{out}\n{logs[-6000:]}"
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", detail
    assert f["Restarts"] == "1", detail
    assert "training step exited with 75" in out and "requeueing job" in out, detail
    assert len(stopped_at) == 1 and 1 <= stopped_at[0] < STEPS, (stopped_at, detail)
    assert f"resumed from" in logs and f"(step {stopped_at[0]})" in logs, detail
    assert jsonl_losses(run / "metrics.jsonl") == reference   # exact, not approx


def test_sigterm_to_one_torchrun_rank_stops_both_after_the_same_step(tiny, tmp_path):
    """Only rank 1 gets the signal: the all-reduced flag stops rank 0 after the same step, the
    checkpoint is committed by both; a second launch continues to the per-step losses of an
    uninterrupted DP=2 run, bitwise."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def cmd(run):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "mopd_megatron.cli", "train",
                "--recipe", RECIPE, *_sets(_over(tiny, run))]
    ref = subprocess.run(cmd(tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    run = tmp_path / "run"
    p = subprocess.Popen(cmd(run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run / "metrics.jsonl")
        os.kill(_worker_pid(p.pid, local_rank=1), signal.SIGTERM)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    # The first rank to exit 75 makes torchrun's agent stop the other, which has committed the
    # same checkpoint by then (both save before either raises); the agent itself exits 1.
    assert p.returncode != 0 and "exitcode  : 75" in out, out[-4000:]
    stopped = _committed_steps(run / "ckpt")
    assert len(stopped) == 1 and stopped[0] < STEPS, out[-4000:]
    assert "got SIGTERM" in out and f"stopping after step {stopped[0]} on SIGTERM" in out
    again = subprocess.run(cmd(run), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"(step {stopped[0]})" in again.stdout
    assert jsonl_losses(run / "metrics.jsonl") == jsonl_losses(tmp_path / "ref" / "metrics.jsonl")


def test_without_a_checkpoint_dir_the_exit_says_nothing_to_resume(tiny, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "mopd_megatron.cli", "train", "--recipe", RECIPE,
                          *_sets(_over(tiny, run, ["checkpoint.dir=null"]))], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run / "metrics.jsonl")
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 143, out[-3000:]
    assert "got SIGUSR1" in out and "nothing saved" in out
    assert 1 <= len(jsonl_losses(run / "metrics.jsonl")) < STEPS


def _worker_pid(agent: int, local_rank: int, timeout_s: float = 60) -> int:
    """The torchrun worker with LOCAL_RANK=local_rank under the agent process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{agent}/task").glob("*"):
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"LOCAL_RANK={local_rank}".encode() in env:
                    return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {agent}")


def test_preempted_exit_codes():
    from mopd_megatron.trainer.preemption import REQUEUE_EXIT, TERMINATED_EXIT, Preempted
    assert Preempted(3, True, "SIGTERM").exit_code == REQUEUE_EXIT == 75
    assert Preempted(0, False, "SIGUSR1").exit_code == TERMINATED_EXIT == 143
    launch = (ROOT / "slurm" / "launch.sh").read_text()
    assert "(( rc == 75 ))" in launch      # the launcher requeues on the trainer's code
    for script in ("mopd_70b.sh", "qwen3_8b_mopd.sh"):
        text = (ROOT / "slurm" / script).read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
