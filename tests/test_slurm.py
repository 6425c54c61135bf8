"""slurm/mopd_70b.sh: the dry-run plan for the full 70B layout, placement rules, and a real
job on a local Slurm (munged + slurmctld + slurmd started by tests/harness/slurm_local/).

The real job runs twice, with the same script and environment overrides: once with the
trainer command (`python -m mopd_megatron.cli train` on recipes/tiny_cpu.yaml, 2 steps,
checkpoint every step: asserts the checkpoint and the metrics file) and once with the trainer
command replaced by a rank-checking stand-in (MOPD_RANK_CMD: asserts SLURM_PROCID/NTASKS and
MASTER_ADDR reachable with a gloo all_reduce). MOPD_SLURM_REAL_TRAINER=0 skips the trainer run.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import LOCAL_ENGINE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mopd_70b.sh"
HARNESS = REPO / "tests" / "harness" / "slurm_local"

RUN_TRAINER = os.environ.get("MOPD_SLURM_REAL_TRAINER", "1") != "0"


def _clean_env(**extra) -> dict:
    """The caller's environment without Slurm job variables (a test may run inside a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MOPD_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def _tiny_two_rank_overrides() -> list[str]:
    """recipes/tiny_cpu.yaml at two data-parallel ranks: its micro-batch may be the whole global
    batch (one rank); halve it when the batch does not split over DP=2."""
    from mopd_megatron.config import load_recipe
    par = load_recipe(REPO / "recipes" / "tiny_cpu.yaml").parallel
    # The in-process engine: these tests are about the launcher, and the Slurm launcher gives
    # the recipe's dedicated SGLang engines nodes of their own (GPU nodes only).
    if par.global_batch_size % (par.micro_batch_size * 2):
        return LOCAL_ENGINE + [f"parallel.micro_batch_size={par.global_batch_size // 2}"]
    return list(LOCAL_ENGINE)


def _dry_run(**extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=_clean_env(**extra),
                          capture_output=True, text=True, timeout=120)


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{name}\s+(.*)$", out, re.M)
    assert m, f"no '{name}' line in:\n{out}"
    return m.group(1)


def test_dry_run_full_70b_layout():
    r = _dry_run()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert _field(out, "recipe") == "recipes/mopd_70b.yaml"
    assert _field(out, "nodes").startswith("8: 8 training  [node0, node1,")   # #SBATCH --nodes=8
    assert _field(out, "gpus") == "8 per node"
    assert _field(out, "ranks") == "64 = 8 nodes x 8 per node"
    assert _field(out, "layout") == "TP=8 PP=4 DP=2"
    assert _field(out, "master") == "node0"
    assert _field(out, "engines").startswith("colocated: 1 SGLang engine(s) per training node "
                                             "(server_tp_size=8), 8 in all")
    assert "64 training GPUs: TP=8 PP=4 DP=2" in out
    # The held-out eval the run will do, as Trainer.evaluate follows it (trainer/eval_plan.py).
    assert _field(out, "eval") == (
        "greedy student (temperature 0, max_new_tokens 6144) on the rollout engine (sglang), "
        "every 50 steps and before/after training, prompts from data.eval_paths "
        "[data/math_eval.jsonl, data/code_eval.jsonl]; teachers: not measured (parallel.pp=4: "
        "teachers are decoded in the trainer, which needs pp = 1, and the rollout engine serves "
        "only the student)")
    m = re.search(r"^FITS: peak ([\d.]+) of 80.0 GiB$", out, re.M)
    assert m and float(m.group(1)) <= 72.0, out     # the recipe promises >= 8 GiB headroom


def test_dry_run_refuses_a_layout_that_does_not_fit():
    r = _dry_run(MOPD_OVERRIDES="parallel.pp=1 parallel.vpp=null")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DOES NOT FIT" in r.stdout and "biggest terms:" in r.stdout
    assert "--set parallel.pp=" in r.stdout
    assert "refusing to start a run that does not fit" in r.stderr


