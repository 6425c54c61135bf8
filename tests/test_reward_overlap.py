"""Rewards overlapped with teacher scoring (train.py::train_step, rewards/registry.start_batch):
the verifiers score a rollout batch on rank 0's pool of ``reward.workers`` threads while the
teachers score it, and the advantages reach the student's micro-batches before its update.

A real Trainer on the tiny demo; each verifier call is slowed down and timed, and the phases'
start times are taken through the trainer's phase hooks."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dist_helpers import run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow
SLOW = 0.05  # seconds added to every verifier call


def run(rank, world, tiny, out, workers):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    marks, calls, active = [], [], [0, 0]   # active: (now, peak)
    lock = threading.Lock()

    def mark(name):
        return lambda trainer, step: marks.append((name, step, time.perf_counter()))
    hooks = {p: mark(p) for p in ("rollout", "release", "teacher", "reward", "student", "sync")}
    over = recipe_overrides(Path(tiny), Path(out), steps=2,
                            extra=["checkpoint.dir=null", f"reward.workers={workers}"])
    trainer = Trainer(load_recipe(RECIPE, over), hooks=hooks)
    score = trainer.inputs.rewards.score

    def slow_score(*a):
        with lock:
            active[0] += 1
            active[1] = max(active)
        t0 = time.perf_counter()
        time.sleep(SLOW)
        try:
            # the tiny student answers every prompt alike (all-zero GRPO advantages): alternate
            # the reward by response text so that the advantages the student sees are not zero
            real = score(*a)
            return type(real)(float(len(a[1]) % 2), real.reason)
        finally:
            with lock:
                active[0] -= 1
            calls.append((t0, time.perf_counter()))
    trainer.inputs.rewards.score = slow_score
    seen_adv, last = [], {}
    update, finish = trainer.student_update, trainer.finish_rewards

    def finishing(batch, pending, prep=None):
        finish(batch, pending, prep)
        last["adv"] = list(batch.advantages)

    def checking(steps):  # each response token holds its sequence's advantage at the update
        err = 0.0
        for mb in (mb for s in steps for mb in s):
            on = mb["loss_mask"] > 0
            want = [last["adv"][i] for i in mb["seq_ids"][on].tolist()]
            err = max(err, max((abs(a - b) for a, b in zip(mb["orm_adv"][on].tolist(), want)),
                               default=0.0))
        seen_adv.append((err, max(abs(a) for a in last["adv"])))
        return update(steps)
    trainer.student_update, trainer.finish_rewards = checking, finishing
    try:
        trainer.train()
    finally:
        trainer.close()
    return marks, calls, active[1], seen_adv


@pytest.mark.parametrize("workers", [1, 4])
def test_verifiers_run_while_the_teachers_score(tmp_path, workers):
    tiny = tiny_inputs(tmp_path / "tiny")
    marks, calls, peak, seen_adv = run_ranks(run, 1, str(tiny), str(tmp_path / "run"), workers)[0]
    assert peak == workers  # reward.workers bounds (and here fills) the verifier pool
    at = {(name, step): t for name, step, t in marks}
    overlapped = 0
    for step in (1, 2):
        teacher, reward = at[("teacher", step)], at[("reward", step)]
        started = [c for c in calls if at[("rollout", step)] <= c[0] < at[("student", step)]]
        assert len(started) == 16  # the step's 16 sequences, all scored before the update
        # the first calls began before the teachers' phase ended: they ran during it
        overlapped += sum(1 for t0, _ in started if t0 < reward)
        assert min(t0 for t0, _ in started) < teacher + 0.5  # queued at the rollout's end
    assert overlapped >= 2
    # advantages (not all zero: the check can fail) filled in before each update
    assert len(seen_adv) == 2 and all(err < 1e-6 and big > 0.1 for err, big in seen_adv), seen_adv
