"""Atomic checkpoint directories: a crash at any instant leaves the previous checkpoint
complete and selected.

Layout under the checkpoint root::

    step_<N>/             complete checkpoints (each holds MARKER, written last before commit)
    latest                one line, "step_<N>": the most recently committed checkpoint
    tmp.<N>.<pid>/        a save in progress (or a crashed one: removed by find_latest)
    deleting.step_<N>.<pid>/  a pruned checkpoint being removed (same)

A save writes everything into ``tmp.<N>.<pid>``, fsyncs it, renames it to ``step_<N>`` (atomic on
POSIX file systems), then replaces ``latest`` (write a temp file + ``os.replace``). What is in
the directory is the trainer's business: it passes a ``write(tmp_dir)`` callback (Megatron
``dist_checkpointing.save`` on every rank, plus small JSON files for the data position).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["MARKER", "LATEST", "save_atomic", "find_latest", "prune", "step_of", "read_marker"]

MARKER = "mopd_checkpoint.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_of(path: str | Path) -> int:
    """The step number of a ``step_<N>`` directory."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{str(path)!r} is not a step_<N> checkpoint directory")
    return int(m.group(1))


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The completion marker of a checkpoint directory, or None if it is not complete."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("step") == _safe_step(path) else None


def _safe_step(path: str | Path) -> int | None:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` written from this host. Writers on other
    hosts must flush their own files (torch_dist's FileSystemWriter does)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp.{os.getpid()}"
    _write_durable(tmp, name + "\n")
    os.replace(tmp, root / LATEST)  # readers see the old or the new pointer, never half of one
    _fsync_path(root)


def _remove(path: Path) -> None:
    """Rename aside first (atomic), then delete: a crash mid-delete leaves a deleting.* directory
    that find_latest cleans, never a half-deleted step_<N> that looks like a checkpoint."""
    aside = path.parent / f"deleting.{path.name}.{os.getpid()}"
    os.rename(path, aside)
    _fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def save_atomic(root: str | Path, step: int, write: Callable[[Path], None], *, rank: int = 0,
                world_size: int = 1, barrier: Callable[[], None] | None = None,
                share: Callable[[str], str] | None = None, keep_last: int | None = None,
                protect: tuple[str | Path, ...] = (), meta: dict[str, Any] | None = None) -> Path:
    """Save checkpoint ``step`` under ``root`` atomically; returns ``root/step_<step>``.

    Every rank calls this with the same arguments. ``write(tmp_dir)`` runs on every rank and
    writes that rank's part into the shared temporary directory. With ``world_size > 1``,
    ``barrier()`` must synchronise all ranks and ``share(name)`` must return rank 0's ``name``
    on every rank (e.g. ``runtime.broadcast_object``); rank 0 alone creates,
    commits and prunes. ``keep_last`` prunes older checkpoints, never the new one nor ``protect``.
    """
    root = Path(root)
    final = root / f"step_{step}"
    if world_size > 1 and (barrier is None or share is None):
        raise ValueError("save_atomic with world_size > 1 needs barrier and share callables")
    barrier = barrier or (lambda: None)
    name = ""
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if read_marker(final) is not None and _pointer_target(root) == final.name:
                raise FileExistsError(f"checkpoint {final} exists and is the selected one; "
                                      "refusing to overwrite it")
            _remove(final)  # an orphan: committed but never selected (crash before `latest`)
        tmp = root / f"tmp.{step}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        name = tmp.name
    if world_size > 1:
        name = share(name)
        barrier()  # the temporary directory exists before anyone writes into it
    tmp = root / name
    write(tmp)
    barrier()      # every rank's files are written
    if rank == 0:
        marker = {"step": step, "time": time.time(), "world_size": world_size, **(meta or {})}
        _write_durable(tmp / MARKER, json.dumps(marker, indent=1))
        _fsync_tree(tmp)
        os.rename(tmp, final)   # the commit: step_<N> appears complete or not at all
        _fsync_path(root)
        _write_pointer(root, final.name)
        if keep_last is not None:
            prune(root, keep_last, protect=(final, *protect))
    barrier()      # nobody moves on (or reads the checkpoint) before it is committed
    return final


def _pointer_target(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _STEP_RE.match(name) else None


def find_latest(root: str | Path, *, cleanup: bool = True) -> Path | None:
    """The checkpoint to resume from, or None.

    The ``latest`` pointer wins when it names a complete checkpoint: it records commit order,
    which differs from step order after a run was resumed from an older checkpoint. Without a
    usable pointer, the highest complete ``step_<N>``. With ``cleanup`` (rank 0 only, before
    any save starts), leftovers of crashed saves and prunes are removed.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    complete: list[Path] = []
    for entry in root.iterdir():
        if entry.name.startswith(("tmp.", "deleting.", f"{LATEST}.tmp.")):
            if cleanup:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        elif entry.is_dir() and _STEP_RE.match(entry.name) and read_marker(entry) is not None:
            complete.append(entry)
    target = _pointer_target(root)
    if target is not None and read_marker(root / target) is not None:
        return root / target
    return max(complete, key=step_of) if complete else None


def prune(root: str | Path, keep_last: int, protect: tuple[str | Path, ...] = ()) -> list[Path]:
    """Delete complete checkpoints beyond the ``keep_last`` highest steps; never one in
    ``protect`` nor the one ``latest`` selects. Returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={keep_last}: must be >= 1")
    root = Path(root)
    keep = {Path(p).resolve() for p in protect}
    target = _pointer_target(root)
    if target is not None:
        keep.add((root / target).resolve())
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)
                    and read_marker(p) is not None), key=step_of, reverse=True)
    removed = []
    for p in steps[keep_last:]:
        if p.resolve() not in keep:
            _remove(p)
            removed.append(p)
    return removed
