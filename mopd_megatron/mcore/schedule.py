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


def packed_attention(batch: dict, packed_format: str) -> dict:
    """Model keyword arguments confining attention to each sequence of a packed row
    (trainer/microbatches.py: ``cu_seqlens`` marks the sequences of the one row).

    "thd": Transformer Engine's THD format (PackedSeqParams; RoPE restarts per sequence).
    "mask": an explicit block-diagonal causal mask [1, 1, T, T] (True = masked) for the local
    layer spec, which has no THD path. RoPE there runs over the row's positions, but attention
    scores depend only on the distance between positions, which packing leaves unchanged, so
    each sequence's outputs equal its unpacked ones (tests/test_microbatches.py).
    """
    cu = batch.get("cu_seqlens")
    if cu is None:
        return {"attention_mask": None}
    if packed_format == "thd":
        from megatron.core.packed_seq_params import PackedSeqParams
        return {"attention_mask": None, "packed_seq_params": PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])}
    t = batch["tokens"].shape[1]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device),
                                  (cu[1:] - cu[:-1]).long(), output_size=t)   # [T] segment id
    pos = torch.arange(t, device=cu.device)
    masked = (seg[:, None] != seg[None, :]) | (pos[None, :] > pos[:, None])  # [T, T]
    return {"attention_mask": masked[None, None]}


def _forward_step_func(loss_fn: LossFn, vocab_size: int, tp_rank: int, packed_format: str):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"],
                    **packed_attention(batch, packed_format))  # [b, s, V/tp]

        def loss_func(logits):
            mask_padded_vocab_(logits, vocab_size, tp_rank)
            loss_sum, count, metrics = loss_fn(batch, logits)
            return loss_sum, count.to(torch.int), metrics
        return out, loss_func
    return forward_step


def forward_backward(model_chunks: list, microbatches: list[dict], loss_fn: LossFn, *,
                     vocab_size: int, tp_rank: int, forward_only: bool = False,
                     packed_format: str = "mask") -> list[dict]:
    """Run ``loss_fn`` on every micro-batch; gradients accumulate in the model's grad buffers.

    ``microbatches``: dicts with ``tokens`` and ``position_ids`` ``[b, s]`` plus whatever
    ``loss_fn`` reads, and for packed rows ``cu_seqlens``/``max_seqlen`` (``packed_format``:
    see ``packed_attention``). Shapes may differ between micro-batches when the model config
    has ``variable_seq_lengths`` (models/builder.py sets it whenever pp > 1). ``tp_rank``: this rank's vocabulary
    shard (which padding rows to mask). Returns the per-micro-batch metrics
    dicts on the last pipeline stage and an empty list elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    b, s = microbatches[0]["tokens"].shape
    iterators = [iter(microbatches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=_forward_step_func(loss_fn, vocab_size, tp_rank, packed_format),
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only)
