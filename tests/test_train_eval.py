"""train.eval_interval: greedy held-out accuracy during the run, logged as eval/<domain> at
exactly the multiples of the interval, equal at the last step to the run's final eval.

The held-out answers here are the starting student's own greedy outputs, decoded independently
by transformers from its HF checkpoint: the trainer's eval must score ~100% before training,
and less once a large learning rate has moved the weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_helpers import run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

pytestmark = pytest.mark.slow
MAX_NEW = 8  # the recipe's rollout.max_new_tokens: the eval decodes as many


def hf_greedy_answers(tiny: Path, out: Path, per_domain: int = 40) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny / "student" / "hf")
    model = AutoModelForCausalLM.from_pretrained(tiny / "student" / "hf", dtype=torch.float32).eval()
    rows, seen = [], {}
    for line in (tiny / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        if seen.get(r["domain"], 0) == per_domain:
            continue
        ids = tok(r["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if answer:
            rows.append({**r, "answer": answer})
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(rank, world, tiny, evals, out):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    over = recipe_overrides(Path(tiny), Path(out), steps=4, extra=[
        f"data.eval_paths=[{evals}]", "train.eval_interval=2", "checkpoint.dir=null",
        "optimizer.lr=3e-4", f"rollout.max_new_tokens={MAX_NEW}"])
    trainer = Trainer(load_recipe(RECIPE, over))
    try:
        return trainer.train()
    finally:
        trainer.close()


def test_periodic_eval_is_logged_and_matches_the_final_eval(tmp_path, capfd):
    tiny = tiny_inputs(tmp_path / "tiny")
    evals = tmp_path / "own_greedy.jsonl"
    hf_greedy_answers(tiny, evals)
    report = run_ranks(run, 1, str(tiny), str(evals), str(tmp_path / "run"))[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows}
    assert [s for s, e in logged.items() if e] == [2, 4]
    assert set(logged[2]) == {"eval/caesar", "eval/reversal"}
    assert all("time/eval" in r for r in rows if r["step"] in (2, 4))
    # Peak memory of every phase, beside its time (CPU: the process's resident peak).
    for r in rows:
        for phase in ("rollout", "reward", "teacher", "student", "sync"):
            assert r[f"mem/{phase}_max_gib"] > 0, (phase, r)
    assert all("mem/eval_max_gib" in r for r in rows if r["step"] in (2, 4))
    # At the first step, the planner's terms beside the measurement (with the CPU caveat).
    out = capfd.readouterr().out
    assert "memory at step 1, rank 0 (pipeline stage 1 of 1)" in out, out[-3000:]
    assert "plan  student weights" in out and "measured host RSS peak" in out
    assert "not comparable" in out and "memory at step 2" not in out
    # Before training the student reproduces its own HF greedy answers (fp32 near-ties aside).
    before = report["before"]["student"]
    assert set(before) == {"caesar", "reversal"} and min(before.values()) >= 0.95
    # lr 3e-4 moves the weights: fewer answers are the starting student's (0.1 at step 2,
    # 0.05 and 0.025 at step 4 when written).
    assert sum(logged[2].values()) < sum(before.values())
    # The last periodic eval is of the same weights as the run's final eval.
    assert logged[4] == {f"eval/{d}": v for d, v in report["after"]["student"].items()}
