"""optimizer.epochs_per_rollout: every pass over a rollout batch takes its optimizer steps on
the same micro-batches (teacher scores and log mu reused, not recomputed), each step sees the
weights the previous one left, and the learning-rate schedule spans all of them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import free_port
from train_helpers import RECIPE, ROOT, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, sys
import torch
import mopd_megatron.training.step as step_mod
from mopd_megatron.config import load_recipe
from mopd_megatron.train import Trainer

calls = []
real = step_mod.train_step

def recording(chunks, optimizer, scheduler, mbs, loss_fn, *, vocab_size):
    weight = chunks[0].module.output_layer.weight
    calls.append({
        "mbs": id(mbs),
        "weight_before": weight.detach().clone(),
        "inputs": [float(sum(mb[k].double().sum() for mb in mbs))
                   for k in ("teacher_logp", "rollout_logp", "orm_adv", "loss_mask")]})
    res = real(chunks, optimizer, scheduler, mbs, loss_fn, vocab_size=vocab_size)
    tok = sum(float(m["response_tokens"]) for m in res.metrics)
    calls[-1]["gap"] = sum(abs(float(m["train_rollout_logratio"])) * float(m["response_tokens"])
                           for m in res.metrics) / tok
    calls[-1]["lr"] = optimizer.param_groups[0]["lr"]
    return res

step_mod.train_step = recording
trainer = Trainer(load_recipe(sys.argv[1], json.loads(sys.argv[2])))
try:
    trainer.train_step(1)
    w = [c.pop("weight_before") for c in calls]
    out = {"calls": calls, "moved": [float((b - a).abs().max()) for a, b in zip(w, w[1:])],
           "scheduler_steps": trainer.scheduler.num_steps,
           "decay_steps": trainer.scheduler.lr_decay_steps}
    print("REPORT " + json.dumps(out), flush=True)
finally:
    trainer.close()
'''


def test_epochs_reuse_the_rollout_batch(tmp_path):
    tiny = tiny_inputs(tmp_path / "tiny")
    # 4 prompts x 4 samples = 16 sequences = 2 optimizer steps of 8, over 2 epochs; a large lr
    # so that the second epoch's weights are visibly off the sampling policy.
    over = recipe_overrides(tiny, tmp_path / "run", steps=5, extra=[
        "parallel.global_batch_size=8", "optimizer.steps_per_rollout=2",
        "optimizer.epochs_per_rollout=2", "optimizer.lr=1e-2", "optimizer.schedule=linear",
        "checkpoint.dir=null"])
    script = tmp_path / "run_epochs.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, str(script), RECIPE, json.dumps(over)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("REPORT "))[7:])
    calls = report["calls"]

    # Two epochs of the same two optimizer steps, in order, on the very same micro-batches.
    assert len(calls) == 4
    assert calls[0]["mbs"] != calls[1]["mbs"]
    assert [c["mbs"] for c in calls[2:]] == [c["mbs"] for c in calls[:2]]
    # Teacher scores, log mu, A_ORM and the mask are untouched by the first epoch.
    assert calls[2]["inputs"] == calls[0]["inputs"] and calls[3]["inputs"] == calls[1]["inputs"]
    # Every optimizer step moved the weights the next one starts from.
    assert all(m > 0 for m in report["moved"])
    # The first step is on-policy (the in-trainer engine sampled with these weights, fp32); the
    # second epoch's student has moved off mu, which w = pi_theta / mu must see.
    assert calls[0]["gap"] < 1e-4
    assert calls[2]["gap"] > 100 * max(calls[0]["gap"], 1e-6)
    # The schedule counts every optimizer step: 5 rollout steps x 2 steps x 2 epochs.
    assert report["scheduler_steps"] == 4
    assert report["decay_steps"] == 5 * 2 * 2
    assert calls[0]["lr"] > calls[1]["lr"] > calls[2]["lr"] > calls[3]["lr"]
