"""FP8 training settings (Transformer Engine), validated before any model is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise", "blockwise")


class FP8UnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class FP8Settings:
    """FP8 knobs. ``format``: e4m3 everywhere or hybrid (e4m3 forward, e5m2 gradients);
    ``recipe``: delayed (amax history), tensorwise (current scaling) or blockwise (1x128 / 128x128
    scales, DeepSeek-V3 style); ``bf16_first_last``: keep the first and last layers in bf16."""

    enabled: bool = False
    format: str = "hybrid"
    recipe: str = "tensorwise"
    bf16_first_last: bool = True
    param: bool = False  # keep weights in FP8 (teachers: halves their memory)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"fp8.format={self.format!r}: expected one of {FORMATS}")
        if self.recipe not in RECIPES:
            raise ValueError(f"fp8.recipe={self.recipe!r}: expected one of {RECIPES}")

    def transformer_config_kwargs(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return dict(fp8=self.format, fp8_recipe=self.recipe, fp8_param=self.param,
                    first_last_layers_bf16=self.bf16_first_last and self.recipe != "delayed")


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


def check_fp8(settings: FP8Settings, field: str = "model.fp8") -> None:
    """Refuse FP8 with the reason when this machine cannot run it."""
    if not settings.enabled:
        return
    reason = fp8_unavailable_reason()
    if reason:
        raise FP8UnavailableError(f"{field}.enabled=true but {reason}")
