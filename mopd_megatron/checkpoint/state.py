"""Checkpoint contents of a training run, committed atomically by ``steps.save_atomic``.

    step_<N>/dist/               model + optimizer (Megatron torch_dist, reshardable)
    step_<N>/trainer_state.json  step, sampler position, LR schedule, engine position (rank 0)
    step_<N>/rng/rank_<r>.pt     Python / NumPy / torch / Megatron RNG states per rank
    step_<N>/mopd_checkpoint.json  the completion marker (written last by save_atomic)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..runtime import broadcast_object
from . import dist_ckpt, steps

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_resume"]


def _rng_state() -> dict:
    from megatron.core import tensor_parallel
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str, step: int, chunks: list, optimizer, trainer_state: dict,
                    keep_last: int | None, before_commit=None) -> Path:
    """Collective. ``trainer_state`` (JSON-able) is written by rank 0. ``before_commit(tmp)``
    runs on every rank after the files are written and before the commit (tests use it)."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def write(tmp: Path) -> None:
        dist_ckpt.save(str(tmp / "dist"), chunks, optimizer)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if before_commit is not None:
            before_commit(tmp)

    return steps.save_atomic(root, step, write, rank=rank, world_size=world,
                            barrier=dist.barrier, share=broadcast_object, keep_last=keep_last,
                            meta={"format": "mopd-trainer-v1"})


def resolve_resume(cfg) -> Path | None:
    """The checkpoint this run continues from (same answer on every rank), or None."""
    spec, root = cfg.checkpoint.resume, cfg.checkpoint.dir
    path = None
    if dist.get_rank() == 0:
        if spec == "auto":
            path = steps.find_latest(root, cleanup=True) if root else None
        elif spec != "none":
            path = Path(spec)
            if steps.read_marker(path) is None:
                from ..config import ConfigError
                raise ConfigError("checkpoint.resume", spec, "not a complete checkpoint "
                                  f"(no valid {steps.MARKER})")
    path = broadcast_object(str(path) if path else "")
    return Path(path) if path else None


def load_checkpoint(path: Path, chunks: list, optimizer) -> dict[str, Any]:
    """Collective: weights + optimizer + this rank's RNG; returns the trainer state."""
    dist_ckpt.load(str(path / "dist"), chunks, optimizer)
    rng = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng.exists():  # absent when resuming at another world size: seeds restart instead
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
