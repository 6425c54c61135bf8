"""Process start-up: distributed init, Megatron parallel state, seeding, CPU compatibility.

Nothing outside this package deals with device plumbing: the rest of the code asks
``runtime.device()`` where to put tensors and receives process groups as arguments.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from . import cpu_compat
from .distributed import LaunchEnv, backend, device, init_distributed, launch_env
from .versions import MCORE_VERSION, have_transformer_engine, mcore_at_least

__all__ = ["Layout", "init_runtime", "set_seed", "device", "backend", "launch_env", "LaunchEnv",
           "init_distributed", "MCORE_VERSION", "mcore_at_least", "have_transformer_engine",
           "shutdown", "cpu_compat"]


@dataclass(frozen=True)
class Layout:
    """This rank's place in the TP x PP x DP grid."""

    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's per-TP-rank RNG tracker deterministically."""
    from megatron.core import tensor_parallel
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Dropout inside TP regions draws from per-rank streams (seed + 2718 + tp_rank), the rest
    # from the default generator: the same as Megatron-LM, so layouts reproduce each other.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def init_runtime(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234) -> Layout:
    """Start torch.distributed (if needed) and Megatron's parallel state for TP x PP x DP."""
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    le = init_distributed()
    if le.world_size % (tp * pp):
        raise ValueError(f"parallel.tp * parallel.pp = {tp} * {pp} does not divide the world "
                         f"size {le.world_size}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp)
    set_seed(seed)
    return Layout(tp=tp, pp=pp, dp=ps.get_data_parallel_world_size(), vpp=vpp,
                  tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), rank=le.rank, world_size=le.world_size)


def shutdown() -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
