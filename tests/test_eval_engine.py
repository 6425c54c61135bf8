"""Held-out eval through the rollout engine (trainer/evaluate.py, trainer/eval_plan.py).

The plan (one function, read by the trainer and printed by both dry-runs) is checked on the
recipes; the SGLang tests run the tiny recipe's student on a real SGLang CPU server:

- pp = 1: every eval of a one-step run (before, periodic, final) goes to the engine greedily
  and gives the in-trainer greedy sampler's answers for the same weights, the initial ones and
  the ones the last sync pushed;
- pp = 2 (two gloo ranks; it got no eval before): the student is evaluated on the engine and
  scores what the pp = 1 in-trainer sampler scores; teacher accuracy is reported as not
  measured, once.

The held-out answers are the starting student's own greedy outputs (transformers, from its HF
checkpoint; tests/test_train_eval.py), so an eval of the starting weights scores ~100%.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dist_helpers import run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

ROOT = Path(__file__).resolve().parent.parent
BIG = ROOT / "recipes" / "mopd_70b.yaml"
MAX_NEW = 8  # the tiny recipe's rollout.max_new_tokens


def needs_sglang(test):
    test = pytest.mark.slow(test)
    return pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                              reason="needs the SGLang CPU harness (tests/harness/sglang_cpu/setup.sh)")(test)


# --- the plan and the dry-runs (no model, no server) ---------------------------------------------
def _plan(recipe, *overrides):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.eval_plan import eval_plan
    return eval_plan(load_recipe(recipe, list(overrides)))


def test_plan_follows_the_engine_and_the_layout():
    on_engine = _plan(RECIPE)                                  # sglang, pp = 1
    assert on_engine.on_engine and on_engine.teachers_skipped is None
    assert on_engine.describe().startswith(
        "greedy student (temperature 0, max_new_tokens 8) on the rollout engine (sglang), "
        "every 200 steps and before/after training, prompts from data.eval_paths "
        "[.cache/tiny_cpu/eval.jsonl]; teachers: in the trainer")
    local = _plan(RECIPE, "rollout.engine=local", "rollout.mode=colocated", "train.async_rollout=false")
    assert not local.on_engine and "in the trainer (rollout.engine=local" in local.describe()
    big = _plan(BIG)                                           # pp = 4
    assert big.on_engine and big.interval == 50
    assert big.teachers_skipped.startswith("parallel.pp=4: ")
    none = _plan(RECIPE, "data.eval_paths=[]", "train.eval_interval=0")
    assert not none.enabled and none.describe() == "none (data.eval_paths is empty)"


def test_train_dry_run_prints_the_plan_the_trainer_follows():
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.cli import plan
    from mopd_megatron.trainer.eval_plan import eval_plan
    cfg = load_recipe(BIG)
    lines = plan(cfg, 64).splitlines()
    assert f"eval: {eval_plan(cfg).describe()}" in lines
    assert any(line.startswith("eval: greedy student (temperature 0, max_new_tokens 6144) on the "
                               "rollout engine (sglang), every 50 steps") for line in lines)


# --- the eval on a real SGLang engine ------------------------------------------------------------
def _server_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999). free_port() returns an ephemeral
    one, which gloo's own sockets may take before the server binds it (seen: the server then
    fails to bind and start-up waits out rollout.startup_timeout_s)."""
    import random
    import socket
    for _ in range(100):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32000")


