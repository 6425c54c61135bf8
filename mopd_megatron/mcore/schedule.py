"""Forward/backward over micro-batches through Megatron's own pipeline schedules.

Loss functions return ``(loss_sum, count, metrics)``: the sum of the per-unit losses of the
micro-batch and how many units (sequences or tokens) it holds. The config sets
``calculate_per_token_loss``, so Megatron divides the gradients by the global count summed over
micro-batches and data-parallel ranks: the loss is normalised over the whole global batch, not
averaged micro-batch by micro-batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models.builder import mask_padded_vocab_

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def _forward_step_func(loss_fn: LossFn, vocab_size: int, tp_rank: int):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], attention_mask=None)  # [b, s, V/tp]

        def loss_func(logits):
            mask_padded_vocab_(logits, vocab_size, tp_rank)
            loss_sum, count, metrics = loss_fn(batch, logits)
            return loss_sum, count.to(torch.int), metrics
        return out, loss_func
    return forward_step


def forward_backward(model_chunks: list, microbatches: list[dict], loss_fn: LossFn, *,
                     vocab_size: int, tp_rank: int, forward_only: bool = False) -> list[dict]:
    """Run ``loss_fn`` on every micro-batch; gradients accumulate in the model's grad buffers.

    ``microbatches``: dicts with ``tokens`` and ``position_ids`` ``[b, s]`` plus whatever
    ``loss_fn`` reads; all micro-batches share one shape. ``tp_rank``: this rank's vocabulary
    shard (which padding rows to mask). Returns the per-micro-batch metrics
    dicts on the last pipeline stage and an empty list elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    b, s = microbatches[0]["tokens"].shape
    iterators = [iter(microbatches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=_forward_step_func(loss_fn, vocab_size, tp_rank),
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only)
