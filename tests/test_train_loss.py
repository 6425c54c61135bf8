"""The trainer's student update path (packing -> Megatron schedule -> fused MOPD loss ->
global-count normalisation) against a float64 MOPD loss written here from the paper's formula,
forward (loss value) and backward (output-layer gradient)."""
from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks
from megatron_helpers import VOCAB, tiny_config

EPS_LOW, EPS_HIGH, ALPHA = 0.5, 5.0, 0.7


def synthetic_batch(seed=0, prompts=2, n=2):
    """A RolloutBatch with ragged prompts/responses, one empty response, random log mu, A_ORM."""
    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    g = torch.Generator().manual_seed(seed)
    rows, samples = [], []
    for p in range(prompts):
        plen = int(torch.randint(2, 6, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (plen,), generator=g).tolist()
        rows.append(PromptRow("d", "x", None, {}, f"mem:{p}", prompt_ids=prompt))
        for k in range(n):
            rlen = 0 if (p, k) == (1, 1) else int(torch.randint(1, 7, (1,), generator=g))
            resp = torch.randint(3, VOCAB, (rlen,), generator=g).tolist()
            mu = (-torch.rand(rlen, generator=g) * 6).tolist()
            samples.append(Sample(p, k, prompt, resp, mu, "stop", "v"))
    adv = torch.randn(len(samples), generator=g).tolist()
    return RolloutBatch(rows, samples, n, rewards=[0.0] * len(samples), advantages=adv)


def reference_loss(logits64, batch, teacher):
    """-mean_seq (1/|y|) sum_t w_t A_t log pi(y_t), float64, over non-empty sequences."""
    per_seq = []
    for i, s in enumerate(batch.samples):
        if not s.token_ids:
            continue
        P = len(s.prompt_token_ids)
        lp_all = torch.log_softmax(logits64[i, :, :VOCAB], dim=-1)
        ys = torch.tensor(s.token_ids)
        lp = lp_all[torch.arange(P - 1, P - 1 + len(ys)), ys]          # [|y|]
        ratio = torch.exp(lp.detach() - torch.tensor(s.logprobs, dtype=torch.float64))
        w = torch.where((ratio >= EPS_LOW) & (ratio <= EPS_HIGH), ratio, torch.zeros_like(ratio))
        A = (teacher[i][:len(ys)] - lp.detach()) + ALPHA * batch.advantages[i]
        per_seq.append(-(w * A * lp).sum() / len(ys))
    return torch.stack(per_seq).mean()


def check_against_reference(rank, world):
    from types import SimpleNamespace

    from megatron_helpers import build
    from mopd_megatron.config import OptimizerConfig
    from mopd_megatron.mcore.optimizer import wrap_ddp
    from mopd_megatron.mcore.schedule import forward_backward
    from mopd_megatron.trainer.microbatches import pack_microbatches
    from mopd_megatron.trainer.objective import make_mopd_loss_fn
    _, hf, chunks = build(tiny_config("Qwen2ForCausalLM"))
    batch = synthetic_batch()
    g = torch.Generator().manual_seed(7)
    teacher = [(-torch.rand(len(s.token_ids), generator=g) * 4).double() for s in batch.samples]
    # Reference: full-vocab logits of the same weights in float64, autograd for the gradient.
    model = chunks[0]
    L = max(len(s.prompt_token_ids) + len(s.token_ids) for s in batch.samples)
    tokens = torch.zeros(len(batch), L, dtype=torch.long)
    for i, s in enumerate(batch.samples):
        full = s.prompt_token_ids + s.token_ids
        tokens[i, :len(full)] = torch.tensor(full)
    logits = model(tokens, torch.arange(L).expand_as(tokens), attention_mask=None)
    # log mu = model log-prob + noise in [-1.2, 1.2]: ratios both inside and outside the IcePop
    # band [0.5, 5] (|noise| > ln 2 below, > ln 5 above), so masking is exercised.
    with torch.no_grad():
        lp_all = torch.log_softmax(logits.double()[..., :VOCAB], dim=-1)
    for i, s in enumerate(batch.samples):
        P = len(s.prompt_token_ids)
        lp = lp_all[i, torch.arange(P - 1, P - 1 + len(s.token_ids)), torch.tensor(s.token_ids, dtype=torch.long)]
        s.logprobs = (lp + (torch.rand(len(lp), generator=g, dtype=torch.float64) * 2.4 - 1.2)).tolist()
    ref = reference_loss(logits.double(), batch, teacher)
    ref.backward()
    ref_grad = model.output_layer.weight.grad.double().clone()
    model.zero_grad(set_to_none=True)
    # Trainer path: two micro-batches of two sequences, global-count normalisation by Megatron.
    ddp = wrap_ddp(chunks, OptimizerConfig(distributed_optimizer=False))
    mbs = pack_microbatches(batch, list(range(len(batch))), 2, pad_id=0)
    for mb in mbs:
        for r, i in enumerate(mb["index"]):
            pos = mb["loss_mask"][r] > 0
            mb["teacher_logp"][r, pos] = teacher[i].float()
    loss_cfg = SimpleNamespace(signal="sampled", eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation="seq_mean",
                               is_variant="icepop", tis_cap=2.0, log_entropy=False)
    for c in ddp:
        c.zero_grad_buffer()
    out = forward_backward(ddp, mbs, make_mopd_loss_fn(loss_cfg, ALPHA, 1.0, None), vocab_size=VOCAB, tp_rank=0)
    loss = sum(float(m["loss_sum"]) for m in out) / sum(float(m["units"]) for m in out)
    grad = ddp[0].module.output_layer.weight.main_grad.double()
    masked = sum(float(m["is_masked_frac"] * m["response_tokens"]) for m in out)
    return float(ref), loss, float((grad - ref_grad).abs().max()), float(ref_grad.abs().max()), masked


@pytest.mark.slow
def test_student_update_matches_float64_reference():
    ref, loss, gdiff, gscale, masked = run_ranks(check_against_reference, 1)[0]
    assert masked >= 1  # some tokens fell outside the IcePop band
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)   # fp32 model vs float64 formula
    assert gscale > 1e-4 and gdiff <= 1e-5 * max(gscale, 1.0)
