"""Process start-up: distributed init, Megatron parallel state, seeding, CPU compatibility.

Nothing outside this package deals with device plumbing: the rest of the code asks
``runtime.device()`` where to put tensors and receives process groups as arguments.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import cpu_compat
from .distributed import (LaunchEnv, backend, broadcast_object, device, free_port, init_distributed,
                          launch_env)
from .versions import MCORE_VERSION, have_transformer_engine, mcore_at_least

__all__ = ["Layout", "init_runtime", "set_seed", "device", "backend", "launch_env", "LaunchEnv",
           "free_port",
           "init_distributed", "broadcast_object", "MCORE_VERSION", "mcore_at_least", "have_transformer_engine",
           "shutdown", "cpu_compat"]


@dataclass(frozen=True)
class Layout:
    """This rank's place in the TP x PP x DP grid and on its node, with the process groups.

    Code that communicates takes the group it needs from here, passed as an argument; nothing
    below the trainer reads Megatron's global parallel state for a group.
    """

    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    node_rank: int = 0            # the node (torchrun agent, Slurm node) this rank runs on
    nodes: int = 1
    local_rank: int = 0           # rank within the node
    local_world_size: int = 1     # ranks on this node
    node_ranks: tuple[int, ...] = (0,)  # global ranks of this node, ascending
    tp_group: Any = field(default=None, compare=False, repr=False)
    pp_group: Any = field(default=None, compare=False, repr=False)
    dp_group: Any = field(default=None, compare=False, repr=False)
    node_group: Any = field(default=None, compare=False, repr=False)

    @property
    def tp_group_or_none(self):
        """The TP group, or None at TP=1 (the ops' single-rank fast path)."""
        return self.tp_group if self.tp > 1 else None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def node_leader(self) -> int:
        """Global rank of this node's local rank 0 (it drives the node's engines)."""
        return self.node_ranks[0]


def _node_groups(node_rank: int, timeout_minutes: int):
    """(node group, global ranks of this node, number of nodes). Every rank creates every
    node's group in the same order (torch.distributed requires it); membership comes from each
    rank's own launcher variables, so two torchrun agents on one host are two nodes."""
    import datetime

    import torch.distributed as dist
    world = dist.get_world_size()
    nodes = [None] * world
    dist.all_gather_object(nodes, node_rank)
    mine, group = (), None
    for n in sorted(set(nodes)):
        ranks = [r for r, x in enumerate(nodes) if x == n]
        # new_group does not inherit the default group's timeout: it takes torch's default.
        g = dist.new_group(ranks, timeout=datetime.timedelta(minutes=timeout_minutes))
        if n == node_rank:
            mine, group = tuple(ranks), g
    return group, mine, len(set(nodes))


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


def init_runtime(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
                 timeout_minutes: int = 30) -> Layout:
    """Start torch.distributed (if needed) and Megatron's parallel state for TP x PP x DP;
    every group gets the collective timeout ``timeout_minutes`` (runtime.timeout_minutes)."""
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    le = init_distributed(timeout_minutes)
    if le.world_size % (tp * pp):
        raise ValueError(f"parallel.tp * parallel.pp = {tp} * {pp} does not divide the world "
                         f"size {le.world_size}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp,
                                 distributed_timeout_minutes=timeout_minutes)
    set_seed(seed)
    node_group, node_ranks, nodes = _node_groups(le.node_rank, timeout_minutes)
    return Layout(tp=tp, pp=pp, dp=ps.get_data_parallel_world_size(), vpp=vpp,
                  tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), rank=le.rank, world_size=le.world_size,
                  node_rank=le.node_rank, nodes=nodes, local_rank=node_ranks.index(le.rank),
                  local_world_size=len(node_ranks), node_ranks=node_ranks,
                  tp_group=ps.get_tensor_model_parallel_group(),
                  pp_group=ps.get_pipeline_model_parallel_group(),
                  dp_group=ps.get_data_parallel_group(), node_group=node_group)


def shutdown() -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