class SpyEngine:
    """The trainer's engine, recording each generate() call's n, sampling and answers."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.collective, self.needs_weight_sync = inner.collective, inner.needs_weight_sync

    def generate(self, prompts, n, sampling):
        out = self.inner.generate(prompts, n, sampling)
        self.calls.append({"prompts": [list(p) for p in prompts], "n": n, "sampling": sampling,
                           "tokens": [list(s.token_ids) for s in out]})
        return out

    def __getattr__(self, name):  # state_dict, shutdown, ...: the engine's own
        return getattr(self.inner, name)


def _trainer(tiny, evals, run, port, extra=()):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    # One step at a large learning rate: the final weights answer differently from the initial
    # ones, so an engine left on the initial weights could not pass for the final student.
    over = recipe_overrides(Path(tiny), Path(run), steps=1, extra=[
        "rollout.engine=sglang", f"rollout.base_port={port}", f"model.checkpoint={tiny}/student/hf",
        "model.checkpoint_format=hf", f"data.eval_paths=[{evals}]", "train.eval_interval=1",
        "checkpoint.dir=null", "optimizer.lr=1e-2", f"rollout.max_new_tokens={MAX_NEW}", *extra])
    return Trainer(load_recipe(RECIPE, over))


def _in_trainer(trainer):
    """(greedy tokens per eval row, {domain: accuracy}) of trainer.chunks, decoded in the trainer."""
    from mopd_megatron.rollout.local import sample_tokens
    from mopd_megatron.trainer.evaluate import greedy_accuracy
    inp, rows = trainer.inputs, trainer.eval_rows
    kw = dict(max_new_tokens=MAX_NEW, eos_id=inp.eos_id, pad_id=inp.pad_id,
              vocab_size=inp.hf.vocab_size)
    tokens = [t for t, _, _ in sample_tokens(trainer.chunks, [r.prompt_ids for r in rows],
                                             temperature=0.0, **kw)]
    return tokens, greedy_accuracy(trainer.chunks, rows, inp.tokenizer, inp.rewards, **kw)


def run_pp1(rank, world, tiny, evals, run, port):
    trainer = _trainer(tiny, evals, run, port)
    trainer.engine = spy = SpyEngine(trainer.engine)
    try:
        initial = _in_trainer(trainer)
        report = trainer.train()
        final = _in_trainer(trainer)
        return {"report": report, "calls": spy.calls, "initial": initial, "final": final,
                "prompts": [r.prompt_ids for r in trainer.eval_rows], "eos": trainer.inputs.eos_id}
    finally:
        trainer.close()


def run_pp2(rank, world, tiny, evals, run, port):
    trainer = _trainer(tiny, evals, run, port, ["parallel.pp=2", "rollout.mode=dedicated"])
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from test_train_eval import hf_greedy_answers
    tmp = tmp_path_factory.mktemp("eval_engine")
    tiny = tiny_inputs(tmp / "tiny")
    evals = tmp / "own_greedy.jsonl"
    hf_greedy_answers(tiny, evals, per_domain=24)
    return tmp, tiny, evals


@pytest.fixture(scope="module")
def pp1(inputs):
    tmp, tiny, evals = inputs
    return run_ranks(run_pp1, 1, str(tiny), str(evals), str(tmp / "pp1"), _server_port(),
                     timeout=600)[0]


def _logged_evals(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
            for r in rows}


@needs_sglang
def test_eval_runs_greedy_on_the_engine_and_matches_the_in_trainer_greedy(pp1, inputs):
    greedy = [c for c in pp1["calls"] if c["sampling"].temperature == 0]
    rollouts = [c for c in pp1["calls"] if c["sampling"].temperature != 0]
    assert len(rollouts) == 1                      # the one training step's batch
    assert len(greedy) == 3                        # before, periodic (step 1), final
    for c in greedy:
        assert c["n"] == 1 and c["prompts"] == pp1["prompts"]
        assert c["sampling"].max_new_tokens == MAX_NEW
        assert c["sampling"].stop_token_ids == (pp1["eos"],)
    before, periodic, after = (c["tokens"] for c in greedy)
    (tok0, acc0), (tok1, acc1) = pp1["initial"], pp1["final"]
    report = pp1["report"]
    # The engine's greedy answers are the in-trainer sampler's for the weights it holds:
    # before training the starting student's; after the step (periodic, final) the synced ones.
    assert before == tok0 and report["before"]["student"] == acc0
    assert periodic == after == tok1 and report["after"]["student"] == acc1
    assert tok1 != tok0                            # the step moved the answers
    assert min(acc0.values()) >= 0.95              # its own greedy answers
    assert _logged_evals(inputs[0] / "pp1")[1] == acc1
    # pp = 1: the teachers are measured in the trainer, on their own domains.
    assert set(report["before"]["teacher:caesar"]) == {"caesar"}
    assert set(report["before"]["teacher:reversal"]) == {"reversal"}


@needs_sglang
def test_pp2_gets_the_eval_on_the_engine(pp1, inputs, capfd):
    tmp, tiny, evals = inputs
    capfd.readouterr()
    reports = run_ranks(run_pp2, 2, str(tiny), str(evals), str(tmp / "pp2"), _server_port(),
                        timeout=600)
    out = capfd.readouterr().out
    first = reports[0]
    # Before this item pp > 1 returned {}: now the student is evaluated, and scores what the
    # pp = 1 in-trainer sampler scores on the same starting weights.
    assert first["before"] == {"student": pp1["initial"][1]}
    assert set(first["after"]["student"]) == {"caesar", "reversal"}
    assert _logged_evals(tmp / "pp2")[1] == first["after"]["student"]   # periodic == final
    assert reports[1]["before"] == reports[1]["after"] == {"student": {}}  # rank 0 scores
    # No silent skip: the teachers' absence is said once, with the reason.
    assert out.count("eval: teacher accuracy is not measured: parallel.pp=2: ") == 1, out[-3000:]
