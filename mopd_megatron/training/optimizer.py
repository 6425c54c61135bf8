"""Megatron DDP wrapping, the (distributed) optimizer and its LR schedule."""
from __future__ import annotations

from dataclasses import dataclass

from . import adamw_fallback


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with gradient clipping, linear warm-up then constant/cosine decay."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 1
    decay_style: str = "constant"  # constant | linear | cosine | wsd
    wsd_decay_steps: int = 1  # wsd: the last steps, over which the LR decays linearly
    distributed: bool = True  # shard optimizer state over data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


def wrap_ddp(chunks: list, settings: OptimSettings) -> list:
    """Wrap each model chunk in Megatron's DistributedDataParallel (contiguous grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather and settings.distributed,
        use_distributed_optimizer=settings.distributed,
        average_in_collective=False,  # the loss is normalised by global counts instead
    )
    from megatron.core.distributed import finalize_model_grads
    # Grad all-reduce over DP, tied-embedding sync over PP and the division by the global
    # loss count happen here, after the last micro-batch's backward.
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk starts its buckets' reduce early (Megatron-LM does the same).
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                               module=chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def build_optimizer(ddp_chunks: list, settings: OptimSettings, params_dtype):
    """Megatron optimizer (+ LR scheduler) over ``ddp_chunks``, with grad hooks installed."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    adamw_fallback.apply()
    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr,
        weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps, clip_grad=settings.clip_grad,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=settings.distributed,
        overlap_param_gather=settings.overlap_param_gather and settings.distributed)
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    model_config = ddp_chunks[0].config
    model_config.grad_scale_func = optimizer.scale_loss
    if settings.overlap_grad_reduce:
        model_config.no_sync_func = [c.no_sync for c in ddp_chunks]
        if len(ddp_chunks) == 1:
            model_config.no_sync_func = model_config.no_sync_func[0]
        model_config.grad_sync_func = [c.start_grad_sync for c in ddp_chunks]
        if len(ddp_chunks) == 1:
            model_config.grad_sync_func = model_config.grad_sync_func[0]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(settings.decay_steps, settings.warmup_steps + 1),
        lr_decay_style="WSD" if settings.decay_style == "wsd" else settings.decay_style,
        wsd_decay_steps=settings.wsd_decay_steps, lr_wsd_decay_style="linear",
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    return optimizer, scheduler
