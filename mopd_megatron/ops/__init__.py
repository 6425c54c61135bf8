"""Fused vocab-parallel MOPD loss.

Public API (other modules and external checks call exactly these):
- ``token_logprobs(logits, targets, tp_group=None)``: log pi(y_t) [T] fp32 from vocab-parallel
  logits [T, V_local], differentiable w.r.t. the logits.
- ``mopd_loss(logits, targets, rollout_logprobs, teacher_logprobs, orm_advantages, loss_mask,
  seq_ids, eps_low, eps_high, alpha, tp_group=None, ...)``: (scalar loss, detached metrics).
- ``score_logprobs(logits, targets, tp_group=None)``: the teachers' forward-only path (no
  saved tensors, no autograd graph), same kernel.
- ``reverse_kl(student_logits, teacher, tp_group=None, ...)``: exact per-position
  KL(pi_theta || pi_teacher) [T] fp32 from vocab-parallel student and teacher logit shards
  (teacher: a tensor or a rows callable such as ``lm_head_logits(hidden, weight)``);
  ``topk_reverse_kl(student_logits, topk_ids, topk_logprobs, tp_group=None, ...)``: the same
  over the teacher's top-k tokens plus one tail bucket (``ops/vocab_parallel_kl.py``).
"""
from __future__ import annotations

import torch

from .mopd_loss import AGGREGATIONS, IS_VARIANTS, mopd_loss
from .vocab_parallel_kl import lm_head_logits, reverse_kl, topk_reverse_kl
from .vocab_parallel_logprobs import BACKENDS, VocabParallelLogprobs, forward_stats

__all__ = ["token_logprobs", "mopd_loss", "score_logprobs", "reverse_kl", "topk_reverse_kl",
           "lm_head_logits", "AGGREGATIONS", "IS_VARIANTS", "BACKENDS"]


def token_logprobs(logits, targets, tp_group=None, *, return_entropy=False, backend="auto",
                   inplace_grad=False, chunk_tokens=None, block_v=None):
    """log softmax(logits)[targets] over the full (TP-sharded) vocabulary: [T] fp32.

    logits [T, V_local] (fp32/bf16/fp16) hold global ids [rank*V_local, (rank+1)*V_local) of
    ``tp_group``; targets [T] are global ids. ``return_entropy`` also returns the detached
    token entropy [T]. ``inplace_grad`` lets the backward overwrite ``logits`` with the
    gradient. ``backend``: "auto" (Triton on CUDA, PyTorch reference elsewhere), "triton",
    "torch". ``chunk_tokens``/``block_v`` tune the reference chunk and the Triton block.
    """
    logp, ent = VocabParallelLogprobs.apply(logits, targets, tp_group, backend, inplace_grad,
                                            return_entropy, chunk_tokens, block_v)
    return (logp, ent) if return_entropy else logp


@torch.no_grad()
def score_logprobs(logits, targets, tp_group=None, *, return_entropy=False, backend="auto",
                   chunk_tokens=None, block_v=None):
    """Forward-only ``token_logprobs`` for frozen teachers: nothing saved, no graph."""
    _lse, logp, ent = forward_stats(logits, targets, tp_group, backend, return_entropy,
                                    chunk_tokens, block_v)
    return (logp, ent) if return_entropy else logp
