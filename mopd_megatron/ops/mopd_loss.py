"""The MOPD surrogate loss on top of the fused vocab-parallel log-prob op.

MiMo-V2-Flash s4.4 (eq. 7-9), per response token t of sequence s (loss_mask = 1):
    ratio_t = exp(logp_t - rollout_logp_t)
    w_t     = ratio_t if eps_low <= ratio_t <= eps_high else 0        (IcePop; no gradient)
    A_t     = (teacher_logp_t - logp_t) + alpha * orm_adv_t           (no gradient)
    loss    = -(1/S) sum_s (1/|y_s|) sum_{t in s} w_t A_t logp_t
    dloss/dlogits_t = -(w_t A_t / (S |y_s|)) (onehot(y_t) - softmax(logits_t))

w_t, A_t and the normaliser are per-token scalars: they are computed on [T] vectors after the
fused pass, folded into one detached coefficient c_t, and the only gradient path is
loss = -sum_t c_t logp_t. So the logits gradient is written by the op's single backward pass
(in place when allowed) and masked or IS-rejected tokens get exactly c_t = 0.

All reductions (S, |y_s|, the token count, the metrics) run over the tokens passed in, i.e.
the local micro-batch: a sequence split across micro-batches is normalised per piece.
"""
from __future__ import annotations

import math

import torch

from .vocab_parallel_logprobs import VocabParallelLogprobs

AGGREGATIONS = ("seq_mean", "token_mean")
IS_VARIANTS = ("icepop", "tis", "none")
_PER_TOKEN_ARGS = ("targets", "rollout_logprobs", "teacher_logprobs", "orm_advantages",
                   "loss_mask", "seq_ids")