def test_dry_run_dedicated_engines_get_their_own_nodes():
    r = _dry_run(MOPD_NODES="10", MOPD_OVERRIDES="rollout.mode=dedicated rollout.num_engines=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _field(r.stdout, "nodes").startswith("10: 8 training + 2 engine")
    assert _field(r.stdout, "ranks") == "64 = 8 nodes x 8 per node"
    assert "dedicated: 2 SGLang engine(s) (server_tp_size=8) on 2 node(s) [node8, node9]" in r.stdout
    assert "SGLang weights + KV" not in r.stdout       # nothing colocated on training GPUs


def test_emit_shell_for_dedicated_engines_hands_urls_to_the_trainer():
    out = subprocess.run(
        [sys.executable, "-m", "mopd_megatron.launch.slurm", "--recipe", "recipes/mopd_70b.yaml",
         "--set", "rollout.mode=dedicated", "--set", "rollout.num_engines=2", "--nodes", "10",
         "--gpus-per-node", "8", "--hosts", ",".join(f"g{i:02d}" for i in range(10)),
         "--emit-shell"], cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert env["MOPD_TRAIN_HOSTS"] == ",".join(f"g{i:02d}" for i in range(8))
    assert env["MOPD_ENGINE_HOSTS"] == "g08,g09" and env["MOPD_ENGINES_PER_NODE"] == "1"
    # Handed over as dedicated engines (the trainer connects their weight-update group), not
    # as external ones.
    assert env["MOPD_ENGINE_OVERRIDES"] == "'rollout.external_urls=[http://g08:30000,http://g09:30000]'"
    cmd = shlex.split(env["MOPD_ENGINE_CMD"])[0]
    assert "--tp-size 8" in cmd and "--port $((30000+SLURM_LOCALID))" in cmd
    assert "CUDA_VISIBLE_DEVICES=$(seq -s, $((SLURM_LOCALID*8)) $((SLURM_LOCALID*8+7)))" in cmd


def test_cpu_dry_run_skips_the_memory_plan():
    r = _dry_run(MOPD_RECIPE="recipes/tiny_cpu.yaml", MOPD_NODES="1", MOPD_GPUS_PER_NODE="0",
                 MOPD_TASKS_PER_NODE="2", MOPD_OVERRIDES=" ".join(_tiny_two_rank_overrides()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _field(r.stdout, "ranks") == "2 = 1 nodes x 2 per node"
    assert "memory     skipped: no GPUs" in r.stdout


# --- a real job on a local Slurm ---------------------------------------------------------------

@pytest.fixture(scope="module")
def local_slurm():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm harness starts munged/slurmd and must run as root (CI does)")
    up = subprocess.run(["bash", str(HARNESS / "start.sh")], capture_output=True, text=True,
                        timeout=600)
    assert up.returncode == 0, f"local Slurm did not start:\n{up.stdout}\n{up.stderr}"
    try:
        yield
    finally:
        subprocess.run(["bash", str(HARNESS / "stop.sh")], capture_output=True, timeout=120)


def _job_fields(jid: str) -> dict:
    line = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True,
                          text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def _submit(env: dict, out_dir, tasks: int, *extra: str) -> str:
    """sbatch the launcher on one CPU node with ``tasks`` ranks; returns the job id."""
    sub = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0",
         *extra, f"--output={out_dir}/slurm-%j.out", str(SCRIPT)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def _wait_job(jid: str, timeout_s: float) -> dict:
    """Poll slurmctld (sbatch --wait returns slowly on this setup)."""
    t0 = time.monotonic()
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
    while True:
        f = _job_fields(jid)
        if f.get("JobState") in done:
            return f
        if time.monotonic() - t0 > timeout_s:
            subprocess.run(["scancel", jid], timeout=30)
            pytest.fail(f"job {jid} still {f.get('JobState')} ({f.get('Reason')}) after {timeout_s}s")
        time.sleep(0.5)


def _job_processes(jid: str) -> list[str]:
    """Command lines of live processes started under job ``jid`` (they carry SLURM_JOB_ID)."""
    left = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={jid}".encode() in env:
                left.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return left


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["mopd_train", "rank_check"])
def test_real_slurm_job_tiny_cpu_two_tasks(local_slurm, tmp_path, trainer):
    REAL_TRAINER = trainer == "mopd_train"
    if REAL_TRAINER and not RUN_TRAINER:
        pytest.skip("MOPD_SLURM_REAL_TRAINER=0")
    run = tmp_path / "run"
    run.mkdir()            # slurmstepd opens --output before the script runs (else exit 0:53)
    env = _clean_env(MOPD_RECIPE="recipes/tiny_cpu.yaml", MOPD_GPUS_PER_NODE="0",
                     MOPD_PYTHON=sys.executable, MOPD_LOG_DIR=str(run / "logs"),
                     OMP_NUM_THREADS="1")
    env["MOPD_OVERRIDES"] = " ".join(_tiny_two_rank_overrides())
    if REAL_TRAINER:
        env["MOPD_OVERRIDES"] += " " + " ".join([
            "train.steps=2", f"checkpoint.dir={run}/ckpt", "checkpoint.save_interval=1",
            f"logging.jsonl_path={run}/metrics.jsonl", "logging.tensorboard_dir=null",
            "checkpoint.hf_export_dir=null"])
    else:
        env["MOPD_RANK_CMD"] = (f"{sys.executable} tests/harness/slurm_local/rank_check.py "
                                f"{run}/ranks")
    jid = _submit(env, run, 2, "--time=00:40:00")
    f = _wait_job(jid, 900 if REAL_TRAINER else 240)
    out = (run / f"slurm-{jid}.out")
    logs = "\n".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))
    detail = f"{out.read_text() if out.exists() else '(no batch output)'}\n{logs}"
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", f"{f}\n{detail}"

    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    node_log = run / "logs" / f"train-{host}.log"
    assert node_log.exists(), detail                      # per-node log of the training step
    if REAL_TRAINER:
        ckpt = run / "ckpt"
        assert (ckpt / "latest").exists() and any(ckpt.glob("step_*")), detail
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
        assert len(rows) >= 2, detail
    else:
        ranks = sorted((json.loads(p.read_text()) for p in (run / "ranks").glob("rank*.json")),
                       key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1], detail
        for r in ranks:
            assert r["world_size"] == 2 and r["all_reduce"] == 1.0 and r["job"] == jid
            assert r["master"].split(":")[0] == host and r["local_rank"] == r["rank"]
            assert r["mopd_recipe"] == "recipes/tiny_cpu.yaml"
        text = node_log.read_text()
        assert "0: rank 0/2 ok" in text and "1: rank 1/2 ok" in text   # srun --label

    deadline = time.monotonic() + 15          # slurmstepd reaps within KillWait
    while _job_processes(jid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_processes(jid) == [], "processes left behind by the job"


@pytest.mark.slow
def test_real_slurm_cancel_leaves_nothing_behind(local_slurm, tmp_path):
    """scancel mid-run: the launcher's trap stops its steps; no process of the job survives."""
    env = _clean_env(MOPD_RECIPE="recipes/tiny_cpu.yaml", MOPD_GPUS_PER_NODE="0",
                     MOPD_PYTHON=sys.executable, MOPD_LOG_DIR=str(tmp_path / "logs"),
                     MOPD_RANK_CMD="sleep 600 & wait",
                     MOPD_OVERRIDES=" ".join(_tiny_two_rank_overrides()))
    jid = _submit(env, tmp_path, 2)
    t0 = time.monotonic()
    while not any("sleep 600" in c for c in _job_processes(jid)):
        assert time.monotonic() - t0 < 120, f"ranks never started: {_job_fields(jid)}"
        time.sleep(0.5)
    subprocess.run(["scancel", jid], timeout=30)
    f = _wait_job(jid, 120)
    assert f["JobState"] == "CANCELLED", f
    deadline = time.monotonic() + 20
    while _job_processes(jid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_processes(jid) == []
    assert "[launch] signal TERM: asking the training step to save and stop" in \
        (tmp_path / f"slurm-{jid}.out").read_text()


@pytest.mark.slow
def test_real_slurm_job_refuses_a_plan_that_does_not_fit(local_slurm, tmp_path):
    """The memory gate runs inside the job, before srun: 70B at TP=8 x PP=1 on one 8-GPU node
    (the node here has no GPUs; the planner only needs the numbers) must fail with the reason."""
    env = _clean_env(MOPD_GPUS_PER_NODE="8", MOPD_PYTHON=sys.executable,
                     MOPD_OVERRIDES="parallel.pp=1", MOPD_LOG_DIR=str(tmp_path / "logs"),
                     MOPD_RANK_CMD="echo must-not-run")
    jid = _submit(env, tmp_path, 1)
    f = _wait_job(jid, 120)
    out = (tmp_path / f"slurm-{jid}.out").read_text()
    assert f["JobState"] == "FAILED" and f["ExitCode"] == "1:0", f"{f}\n{out}"
    assert "DOES NOT FIT" in out and "refusing to start a run that does not fit" in out
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
