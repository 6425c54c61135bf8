"""One optimizer step over a list of micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

from .schedule import LossFn, forward_backward


@dataclass
class StepResult:
    ok: bool                 # False when the step was skipped (non-finite gradients)
    grad_norm: float | None
    metrics: list[dict]      # one dict per micro-batch (last pipeline stage only)


def train_step(ddp_chunks: list, optimizer, scheduler, microbatches: list[dict], loss_fn: LossFn,
               *, vocab_size: int, tp_rank: int, packed_format: str = "mask") -> StepResult:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(ddp_chunks, microbatches, loss_fn, vocab_size=vocab_size,
                               tp_rank=tp_rank, packed_format=packed_format)
    ok, grad_norm, _ = optimizer.step()
    if ok and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(ok=bool(ok), grad_norm=None if grad_norm is None else float(grad_norm),
                      metrics=metrics)
