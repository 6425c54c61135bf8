"""Model sizes for the planner: parameter counts per pipeline stage and tensor-parallel rank.

Architecture numbers come from the model's HF ``config.json`` when the directory has one,
otherwise from ``known_configs.json`` (public configs shipped with the package, looked up by the
exact directory name), so a 70B recipe can be planned on a laptop without its weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..models.hf_config import HFModelConfig, layout_problems, load_hf_config

KNOWN_CONFIGS = Path(__file__).with_name("known_configs.json")


class PlanError(ValueError):
    """The planner cannot size this recipe (unknown architecture, impossible layout)."""


def known_configs() -> dict[str, dict]:
    data = json.loads(KNOWN_CONFIGS.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


@dataclass(frozen=True)
class ArchSpec:
    """A dense decoder as the planner counts it: its HF config (models/hf_config.py, whose
    field names the counts read) and where that config came from."""

    hf: HFModelConfig
    source: str = "<spec>"

    # --- parameter counts -------------------------------------------------------------------
    def layer_sharded(self) -> int:
        """Per-layer parameters split by tensor parallelism (linear weights and qkv biases)."""
        c = self.hf
        h, a, g, d = c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels
        attn = h * a * d + 2 * h * g * d + a * d * h          # q, k, v, o projections
        bias = (a * d + 2 * g * d) if c.qkv_bias else 0
        mlp = 3 * h * c.ffn_hidden_size                        # gate, up, down (SwiGLU)
        return attn + bias + mlp

    def layer_replicated(self) -> int:
        """Per-layer parameters every TP rank holds whole (RMSNorm weights)."""
        c = self.hf
        return 2 * c.hidden_size + (2 * c.kv_channels if c.qk_layernorm else 0)

    def embedding(self) -> int:
        return self.hf.vocab_size * self.hf.hidden_size

    def total_params(self) -> int:
        c = self.hf
        out = 0 if c.tie_word_embeddings else self.embedding()
        return (c.num_layers * (self.layer_sharded() + self.layer_replicated())
                + self.embedding() + out + c.hidden_size)

    def stage_params(self, stage: int, tp: int, pp: int) -> float:
        """Parameters held by one GPU of pipeline stage ``stage`` (0-based) at TP=tp, PP=pp.

        Layers split evenly; the first stage holds the input embedding, the last the output
        layer and final norm (with tied embeddings and PP>1 the last stage keeps its own copy,
        as Megatron does). Vocab-parallel embeddings divide by TP.
        """
        c = self.hf
        per_stage = c.num_layers // pp
        n = per_stage * (self.layer_sharded() / tp + self.layer_replicated())
        if stage == 0:
            n += self.embedding() / tp
        if stage == pp - 1:
            n += c.hidden_size
            if not c.tie_word_embeddings or pp > 1:
                n += self.embedding() / tp
        return n

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """KV cache of one token over all layers (K and V), whole model."""
        c = self.hf
        return 2 * c.num_layers * c.num_query_groups * c.kv_channels * bytes_per_elem


def check_layout(arch: ArchSpec, tp: int, pp: int, vpp: int | None, what: str) -> None:
    """Refuse layouts Megatron cannot build (models/hf_config.py::layout_problems), naming the
    field to change."""
    for knob, value, reason in layout_problems(arch.hf, tp, pp, vpp, what, arch.source)[:1]:
        raise PlanError(f"parallel.{knob}={value} {reason}")


def resolve_hf_config(hf_dir: str | None, what: str) -> tuple[HFModelConfig, str]:
    """(the HF config, where it came from): ``config.json`` in ``hf_dir`` if present, else the
    known config of the same directory name (a cluster recipe planned without its files)."""
    if hf_dir is None:
        raise PlanError(f"the {what} has no hf_config directory to read its architecture from")
    cfg_file = os.path.join(hf_dir, "config.json")
    if os.path.isfile(cfg_file):
        return load_hf_config(cfg_file), cfg_file
    name = os.path.basename(os.path.normpath(hf_dir))
    table = known_configs()
    if name in table:
        return load_hf_config(table[name]), f"known config {name!r}"
    raise PlanError(f"the {what}'s hf_config {hf_dir!r} has no config.json and its directory "
                    f"name {name!r} is not a known config ({', '.join(sorted(table))}); point it "
                    "at a directory holding the model's config.json")


def resolve_arch(hf_dir: str | None, what: str) -> ArchSpec:
    return ArchSpec(*resolve_hf_config(hf_dir, what))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ArchSpec", "PlanError", "resolve_arch", "resolve_hf_config", "check_layout",
           "known_configs", "ceil_div"]
