"""Student model and teacher pool sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import ConfigError, check, doc

__all__ = ["FP8Config", "ModelConfig", "TeacherConfig"]


@dataclass
class FP8Config:
    """FP8 training through Transformer Engine (GPU only; refused at start where it cannot run).

    Each field maps onto the Megatron ``TransformerConfig`` field of the same meaning
    (models/builder.py::fp8_transformer_kwargs is the one place that maps them)."""

    SECTION: ClassVar[str] = "model.fp8"

    enabled: bool = doc(False, "Train the student's linear layers in FP8 (needs Transformer Engine "
                               "and a Hopper or newer GPU). Teachers score in model.dtype.")
    format: Literal["e4m3", "hybrid"] = doc(
        "hybrid", "e4m3 everywhere, or hybrid: e4m3 forward, e5m2 gradients (TransformerConfig.fp8).")
    recipe: Literal["delayed", "tensorwise", "blockwise"] = doc(
        "tensorwise", "Scaling recipe (TransformerConfig.fp8_recipe): tensorwise (current scaling), "
                      "blockwise (1x128 / 128x128 scales), delayed (amax history; cannot keep "
                      "first/last layers in BF16).")
    param: bool = doc(False, "Keep the student's GEMM weights in FP8 (TransformerConfig.fp8_param): "
                             "less memory, and FP8 all-gathers with the distributed optimizer.")
    first_last_layers_bf16: bool = doc(
        True, "Keep the first/last transformer layers in BF16 (they are the most FP8-sensitive).")
    num_layers_at_start_in_bf16: int = doc(1, "Layers kept in BF16 at the start of the stack.")
    num_layers_at_end_in_bf16: int = doc(1, "Layers kept in BF16 at the end of the stack.")

    def __post_init__(self):
        check(self.num_layers_at_start_in_bf16 >= 0, self, "num_layers_at_start_in_bf16", "must be >= 0")
        check(self.num_layers_at_end_in_bf16 >= 0, self, "num_layers_at_end_in_bf16", "must be >= 0")
        if self.enabled:
            # Megatron refuses this pair when it builds the model; say so before anything runs.
            check(not (self.first_last_layers_bf16 and self.recipe == "delayed"), self,
                  "first_last_layers_bf16", "delayed scaling cannot keep the first/last layers "
                  "in BF16: use model.fp8.recipe=tensorwise or blockwise, or set this false")


@dataclass
class ModelConfig:
    """The student: its architecture (an HF config) and the weights it starts from."""

    SECTION: ClassVar[str] = "model"

    hf_config: str | None = doc(
        None, "Directory holding the student's HF config.json (architecture). Defaults to "
              "model.checkpoint when that is an HF checkpoint.")
    checkpoint: str | None = doc(
        None, "Initial student weights (HF directory or Megatron dist-checkpoint); not read "
              "when the run resumes from a checkpoint. null starts from random weights (tests "
              "only).")
    checkpoint_format: Literal["hf", "megatron"] = doc(
        "hf", "Format of model.checkpoint. hf: every rank reads its own shards from the "
              "safetensors files; megatron: a torch_dist checkpoint (mopd convert hf-to-megatron).")
    tokenizer: str | None = doc(None, "HF tokenizer directory; defaults to model.hf_config.")
    dtype: Literal["bf16", "fp16", "fp32"] = doc("bf16", "Parameter/compute dtype of the student.")
    fp8: FP8Config = doc(help="FP8 settings (see model.fp8.*).", factory=FP8Config)

    def __post_init__(self):
        if self.hf_config is None and self.checkpoint is not None and self.checkpoint_format == "hf":
            self.hf_config = self.checkpoint  # an HF checkpoint carries its own config.json
        check(self.hf_config is not None, self, "hf_config",
              "set model.hf_config (the student's HF config directory) or an HF model.checkpoint")
        if self.tokenizer is None:
            self.tokenizer = self.hf_config
        # Megatron's FP8 path keeps master weights and non-FP8 ops in BF16; FP8 on an fp32/fp16
        # model is not a combination Transformer Engine supports for training.
        if self.fp8.enabled and self.dtype != "bf16":
            raise ConfigError("model.dtype", self.dtype, "model.fp8.enabled requires dtype bf16")


@dataclass
class TeacherConfig:
    """One frozen domain teacher. Each teacher scores only the sequences of its domains."""

    SECTION: ClassVar[str] = "teachers[]"

    domains: list[str] = doc(help="Data domains this teacher scores (each domain has exactly one teacher).")
    checkpoint: str = doc(help="Teacher weights: HF directory or Megatron dist-checkpoint.")
    format: Literal["hf", "megatron"] = doc(
        "hf", "Format of the teacher checkpoint (as model.checkpoint_format).")
    hf_config: str | None = doc(
        None, "Teacher HF config directory (architecture); defaults to the checkpoint for HF "
              "checkpoints, required for Megatron checkpoints.")
    name: str | None = doc(None, "Name used in metrics (kl/<name>); defaults to the first domain.")
    offload: bool = doc(False, "Keep the teacher in pinned CPU memory between scoring passes.")

    def __post_init__(self):
        check(len(self.domains) > 0, self, "domains", "a teacher needs at least one domain")
        check(len(set(self.domains)) == len(self.domains), self, "domains", "domain listed twice")
        check(bool(self.checkpoint), self, "checkpoint", "a teacher needs a checkpoint path")
        if self.hf_config is None and self.format == "hf":
            self.hf_config = self.checkpoint
        check(self.hf_config is not None, self, "hf_config",
              "a Megatron-format teacher needs hf_config (its architecture)")
        if self.name is None:
            self.name = self.domains[0]
