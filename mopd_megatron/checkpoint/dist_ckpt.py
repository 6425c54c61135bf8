"""Megatron dist-checkpoint (torch_dist) save/load of model chunks and optimizer state.

The checkpoint is layout-free: it can be loaded at another TP/PP/DP (resharding on load).
Directory commit (atomic rename, latest pointer) is ``checkpoint.steps``'s job.
"""
from __future__ import annotations

import torch

from ..mcore.optimizer import unwrap_ddp

OPTIM_SHARDING = "fully_reshardable"  # loadable at any TP/PP/DP, not just the saving one


def model_sharded_state_dict(chunks: list) -> dict:
    return {f"model{i}": unwrap_ddp(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _call_compat(fn, *args):
    """Call ``fn`` with as many leading ``args`` as this megatron-core release accepts
    (0.16 takes ``(backend, version)``, 0.19 only ``(backend)``)."""
    import inspect
    n = len(inspect.signature(fn).parameters)
    return fn(*args[:n])


def _sharded(chunks, optimizer, is_loading):
    from megatron.core import parallel_state as ps  # noqa: F401  (state must be initialised)
    model_sd = model_sharded_state_dict(chunks)
    state = {"model": model_sd}
    if optimizer is not None:
        flat = {}
        for sd in model_sd.values():
            flat.update(sd)
        state["optimizer"] = optimizer.sharded_state_dict(
            flat, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    return state


def save(path: str, chunks: list, optimizer=None) -> None:
    """Collective: every rank writes its shards of ``chunks`` (and optimizer state) to ``path``."""
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded(chunks, optimizer, False), path,
                            sharded_strategy=_call_compat(get_default_save_sharded_strategy,
                                                          "torch_dist", 1))


def load(path: str, chunks: list, optimizer=None) -> None:
    """Collective: fill ``chunks`` (and the optimizer) from ``path`` in the current layout."""
    from megatron.core import dist_checkpointing
    state = dist_checkpointing.load(_sharded(chunks, optimizer, optimizer is not None), path)
    for i, chunk in enumerate(chunks):
        unwrap_ddp(chunk).load_state_dict(state["model"][f"model{i}"])
    if optimizer is not None:
        # Some load paths copy into views of parameters; autograd must not record that.
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
