"""kill -9 in the middle of a step and in the middle of a checkpoint save; the resumed run
reproduces the uninterrupted run's per-step losses exactly (CPU, fp32, deterministic)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import free_port
from train_helpers import RECIPE, ROOT, jsonl_losses, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, os, signal, sys
from mopd_megatron.config import load_recipe
from mopd_megatron.train import Trainer

def main():
    recipe, overrides, crash = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    hooks = {}
    if crash != "none":
        phase, at = crash.split(":")
        def hook(trainer, step):
            if step == int(at):
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: a real crash
        hooks[phase] = hook
    trainer = Trainer(load_recipe(recipe, overrides), hooks=hooks)
    try:
        trainer.train()
    finally:
        trainer.close()

if __name__ == "__main__":   # dist-checkpointing's helper process re-imports this module
    main()
'''


def run(tmp: Path, overrides: list[str], crash: str = "none") -> int:
    """Run the trainer in its own process group; afterwards end whatever of that group a
    SIGKILLed trainer left behind (dist-checkpointing's helper processes), so nothing leaks."""
    script = tmp / "run_trainer.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    log = tmp / f"trainer_{crash.replace(':', '_')}.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, str(script), RECIPE, json.dumps(overrides), crash],
                             env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            code = p.wait(timeout=600)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if crash == "none" and code != 0:
        raise AssertionError(log.read_text()[-4000:])
    return code


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_inputs(tmp_path_factory.mktemp("tiny_demo"))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> list[float]:
    tmp = tmp_path_factory.mktemp("reference")
    run(tmp, recipe_overrides(tiny, tmp / "run", steps=4, extra=["checkpoint.save_interval=1"]))
    losses = jsonl_losses(tmp / "run" / "metrics.jsonl")
    assert len(losses) == 4 and len(set(losses)) == 4  # four distinct steps were trained
    return losses


@pytest.mark.parametrize("crash", ["student:3", "checkpoint_write:3"])
def test_kill9_then_resume_reproduces_losses(tiny, reference, tmp_path, crash):
    overrides = recipe_overrides(tiny, tmp_path / "run", steps=4, extra=["checkpoint.save_interval=1"])
    code = run(tmp_path, overrides, crash)
    assert code == -9, f"the run was meant to die by SIGKILL at {crash}, exit code {code}"
    ckpt = tmp_path / "run" / "ckpt"
    # The crash left step_2 selected; a save killed before its commit leaves only a tmp.* dir.
    assert (ckpt / "latest").read_text().strip() == "step_2"
    assert not (ckpt / "step_3").exists()
    if crash.startswith("checkpoint_write"):
        assert any(p.name.startswith("tmp.3.") for p in ckpt.iterdir())
    assert jsonl_losses(tmp_path / "run" / "metrics.jsonl")[:2] == reference[:2]
    run(tmp_path, overrides)  # resume=auto
    assert jsonl_losses(tmp_path / "run" / "metrics.jsonl") == reference  # exact, not approx
    assert (ckpt / "latest").read_text().strip() == "step_4"
    assert not any(p.name.startswith("tmp.") for p in ckpt.iterdir())
