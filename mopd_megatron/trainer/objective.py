"""The student's objective: the MOPD loss (the fused kernel ``ops.mopd_loss``) wrapped as the
loss function Megatron's schedules call (mcore/schedule.py), and the reduction of its metrics.

Megatron (calculate_per_token_loss) divides the gradients by the global ``count`` summed over
micro-batches and data-parallel ranks. ``mopd_loss`` with seq_mean already divides by the
micro-batch's non-empty sequence count S, so loss_sum = loss * S (the sum of per-sequence
means) and count = S give the mean over all sequences of the global batch; token_mean uses
the token count the same way. Micro-batches hold whole sequences, so no sequence is split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import mopd_loss, reverse_kl, token_logprobs, topk_reverse_kl
from ..ops.mopd_loss import importance_weights, loss_metrics, token_normaliser

__all__ = ["make_mopd_loss_fn", "tempered_logits", "LOSS_KEYS", "reduce_microbatch_metrics"]

# Token-weighted means from ops.mopd_loss (averaged over micro-batches and DP ranks by tokens)
# -> the metric names the sinks show.
LOSS_KEYS = {"is_weight_mean": "is/w_mean", "is_masked_frac": "is/masked_frac",
             "teacher_term_mean": "adv/teacher_term_mean", "teacher_term_std": "adv/teacher_term_std",
             "reverse_kl": "kl/all", "train_rollout_logratio": "rollout/train_minus_rollout_logp",
             "entropy": "entropy"}


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[b, s, V/tp] logits -> [b*s, V/tp] logits / T.

    The temperature contract: log mu (the engine's), log pi_theta (the student's, here) and
    log pi_dom (the teachers', ``teachers.score_loss_fn``) are all log softmax(logits / T) at
    the rollout temperature T. The student and the teachers go through this one function, so a
    teacher identical to the student gives exactly log pi_dom = log pi_theta (A = 0) at any T.
    """
    b, s, v = logits.shape
    flat = logits.reshape(b * s, v)
    return flat / temperature if temperature != 1.0 else flat


def make_mopd_loss_fn(loss_cfg, alpha: float, temperature: float, tp_group,
                      vocab_size: int | None = None):
    """``loss_fn(batch, logits[b, s, V/tp]) -> (loss_sum, count, metrics)``; log pi_theta is
    taken at ``temperature``, the one mu sampled at (the teachers are scored at it too).
    ``loss_cfg.signal`` other than "sampled": the KL objective (``kl_objective``), which reads
    the teachers' signal from ``batch["signal"]`` (teachers.TeacherSignal)."""
    if loss_cfg.signal != "sampled":
        return kl_objective(loss_cfg, alpha, temperature, tp_group, vocab_size)

    def loss_fn(batch, logits):
        flat = tempered_logits(logits, temperature)
        loss, m = mopd_loss(
            flat, batch["targets"].reshape(-1), batch["rollout_logp"].reshape(-1),
            batch["teacher_logp"].reshape(-1), batch["orm_adv"].reshape(-1),
            batch["loss_mask"].reshape(-1), batch["seq_ids"].reshape(-1),
            loss_cfg.eps_low, loss_cfg.eps_high, alpha, tp_group,
            aggregation=loss_cfg.aggregation, is_variant=loss_cfg.is_variant,
            tis_cap=loss_cfg.tis_cap, entropy=loss_cfg.log_entropy)
        units = m["sequences"] if loss_cfg.aggregation == "seq_mean" else m["response_tokens"]
        loss_sum = loss * units
        m = dict(m, loss_sum=loss_sum.detach(), units=units)
        return loss_sum, units.to(torch.int), m
    return loss_fn


