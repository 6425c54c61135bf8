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

from ..models.hf_config import HFModelConfig, load_hf_config

KNOWN_CONFIGS = Path(__file__).with_name("known_configs.json")


class PlanError(ValueError):
    """The planner cannot size this recipe (unknown architecture, impossible layout)."""


def known_configs() -> dict[str, dict]:
    data = json.loads(KNOWN_CONFIGS.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


@dataclass(frozen=True)
class ArchSpec:
    """A dense decoder's shape. a = heads, g = KV groups, d = head dim, f = FFN width."""

    vocab: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    source: str = "<spec>"

    @classmethod
    def from_hf(cls, cfg: HFModelConfig, source: str) -> "ArchSpec":
        return cls(vocab=cfg.vocab_size, layers=cfg.num_layers, hidden=cfg.hidden_size,
                   ffn=cfg.ffn_hidden_size, heads=cfg.num_attention_heads,
                   kv_heads=cfg.num_query_groups, head_dim=cfg.kv_channels,
                   tied=cfg.tie_word_embeddings, qkv_bias=cfg.qkv_bias,
                   qk_norm=cfg.qk_layernorm, source=source)

    # --- parameter counts -------------------------------------------------------------------
    def layer_sharded(self) -> int:
        """Per-layer parameters split by tensor parallelism (linear weights and qkv biases)."""
        h, a, g, d = self.hidden, self.heads, self.kv_heads, self.head_dim
        attn = h * a * d + 2 * h * g * d + a * d * h          # q, k, v, o projections
        bias = (a * d + 2 * g * d) if self.qkv_bias else 0
        mlp = 3 * h * self.ffn                                 # gate, up, down (SwiGLU)
        return attn + bias + mlp

    def layer_replicated(self) -> int:
        """Per-layer parameters every TP rank holds whole (RMSNorm weights)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def embedding(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        out = 0 if self.tied else self.embedding()
        return (self.layers * (self.layer_sharded() + self.layer_replicated())
                + self.embedding() + out + self.hidden)

    def stage_params(self, stage: int, tp: int, pp: int) -> float:
        """Parameters held by one GPU of pipeline stage ``stage`` (0-based) at TP=tp, PP=pp.

        Layers split evenly; the first stage holds the input embedding, the last the output
        layer and final norm (with tied embeddings and PP>1 the last stage keeps its own copy,
        as Megatron does). Vocab-parallel embeddings divide by TP.
        """
        per_stage = self.layers // pp
        n = per_stage * (self.layer_sharded() / tp + self.layer_replicated())
        if stage == 0:
            n += self.embedding() / tp
        if stage == pp - 1:
            n += self.hidden
            if not self.tied or pp > 1:
                n += self.embedding() / tp
        return n

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """KV cache of one token over all layers (K and V), whole model."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_elem


def layout_problems(arch: ArchSpec, tp: int, pp: int, vpp: int | None,
                    what: str) -> list[tuple[str, int, str]]:
    """(field, value, reason) of every way Megatron cannot split this model at TP x PP (x VPP):
    TransformerConfig refuses heads or KV groups not divisible by TP, the column-parallel MLP
    an FFN width not divisible by TP, and the transformer block layers not divisible by the
    pipeline chunks (no uneven split is configured). The vocabulary is padded, never refused."""
    out = []
    chunks = pp * (vpp or 1)
    if arch.layers % chunks:
        out.append(("parallel.pp", pp, f"{f'x parallel.vpp={vpp} ' if vpp else ''}must divide "
                    f"the {arch.layers} layers of the {what} ({arch.source})"))
    if arch.heads % tp or arch.kv_heads % tp:
        out.append(("parallel.tp", tp, f"must divide the {arch.heads} attention heads and the "
                    f"{arch.kv_heads} KV groups of the {what} ({arch.source})"))
    if arch.ffn % tp:
        out.append(("parallel.tp", tp, f"must divide the FFN width {arch.ffn} of the {what} "
                    f"({arch.source})"))
    return out


def check_layout(arch: ArchSpec, tp: int, pp: int, vpp: int | None, what: str) -> None:
    """Refuse layouts Megatron cannot build, naming the field to change."""
    for field, value, reason in layout_problems(arch, tp, pp, vpp, what)[:1]:
        raise PlanError(f"{field}={value} {reason}")


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
    return ArchSpec.from_hf(*resolve_hf_config(hf_dir, what))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ArchSpec", "PlanError", "resolve_arch", "resolve_hf_config", "check_layout",
           "layout_problems", "known_configs", "ceil_div"]
