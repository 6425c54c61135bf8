"""Installed megatron-core version, for gating API differences between releases."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


try:
    MCORE_VERSION = _parse(version("megatron-core"))
except PackageNotFoundError:  # pragma: no cover - megatron-core is a hard dependency
    MCORE_VERSION = (0, 0, 0)


def mcore_at_least(*v: int) -> bool:
    return MCORE_VERSION >= tuple(v)


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports *and* a GPU is present (TE cannot run without)."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError from a broken CUDA install
        return False
    return True
