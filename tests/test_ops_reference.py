"""Float64 reference for the ops tests (the other tests/test_ops_*.py import it), plus checks
that the reference itself matches the issue's closed-form gradient.

The reference is deliberately naive: full-vocabulary float64 log_softmax, explicit Python loops
over sequences, autograd for the gradient. It shares no code with mopd_megatron.ops.
"""
from __future__ import annotations

import math

import torch

# Per-dtype tolerances. logp/loss are computed in fp32 from the (bf16-rounded) inputs, so they
# match the float64 value of the same inputs closely; the gradient is stored in the logits'
# dtype, so in bf16 it carries bf16 rounding (2^-8 relative) of the largest element.
TOL = {
    torch.float32: dict(logp=2e-5, loss=1e-5, grad=1e-5),
    torch.bfloat16: dict(logp=2e-5, loss=1e-5, grad=8e-3),
}


def ref_token_logprobs(logits, targets):
    """logits [T, V] (any dtype) -> logp [T], entropy [T] in float64."""
    lsm = torch.log_softmax(logits.double(), dim=-1)
    logp = lsm.gather(1, targets[:, None]).squeeze(1)
    p = lsm.exp()
    entropy = -torch.where(p > 0, p * lsm, 0.0).sum(-1)  # 0 * log 0 = 0
    return logp, entropy


def ref_mopd(logits, targets, rollout, teacher, orm, mask, seq_ids, eps_low, eps_high, alpha,
             aggregation="seq_mean", is_variant="icepop", tis_cap=None):
    """Returns (loss float64 scalar, grad [T, V] float64, metrics dict of python floats)."""
    x = logits.detach().double().requires_grad_(True)
    logp_all, entropy = ref_token_logprobs(x, torch.where(mask.bool(), targets, 0))
    resp = [t for t in range(len(targets)) if bool(mask[t])]
    seqs = {}
    for t in resp:
        seqs.setdefault(int(seq_ids[t]), []).append(t)
    loss = 0.0 * x.sum()  # keeps a (zero) gradient path when there is no response token
    ws, rejected, tterm, logratio = [], 0, [], []
    for toks in seqs.values():
        seq_sum = x.new_zeros(())
        for t in toks:
            lp = logp_all[t]
            ratio = math.exp(lp.item() - float(rollout[t]))
            if is_variant == "icepop":
                inside = eps_low <= ratio <= eps_high
                w, rejected = (ratio if inside else 0.0), rejected + (not inside)
            elif is_variant == "tis":
                cap = eps_high if tis_cap is None else tis_cap
                w, rejected = min(ratio, cap), rejected + (ratio > cap)
            else:
                w = 1.0
            adv = (float(teacher[t]) - lp.item()) + alpha * float(orm[t])
            ws.append(w)
            tterm.append(float(teacher[t]) - lp.item())
            logratio.append(lp.item() - float(rollout[t]))
            term = w * adv * lp
            seq_sum = seq_sum + (term / len(toks) if aggregation == "seq_mean" else term)
        loss = loss + seq_sum
    if resp:
        loss = -loss / (len(seqs) if aggregation == "seq_mean" else len(resp))
    loss.backward()
    n = max(len(resp), 1)
    tmean = sum(tterm) / n
    metrics = {
        "is_weight_mean": sum(ws) / n,
        "is_masked_frac": rejected / n,
        "teacher_term_mean": tmean,
        "teacher_term_std": math.sqrt(sum((v - tmean) ** 2 for v in tterm) / n),
        "reverse_kl": -tmean,
        "train_rollout_logratio": sum(logratio) / n,
        "response_tokens": float(len(resp)),
        "sequences": float(len(seqs)),
        "entropy": sum(entropy[t].item() for t in resp) / n,
    }
    return loss.detach(), x.grad, metrics


def make_batch(T, V, n_seqs, dtype=torch.float32, seed=0, prompt_frac=0.3, noise=0.6):
    """Random packed micro-batch: logits [T, V] (dtype), per-token tensors [T]. Rollout and
    teacher log-probs scatter around the true logp so the IS ratios land on both sides of
    typical bounds (0.5, 2.0)."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    true_lp, _ = ref_token_logprobs(logits, targets)
    rollout = (true_lp + noise * torch.randn(T, generator=g, dtype=torch.float64)).float()
    teacher = (true_lp + torch.randn(T, generator=g, dtype=torch.float64)).float()
    orm = torch.randn(T, generator=g)
    seq_ids = torch.sort(torch.randint(0, n_seqs, (T,), generator=g)).values
    mask = (torch.rand(T, generator=g) > prompt_frac).long()
    return dict(logits=logits, targets=targets, rollout_logprobs=rollout,
                teacher_logprobs=teacher, orm_advantages=orm, loss_mask=mask, seq_ids=seq_ids)


def test_reference_gradient_matches_closed_form():
    """The issue's formula: dL/dx_t = -(w_t A_t / (S |y_s|)) (onehot(y_t) - softmax(x_t))."""
    b = make_batch(29, 13, 4, seed=3)
    eps_low, eps_high, alpha = 0.5, 2.0, 0.7
    loss, grad, _ = ref_mopd(b["logits"], b["targets"], b["rollout_logprobs"],
                             b["teacher_logprobs"], b["orm_advantages"], b["loss_mask"],
                             b["seq_ids"], eps_low, eps_high, alpha)
    lsm = torch.log_softmax(b["logits"].double(), -1)
    expect = torch.zeros_like(grad)
    m = b["loss_mask"].bool()
    seq_len = {int(s): int((m & (b["seq_ids"] == s)).sum()) for s in b["seq_ids"][m].unique()}
    S = len(seq_len)
    for t in range(29):
        if not m[t]:
            continue
        lp = lsm[t, b["targets"][t]].item()
        ratio = math.exp(lp - b["rollout_logprobs"][t].item())
        w = ratio if eps_low <= ratio <= eps_high else 0.0
        A = b["teacher_logprobs"][t].item() - lp + alpha * b["orm_advantages"][t].item()
        onehot = torch.nn.functional.one_hot(b["targets"][t], 13).double()
        expect[t] = -(w * A / (S * seq_len[int(b["seq_ids"][t])])) * (onehot - lsm[t].exp())
    assert torch.allclose(grad, expect, atol=1e-12, rtol=1e-10)
    assert grad.abs().sum() > 0 and loss.isfinite()


def test_make_batch_covers_both_sides_of_is_bounds():
    b = make_batch(400, 17, 5, seed=1)
    lp, _ = ref_token_logprobs(b["logits"], b["targets"])
    ratio = (lp - b["rollout_logprobs"].double()).exp()
    m = b["loss_mask"].bool()
    assert ((ratio < 0.5) & m).any() and ((ratio > 2.0) & m).any()
    assert ((ratio >= 0.5) & (ratio <= 2.0) & m).float().mean() > 0.3