def _check_args(logits, per_token: dict, eps_low, eps_high, alpha, aggregation, is_variant,
                tis_cap):
    T = logits.shape[0] if logits.dim() == 2 else None
    for name, t in per_token.items():
        if not isinstance(t, torch.Tensor) or t.shape != (T,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape [{T}] (one value per token of logits "
                             f"{tuple(logits.shape)}), got {shape}")
    if per_token["seq_ids"].is_floating_point():
        raise ValueError(f"seq_ids: expected integer ids, got {per_token['seq_ids'].dtype}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    if is_variant not in IS_VARIANTS:
        raise ValueError(f"is_variant={is_variant!r}: expected one of {IS_VARIANTS}")
    if is_variant == "icepop" and not (0.0 <= eps_low <= eps_high):
        raise ValueError(f"eps_low={eps_low}, eps_high={eps_high}: IcePop needs "
                         "0 <= eps_low <= eps_high (bounds on the ratio pi/mu)")
    cap = eps_high if tis_cap is None else tis_cap
    if is_variant == "tis" and not cap > 0:
        raise ValueError(f"tis_cap={cap}: TIS clips min(ratio, C) and needs C > 0")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha}: must be finite")


def importance_weights(logp, rollout_logp, mask, is_variant, eps_low, eps_high, tis_cap=None):
    """Detached w [T] and the boolean 'rejected/clipped by the IS bounds' [T]."""
    ratio = torch.exp(logp - rollout_logp.float())
    if is_variant == "icepop":
        inside = (ratio >= eps_low) & (ratio <= eps_high)
        return torch.where(inside, ratio, 0.0), mask & ~inside
    if is_variant == "tis":
        cap = eps_high if tis_cap is None else tis_cap
        return ratio.clamp(max=cap), mask & (ratio > cap)
    return torch.ones_like(ratio), torch.zeros_like(mask)


def token_normaliser(mask, seq_ids, aggregation):
    """Per-token weight 1/(S |y_s|) ("seq_mean") or 1/N ("token_mean"); 0 off the mask and
    finite when nothing is left (S = 0). Returns (norm [T], S, N)."""
    maskf = mask.float()
    n_tokens = maskf.sum()
    uniq, inv = torch.unique(seq_ids, return_inverse=True)  # [T] dense sequence index
    counts = torch.zeros(uniq.numel(), device=mask.device)
    counts.index_add_(0, inv, maskf)  # |y_s|, 0 for sequences with no response token
    n_seqs = (counts > 0).sum().float()
    if aggregation == "seq_mean":
        norm = 1.0 / (n_seqs.clamp(min=1) * counts[inv].clamp(min=1))
    else:
        norm = (1.0 / n_tokens.clamp(min=1)).expand_as(maskf)
    return torch.where(mask, norm, 0.0), n_seqs, n_tokens


def _masked_mean(x, maskf, n):
    return (torch.where(maskf > 0, x, 0.0)).sum() / n.clamp(min=1)


def loss_metrics(logp, entropy, w, rejected, teacher_term, rollout_logp, mask, n_seqs, n_tokens):
    """Detached scalars over the masked response tokens (0 when there are none)."""
    maskf = mask.float()
    tt_mean = _masked_mean(teacher_term, maskf, n_tokens)
    tt_var = _masked_mean((teacher_term - tt_mean) ** 2, maskf, n_tokens)
    out = {
        "is_weight_mean": _masked_mean(w, maskf, n_tokens),
        "is_masked_frac": rejected.float().sum() / n_tokens.clamp(min=1),
        "teacher_term_mean": tt_mean,
        "teacher_term_std": tt_var.sqrt(),
        "reverse_kl": _masked_mean(-teacher_term, maskf, n_tokens),
        "train_rollout_logratio": _masked_mean(logp - rollout_logp.float(), maskf, n_tokens),
        "response_tokens": n_tokens,
        "sequences": n_seqs,
    }
    if entropy is not None:
        out["entropy"] = _masked_mean(entropy, maskf, n_tokens)
    return {k: v.detach() for k, v in out.items()}


def mopd_loss(logits, targets, rollout_logprobs, teacher_logprobs, orm_advantages, loss_mask,
              seq_ids, eps_low, eps_high, alpha, tp_group=None, *, aggregation="seq_mean",
              is_variant="icepop", tis_cap=None, entropy=False, backend="auto",
              inplace_grad=False, chunk_tokens=None, block_v=None):
    """MOPD loss from vocab-parallel logits [T, V_local]; every other argument is [T].

    Returns (scalar fp32 loss differentiable w.r.t. logits, dict of detached 0-dim metrics).
    Options: aggregation "seq_mean" (MiMo, default) | "token_mean"; is_variant "icepop"
    (default) | "tis" (w = min(ratio, tis_cap), tis_cap defaults to eps_high) | "none" (w = 1);
    entropy=True adds the mean token entropy from the same pass; inplace_grad=True lets the
    backward overwrite ``logits`` with its gradient (no extra [T, V_local] buffer).
    Tokens with loss_mask = 0 may carry any target id (they are scored as id 0 and ignored).
    """
    per_token = dict(zip(_PER_TOKEN_ARGS, (targets, rollout_logprobs, teacher_logprobs,
                                           orm_advantages, loss_mask, seq_ids)))
    _check_args(logits, per_token, eps_low, eps_high, alpha, aggregation, is_variant, tis_cap)
    mask = loss_mask.bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))  # e.g. -100 padding
    logp, ent = VocabParallelLogprobs.apply(logits, safe_targets, tp_group, backend,
                                            inplace_grad, entropy, chunk_tokens, block_v)
    with torch.no_grad():
        w, rejected = importance_weights(logp, rollout_logprobs, mask, is_variant, eps_low,
                                         eps_high, tis_cap)
        teacher_term = teacher_logprobs.float() - logp  # [T]
        advantage = teacher_term + alpha * orm_advantages.float()
        norm, n_seqs, n_tokens = token_normaliser(mask, seq_ids, aggregation)
        # where(), not a product: off-mask rollout/teacher values may be garbage or NaN.
        coef = torch.where(mask, w * advantage * norm, 0.0)  # [T] detached
    loss = -(coef * logp).sum()
    metrics = loss_metrics(logp.detach(), ent if entropy else None, w, rejected, teacher_term,
                           rollout_logprobs, mask, n_seqs, n_tokens)
    return loss, metrics
