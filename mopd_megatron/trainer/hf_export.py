"""The run's final HF export (``checkpoint.hf_export_dir``): the last committed checkpoint,
converted by every rank together.

Why from the committed checkpoint and not the live model: the files are then exactly what the
offline converter makes of that checkpoint (the same code writes them), so an export cut short
is redone offline with the command printed here, and the run's last step is always saved first
(``Trainer.should_save``).

Why every rank: the converter's plan (which tensor goes in which shard file) depends only on
the checkpoint, so each rank writes every world_size-th shard file on its own, reading only the
tensors of those files. No rank waits on a whole-model conversion by another; the one barrier at
the end waits for the slowest rank's share (about 1/world_size of the model), not for rank 0
alone converting 70B under the process-group timeout.
"""
from __future__ import annotations

import torch.distributed as dist

from ..config import MOPDConfig
from ..runtime import broadcast_object

__all__ = ["export_committed", "offline_command"]


def offline_command(ckpt_dist: str, out: str, hf_config: str | None) -> str:
    cmd = f"mopd convert megatron-to-hf --ckpt {ckpt_dist} --out {out}"
    return cmd + (f" --hf-config {hf_config}" if hf_config else "")


def export_committed(cfg: MOPDConfig, max_shard_mb: float = 2048) -> None:
    """Collective: write ``cfg.checkpoint.hf_export_dir`` from the last committed checkpoint,
    in safetensors files of at most ``max_shard_mb`` (the converter's default)."""
    from ..checkpoint import find_latest
    from ..convert import convert_megatron_to_hf
    from ..convert.hf_io import require_empty_dir
    out, hf_config = cfg.checkpoint.hf_export_dir, cfg.model.hf_config
    rank, world = dist.get_rank(), dist.get_world_size()
    # Rank 0 alone decides what is exported and prepares the directory; every rank hears
    # either the checkpoint or why not, so none is left waiting on a rank that failed.
    shared: tuple = (None, None)
    if rank == 0:
        latest = find_latest(cfg.checkpoint.dir, cleanup=False)
        try:
            if latest is None:
                raise FileNotFoundError(f"no committed checkpoint in {cfg.checkpoint.dir}")
            require_empty_dir(out)
            shared = (str(latest / "dist"), None)
        except OSError as e:
            shared = (None, f"checkpoint.hf_export_dir={out}: {e}")
    src, error = broadcast_object(shared)
    if error is not None:
        raise RuntimeError(error)
    convert_megatron_to_hf(src, out, hf_config=hf_config, max_shard_mb=max_shard_mb,
                           part=(rank, world))
    dist.barrier()  # the directory is complete only when every rank's files are
    if rank == 0:
        print(f"exported the student ({src}) as an HF checkpoint to {out}; the same files "
              f"offline: {offline_command(src, out, hf_config)}", flush=True)
