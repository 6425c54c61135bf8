"""optimizer.epochs_per_rollout: every pass over a rollout batch takes its optimizer steps on
the same micro-batches (teacher scores and log mu reused, not recomputed), each step sees the
weights the previous one left, and the learning-rate schedule spans all of them."""
from __future__ import annotations

import pytest

from dist_helpers import run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow


def one_step_recorded(rank, world, overrides):
    """Run one rollout step with train_step wrapped; what each optimizer step saw."""
    import mopd_megatron.mcore.step as step_mod
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    calls, weights, real = [], [], step_mod.train_step

    def recording(chunks, optimizer, scheduler, mbs, loss_fn, **kwargs):
        weights.append(chunks[0].module.output_layer.weight.detach().clone())
        keys = ("teacher_logp", "rollout_logp", "orm_adv", "loss_mask")
        calls.append({"mbs": id(mbs),
                      "inputs": [float(sum(mb[k].double().sum() for mb in mbs)) for k in keys]})
        res = real(chunks, optimizer, scheduler, mbs, loss_fn, **kwargs)
        tok = sum(float(m["response_tokens"]) for m in res.metrics)
        calls[-1]["gap"] = sum(abs(float(m["train_rollout_logratio"]))
                               * float(m["response_tokens"]) for m in res.metrics) / tok
        calls[-1]["lr"] = optimizer.param_groups[0]["lr"]
        return res

    step_mod.train_step = recording
    trainer = Trainer(load_recipe(RECIPE, overrides))
    try:
        trainer.train_step(1)
        moved = [float((b - a).abs().max()) for a, b in zip(weights, weights[1:])]
        return {"calls": calls, "moved": moved, "scheduler_steps": trainer.scheduler.num_steps,
                "decay_steps": trainer.scheduler.lr_decay_steps}
    finally:
        trainer.close()


def test_epochs_reuse_the_rollout_batch(tmp_path):
    tiny = tiny_inputs(tmp_path / "tiny")
    # 4 prompts x 4 samples = 16 sequences = 2 optimizer steps of 8, over 2 epochs; a large lr
    # so that the second epoch's weights are visibly off the sampling policy.
    over = recipe_overrides(tiny, tmp_path / "run", steps=5, extra=[
        "parallel.global_batch_size=8", "optimizer.steps_per_rollout=2",
        "optimizer.epochs_per_rollout=2", "optimizer.lr=1e-2", "optimizer.schedule=linear",
        "checkpoint.dir=null"])
    report = run_ranks(one_step_recorded, 1, over, timeout=600)[0]
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
