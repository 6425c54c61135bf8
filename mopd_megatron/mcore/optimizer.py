"""Megatron DDP wrapping (and unwrapping), the (distributed) optimizer and its LR schedule,
built from the recipe's ``optimizer`` section itself (config.OptimizerConfig): one place for
every default."""
from __future__ import annotations

from . import adamw_fallback


def wrap_ddp(chunks: list, opt) -> list:
    """Wrap each model chunk in Megatron's DistributedDataParallel (contiguous grad buffers);
    ``opt``: the optimizer section (its distributed_optimizer field)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=opt.distributed_optimizer,
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


def unwrap_ddp(chunk):
    """The model inside a chunk that ``wrap_ddp`` wrapped; an unwrapped chunk as it is."""
    return getattr(chunk, "module", chunk)


def megatron_optimizer_config(opt, params_dtype):
    """The optimizer section -> Megatron's OptimizerConfig (Adam with decoupled weight decay)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig
    return OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps,
        clip_grad=opt.clip_grad, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, params_dtype=params_dtype,
        use_distributed_optimizer=opt.distributed_optimizer)


def scheduler_kwargs(opt, total_steps: int) -> dict:
    """OptimizerParamScheduler arguments for ``total_steps`` optimizer steps: warm-up, then the
    section's schedule to min_lr at the last step (wsd: over its last decay_fraction)."""
    return dict(
        init_lr=0.0 if opt.warmup_steps else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=max(total_steps, opt.warmup_steps + 1),
        lr_decay_style="WSD" if opt.schedule == "wsd" else opt.schedule,
        wsd_decay_steps=max(1, round(opt.decay_fraction * total_steps)),
        lr_wsd_decay_style="linear", start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant")


def build_optimizer(ddp_chunks: list, opt, total_steps: int, params_dtype):
    """Megatron optimizer (+ LR scheduler over ``total_steps`` optimizer steps) over
    ``ddp_chunks``, from the optimizer section ``opt``."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    adamw_fallback.apply()
    optimizer = get_megatron_optimizer(megatron_optimizer_config(opt, params_dtype), ddp_chunks)
    ddp_chunks[0].config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_kwargs(opt, total_steps))
    return optimizer, scheduler
