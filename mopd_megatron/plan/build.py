"""What the run will build, resolved from the recipe without building it: the student's
Megatron ``TransformerConfig`` through the same function the trainer calls
(models/builder.py::transformer_config), from the HF ``config.json`` or, without the model's
files, the known architecture. ``mopd train --dry-run`` and ``slurm/launch.sh --dry-run`` print
it, so what they show is what the run gets.
"""
from __future__ import annotations

from ..config import MOPDConfig
from .arch import resolve_hf_config

__all__ = ["MEGATRON_FIELDS", "student_transformer_config", "describe_build"]

# The TransformerConfig fields the recipe decides (model.dtype, model.fp8.*, parallel.*).
MEGATRON_FIELDS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel", "overlap_p2p_comm",
    "batch_p2p_comm", "variable_seq_lengths", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "params_dtype", "fp8", "fp8_recipe", "fp8_param", "first_last_layers_bf16",
    "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


def student_transformer_config(cfg: MOPDConfig):
    """(TransformerConfig of the student, where its architecture came from). Allocates nothing
    and needs no process group or GPU."""
    from ..models.builder import transformer_config
    hf, source = resolve_hf_config(cfg.model.hf_config, "student")
    return transformer_config(hf, cfg.parallel, dtype=cfg.model.dtype, fp8=cfg.model.fp8), source


def describe_build(cfg: MOPDConfig) -> str:
    """The resolved Megatron fields, one block, and whether FP8 can run on this machine."""
    from ..models.fp8 import fp8_unavailable_reason
    from .arch import PlanError
    try:
        tc, source = student_transformer_config(cfg)
    except PlanError as e:  # no config.json here and not a known architecture
        return f"megatron   not resolved on this machine: {e}"
    fields = {f: getattr(tc, f) for f in MEGATRON_FIELDS}
    if not tc.fp8:  # FP8's companions mean nothing without it; Megatron ignores them then
        for f in ("fp8_recipe", "fp8_param", "first_last_layers_bf16",
                  "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            fields.pop(f)
    shown = "  ".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in fields.items())
    lines = [f"megatron   TransformerConfig of the student ({tc.num_layers} layers, hidden "
             f"{tc.hidden_size}; architecture from {source}):", f"           {shown}"]
    if tc.fp8:
        reason = fp8_unavailable_reason()
        lines.append(f"fp8        cannot run on this machine: {reason}" if reason else
                     "fp8        can run on this machine")
    return "\n".join(lines)
