"""Whether FP8 training (Transformer Engine) can run on this process, and why not."""
from __future__ import annotations

__all__ = ["FP8UnavailableError", "fp8_unavailable_reason", "check_fp8"]


class FP8UnavailableError(RuntimeError):
    pass


def fp8_unavailable_reason() -> str | None:
    """Why FP8 cannot run on this process, or None when it can (TE + Hopper or newer)."""
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (FP8 needs a Hopper or newer GPU)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (9, 0):
        return (f"GPU {torch.cuda.get_device_name()} has compute capability {major}.{minor}; "
                "FP8 needs 9.0 (Hopper) or newer")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no TE
        return f"Transformer Engine is not importable ({type(e).__name__}: {e}); " \
               "install it with `pip install -e .[gpu]`"
    return None


def check_fp8(fp8, field: str = "model.fp8") -> None:
    """Refuse an enabled ``FP8Config`` section with the reason when this machine cannot run it."""
    if not fp8.enabled:
        return
    reason = fp8_unavailable_reason()
    if reason:
        raise FP8UnavailableError(f"{field}.enabled=true but {reason}")
