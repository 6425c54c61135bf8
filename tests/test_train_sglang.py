"""The loop with the real SGLang engine on CPU (tests/harness/sglang_cpu): rollouts come from
the server with their log mu, weights are pushed after every update, and the parity probe finds
engine and trainer in agreement."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dist_helpers import free_port, run_ranks
from train_helpers import RECIPE, recipe_overrides, tiny_inputs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                 reason="needs the SGLang CPU harness (tests/harness/sglang_cpu/setup.sh)")]


def train_with_sglang(rank, world, tiny, run, port, async_rollout, steps=3, export="hf"):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    extra = ["rollout.engine=sglang", f"rollout.base_port={port}", f"checkpoint.hf_export_dir={run}/{export}",
             f"model.checkpoint={tiny}/student/hf", "model.checkpoint_format=hf",
             "rollout.parity_interval=1"]
    if async_rollout:  # one-step-off needs engines on their own devices (here: own processes)
        # A large learning rate makes each update move the policy measurably, so stale samples
        # show a train-vs-rollout gap (its expectation is -KL(mu || pi_theta)) well above noise.
        extra += ["train.async_rollout=true", "rollout.mode=dedicated", "optimizer.lr=1e-2",
                  "rollout.parity_interval=2"]
    cfg = load_recipe(RECIPE, recipe_overrides(Path(tiny), Path(run), steps=steps, extra=extra))
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.mark.parametrize("async_rollout", [False, True], ids=["sync", "one_step_off"])
def test_sglang_rollout_weight_sync_and_parity(tmp_path, async_rollout):
    tiny = tiny_inputs(tmp_path / "tiny")
    report = run_ranks(train_with_sglang, 1, str(tiny), str(tmp_path / "run"), free_port(),
                       async_rollout, timeout=600)[0]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # One step off runs with rollout.parity_interval=2: probed after the first sync and every
    # second one; the synchronous run probes after every sync.
    probed = [1, 2] if async_rollout else [1, 2, 3]
    assert [s["step"] for s in steps if "rollout/parity_mean_abs" in s] == probed
    for s in steps:
        # The engine runs the weights the trainer just pushed (fp32 on both sides): log-prob
        # differences are float noise, far below the 0.05-nat default tolerance.
        assert s.get("rollout/parity_mean_abs", 0.0) < 0.01
        assert s["tokens/response"] > 0
        if not async_rollout:
            # Fresh samples from the synced engine: pi_theta / mu is 1 up to the same noise.
            assert abs(s["is/w_mean"] - 1.0) < 0.01 and s["is/masked_frac"] == 0.0
            assert abs(s["rollout/train_minus_rollout_logp"]) < 0.01
    if async_rollout:
        # One step off: steps >= 2 train on samples of the previous weights, so the ratio
        # moves away from 1 (IcePop sees it), while step 1's batch is on-policy.
        assert abs(steps[0]["rollout/train_minus_rollout_logp"]) < 0.01
        assert max(abs(s["rollout/train_minus_rollout_logp"]) for s in steps[1:]) > 1e-3
    # The final student exported as an HF checkpoint equals the final Megatron checkpoint.
    from safetensors.torch import load_file
    from megatron_helpers import read
    hf = {}
    for f in (tmp_path / "run" / "hf").glob("*.safetensors"):
        hf.update(load_file(f))
    mc = read(str(tmp_path / "run" / "ckpt" / "step_3" / "dist"), ["embedding.word_embeddings.weight"])
    emb = mc["embedding.word_embeddings.weight"]
    assert hf["model.embed_tokens.weight"].equal(emb[:hf["model.embed_tokens.weight"].shape[0]])
    if async_rollout:
        # Resume (checkpoint.resume=auto) with a fresh server: the trainer pushes the resumed
        # weights before its first step (probed), and keeps the earlier steps' losses.
        more = run_ranks(train_with_sglang, 1, str(tiny), str(tmp_path / "run"), free_port(),
                         async_rollout, 5, "hf_resumed", timeout=600)[0]
        assert more["losses"][:3] == report["losses"] and len(more["losses"]) == 5
        steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
        assert [s["step"] for s in steps if "rollout/parity_mean_abs" in s] == [1, 2, 4]
