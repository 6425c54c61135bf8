"""Masked token cross-entropy: the supervised loss of the step path (supervised warm-up,
smoke runs, the FP8 benchmark, tests). The MOPD objective is trainer/objective.py.

It follows the ``(loss_sum, count, metrics)`` contract of ``mcore.schedule``.
"""
from __future__ import annotations

import torch


def masked_token_ce(batch: dict, logits: torch.Tensor):
    """Cross-entropy of ``batch['labels']`` over tokens where ``batch['loss_mask']`` is 1."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    per_token = vocab_parallel_cross_entropy(logits.float(), batch["labels"])  # [b, s]
    mask = batch["loss_mask"].to(per_token.dtype)
    loss_sum = (per_token * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"loss_sum": loss_sum.detach(), "tokens": count.detach().float()}