def kl_objective(loss_cfg, alpha: float, temperature: float, tp_group, vocab_size: int | None):
    """loss.signal = full_vocab | topk: per response token

        l_t = w_t KL_t(pi_theta || pi_dom) - alpha w_t A_ORM log pi_theta(y_t)

    aggregated like the sampled loss (seq_mean: mean over sequences of (1/|y|) sum_t). w_t is
    the IcePop weight of the sampled token (detached), which keeps correcting the mismatch of
    the sampled prefix; the KL's gradient is the exact one over the vocabulary (or the top-k
    buckets), the ORM term's is REINFORCE's. Two passes over the logits (log pi_theta(y_t) and
    the KL), each with its own gradient buffer."""
    def loss_fn(batch, logits):
        flat = tempered_logits(logits, temperature)             # [T, V/tp]
        raw = logits.reshape(flat.shape)                         # the KL ops temper themselves
        sig = batch["signal"]
        mask = batch["loss_mask"].reshape(-1) > 0
        targets = torch.where(mask, batch["targets"].reshape(-1), 0)
        logp = token_logprobs(flat, targets, tp_group)           # [T], pass 1
        pos2slot = torch.full_like(targets, -1)
        pos2slot[batch["resp_pos"]] = batch["resp_slot"]
        slot = pos2slot.clamp(min=0)
        if sig.kind == "full_vocab":                              # pass 2
            kl = reverse_kl(raw, sig.teacher_rows(pos2slot, raw.dtype), tp_group,
                            temperature=temperature, vocab_size=vocab_size, mask=mask)
        else:  # the teacher's top-k log-probs were taken at the same temperature
            kl = topk_reverse_kl(raw, sig.topk_ids[slot], sig.topk_logp[slot], tp_group,
                                 temperature=temperature, vocab_size=vocab_size, mask=mask)
        with torch.no_grad():
            w, rejected = importance_weights(logp, batch["rollout_logp"].reshape(-1), mask,
                                             loss_cfg.is_variant, loss_cfg.eps_low,
                                             loss_cfg.eps_high, loss_cfg.tis_cap)
            norm, n_seqs, n_tokens = token_normaliser(mask, batch["seq_ids"].reshape(-1),
                                                      loss_cfg.aggregation)
            coef = torch.where(mask, w * norm, 0.0)
            orm = alpha * batch["orm_adv"].reshape(-1).float()
            first = mask & torch.isnan(sig.kl[slot])              # kl/<teacher>: first pass
            sig.kl[slot[first]] = kl.detach()[first]
        loss = (coef * kl).sum() - (coef * orm * logp).sum()
        # teacher_term = -KL: adv/teacher_term_* and kl/all describe the exact KL here
        m = loss_metrics(logp.detach(), None, w, rejected, -kl.detach(),
                         batch["rollout_logp"].reshape(-1), mask, n_seqs, n_tokens)
        units = m["sequences"] if loss_cfg.aggregation == "seq_mean" else m["response_tokens"]
        m = dict(m, loss_sum=(loss * units).detach(), units=units)
        return loss * units, units.to(torch.int), m
    return loss_fn


def reduce_microbatch_metrics(per_mb: list[dict], contributes: bool, entropy: bool,
                              extra: dict[str, torch.Tensor] | None = None,
                              extra_keys: list[str] = ()) -> dict[str, float]:
    """All-reduce the last stage's micro-batch metrics over the world, so that every rank (and
    rank 0, which logs) holds the global values. Only ranks with ``contributes`` (last pipeline
    stage, TP rank 0) add their share, so nothing is counted twice.

    ``extra[k]`` = tensor([sum, count]) pairs (e.g. per-domain KL), reduced the same way.
    """
    keys = [k for k in LOSS_KEYS if k != "entropy" or entropy]  # same length on every rank
    vec = torch.zeros(len(keys) + 3 + 2 * len(extra_keys), dtype=torch.float64)
    if contributes:
        for m in per_mb:
            tok = float(m["response_tokens"])
            for j, k in enumerate(keys):
                vec[j] += float(m[k]) * tok
            vec[len(keys)] += tok
            vec[len(keys) + 1] += float(m["loss_sum"])
            vec[len(keys) + 2] += float(m["units"])
        for j, k in enumerate(extra_keys):
            if extra and k in extra:
                vec[len(keys) + 3 + 2 * j: len(keys) + 5 + 2 * j] += extra[k].double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    tok = max(float(vec[len(keys)]), 1.0)
    out = {LOSS_KEYS[k]: float(vec[j]) / tok for j, k in enumerate(keys)}
    out["loss"] = float(vec[len(keys) + 1]) / max(float(vec[len(keys) + 2]), 1.0)
    out["tokens/response"] = float(vec[len(keys)])
    for j, k in enumerate(extra_keys):
        s, c = float(vec[len(keys) + 3 + 2 * j]), float(vec[len(keys) + 4 + 2 * j])
        if c > 0:
            out[k] = s / c
    return out
