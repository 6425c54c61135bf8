"""Start-up checks that every place the run writes to can be written, without creating it.

A checkpoint directory that is a file used to be found at the first save, after the steps
before it had been trained (and were then lost); a metrics file under a file, at the first log
line. Each output is checked here as the run will use it: an existing directory (or file) must
be one and be writable; a missing one must be creatable, i.e. its nearest existing ancestor is a
writable directory. Nothing is created.
"""
from __future__ import annotations

import os

from ..config import ConfigError, MOPDConfig

__all__ = ["output_problems"]


def _problem(path: str, kind: str) -> str | None:
    """Why the ``kind`` ("dir" or "file") at ``path`` cannot be written, or None."""
    p = os.path.abspath(path)
    if os.path.lexists(p):
        if not os.path.exists(p):
            return "is a broken symbolic link"
        if kind == "dir" and not os.path.isdir(p):
            return "is a file, not a directory"
        if kind == "file" and os.path.isdir(p):
            return "is a directory, not a file"
        need = os.W_OK | os.X_OK if kind == "dir" else os.W_OK
        return None if os.access(p, need) else "is not writable by this user"
    parent = os.path.dirname(p)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable by this user"
    return None


def output_problems(cfg: MOPDConfig) -> list[ConfigError]:
    """Every output path of the recipe that the run could not write, naming its field."""
    outputs = [("checkpoint.dir", cfg.checkpoint.dir, "dir"),
               ("checkpoint.hf_export_dir", cfg.checkpoint.hf_export_dir, "dir"),
               ("logging.jsonl_path", cfg.logging.jsonl_path, "file"),
               ("logging.tensorboard_dir", cfg.logging.tensorboard_dir, "dir"),
               ("rollout.server_log_dir", cfg.rollout.server_log_dir
                if cfg.rollout.engine == "sglang" and cfg.rollout.mode != "external" else None,
                "dir")]  # written only by servers the trainer launches
    out = []
    for field, path, kind in outputs:
        why = _problem(path, kind) if path else None
        if why:
            out.append(ConfigError(field, path, why))
    return out
