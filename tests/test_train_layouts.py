"""The whole loop at TP=2, PP=2 and DP=2 on gloo, replaying one recorded rollout (record once,
replay many), against the TP=1 run that recorded it; and the golden per-step losses of that tiny
deterministic run (tests/assets/train_golden_losses.json).

Regenerate the golden file after an intended change of the numbers:
    python tests/test_train_layouts.py --update-golden
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dist_helpers import run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "assets" / "train_golden_losses.json"
STEPS = 3
# fp32 everywhere; TP/PP/DP change only the order of reductions (and the all-reduces), so the
# per-step losses agree to float32 rounding amplified by three optimizer steps.
LAYOUT_ATOL = 2e-4
GOLDEN_RTOL = 1e-5


def _overrides(tiny, run, extra=()):
    return recipe_overrides(tiny, run, steps=STEPS, extra=["checkpoint.dir=null", *extra])


def record(rank, world, tiny, run, rec_path):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    from mopd_megatron.rollout.replay import RecordingEngine
    trainer = Trainer(load_recipe(RECIPE, _overrides(tiny, run)))
    trainer.engine = RecordingEngine(trainer.engine, rec_path)
    try:
        return trainer.train()["losses"]
    finally:
        trainer.close()


def replay(rank, world, tiny, run, rec_path, layout, more=()):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    from mopd_megatron.rollout.replay import ReplayEngine
    extra = [f"parallel.{k}={v}" for k, v in layout.items()] + ["rollout.engine=sglang", *more]
    trainer = Trainer(load_recipe(RECIPE, _overrides(tiny, run, extra)), engine=ReplayEngine(rec_path))
    seen = []  # per step: (sequences, micro-batches, padding fraction) of this rank
    score = trainer.teacher_scores

    def counting(batch):
        prep = score(batch)
        seen.append((len(prep.slots.offset), sum(map(len, prep.steps)),
                     float(prep.padded[0] / prep.padded[1])))
        return prep
    trainer.teacher_scores = counting
    try:
        return trainer.train()["losses"], seen
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    tiny = tiny_inputs(tmp / "tiny")
    rec = tmp / "rollouts.pt"
    losses = run_ranks(record, 1, str(tiny), str(tmp / "run"), str(rec))[0]
    return tiny, rec, losses


def test_golden_losses(recorded):
    _, _, losses = recorded
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=GOLDEN_RTOL, abs=1e-7)


BUDGET = {"max_tokens_per_microbatch": 40}  # tokens: the tiny rows are 8-20 tokens long
PACKED = {**BUDGET, "pack_sequences": "true"}


@pytest.mark.parametrize("layout, world", [
    ({"tp": 1}, 1), ({"tp": 2}, 2), ({"pp": 2}, 2), ({"tp": 1, "micro_batch_size": 4}, 2),
    # Token budgets and packing change only the grouping: same losses (parallel.* docs)
    ({**PACKED}, 1), ({"tp": 2, **PACKED}, 2), ({"pp": 2, **BUDGET}, 2), ({"pp": 2, **PACKED}, 2),
    ({**BUDGET}, 2), ({**PACKED}, 2)],
    ids=["replay_tp1", "tp2", "pp2", "dp2", "packed_tp1", "packed_tp2", "budget_pp2",
         "packed_pp2", "budget_dp2", "packed_dp2"])
def test_layouts_match_recorded_run(recorded, tmp_path, layout, world):
    tiny, rec, reference = recorded
    out = run_ranks(replay, world, str(tiny), str(tmp_path / "run"), str(rec), layout)
    losses = [o[0] for o in out]
    if "max_tokens_per_microbatch" in layout:
        seen = [o[1] for o in out]
        # several micro-batches per step, each under the budget (checked by the grouping tests)
        assert all(mbs > 1 for rank in seen for _, mbs, _ in rank)
        if "pack_sequences" in layout:
            assert all(frac < 0.1 for rank in seen for _, _, frac in rank)
        # (ranks holding different numbers of sequences: tests/test_microbatches.py, whose
        # batch is skewed enough; the tiny demo's rows are all 8-20 tokens)
    for rank_losses in losses:
        if layout == {"tp": 1} and world == 1:
            assert rank_losses == reference  # replay through the same layout is bit-exact
        else:
            assert rank_losses == pytest.approx(reference, abs=LAYOUT_ATOL)


@pytest.mark.parametrize("signal", ["full_vocab", "topk"])
def test_kl_signal_is_the_same_at_tp2_and_pp2(recorded, tmp_path, signal):
    """loss.signal != sampled through the whole trainer: the teachers' hidden states (or top-k)
    captured on the last stage, the KL objective at the loss; TP=2 and PP=2 equal TP=1."""
    tiny, rec, sampled = recorded
    more = [f"loss.signal={signal}", "loss.topk=16"]
    runs = {}
    for name, layout, world in (("tp1", {"tp": 1}, 1), ("tp2", {"tp": 2}, 2), ("pp2", {"pp": 2}, 2)):
        out = run_ranks(replay, world, str(tiny), str(tmp_path / name), str(rec), layout, more)
        runs[name] = [o[0] for o in out]
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for r in rows:  # the exact KL per teacher, and the one-sample estimate beside it
            for t in ("caesar", "reversal"):
                assert r[f"kl/{t}"] >= -1e-6 and f"kl_sampled/{t}" in r, r
    assert runs["tp1"][0] != pytest.approx(sampled, abs=LAYOUT_ATOL)  # another objective
    for name in ("tp2", "pp2"):
        for losses in runs[name]:
            assert losses == pytest.approx(runs["tp1"][0], abs=LAYOUT_ATOL), name


if __name__ == "__main__" and "--update-golden" in sys.argv:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tiny = tiny_inputs(Path(d) / "tiny")
        losses = run_ranks(record, 1, str(tiny), str(Path(d) / "run"), str(Path(d) / "rec.pt"))[0]
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses,
                                  "how": "tests/test_train_layouts.py::record, tiny demo inputs "
                                         "(train_helpers.TINY_FLAGS), local engine"}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses}")
