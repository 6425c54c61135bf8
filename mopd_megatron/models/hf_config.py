"""Hugging Face ``config.json`` <-> Megatron ``TransformerConfig`` fields, and the layouts
Megatron can split such a model into.

One table of field pairs serves both directions (model building reads HF -> Megatron, the
converter writes Megatron -> HF); per-architecture entries only name their quirks.
``layout_problems`` is the one divisibility check of a TP x PP (x VPP) layout: start-up, the
memory planner and the converter all ask it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# (HF config field, Megatron TransformerConfig field). Used both ways.
CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"),
    ("rms_norm_eps", "layernorm_epsilon"),
    ("initializer_range", "init_method_std"),
)


@dataclass(frozen=True)
class ArchQuirks:
    """What distinguishes one dense decoder family from another."""

    model_type: str
    qkv_bias: bool = False        # Qwen2: biases on q/k/v projections only
    qk_layernorm: bool = False    # Qwen3: RMSNorm on per-head q and k
    bias_field: str | None = None  # HF field that switches attention biases on (Llama)


ARCHITECTURES: dict[str, ArchQuirks] = {
    "LlamaForCausalLM": ArchQuirks("llama", bias_field="attention_bias"),
    "Qwen2ForCausalLM": ArchQuirks("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchQuirks("qwen3", qk_layernorm=True, bias_field="attention_bias"),
}

# Llama 3.x rope scaling: megatron-core's RotaryEmbedding implements it with these fixed
# constants and a free factor, so other values cannot be represented faithfully.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class HFModelConfig:
    """The subset of an HF config that defines a dense decoder, normalised across families."""

    architecture: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    layernorm_epsilon: float
    init_method_std: float
    rope_theta: float
    rope_scaling_factor: float | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def quirks(self) -> ArchQuirks:
        return ARCHITECTURES[self.architecture]

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Architecture fields of megatron's TransformerConfig (no parallelism, no dtypes)."""
        kw = {mc: getattr(self, mc) for _, mc in CONFIG_FIELDS}
        import torch.nn.functional as F
        # SwiGLU: TransformerConfig's default activation is GELU, which silently gives another
        # model (only hidden_act="silu" is accepted by load_hf_config).
        kw.update(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                  add_bias_linear=False,
                  add_qkv_bias=self.qkv_bias, qk_layernorm=self.qk_layernorm,
                  hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
                  masked_softmax_fusion=False, persist_layer_norm=False,
                  bias_dropout_fusion=False, apply_rope_fusion=False)
        return kw


def _read(source) -> tuple[dict, str]:
    if isinstance(source, dict):
        return dict(source), "<dict>"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), path
    except FileNotFoundError:
        raise FileNotFoundError(f"HF config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def _rope_scaling(raw: dict, where: str) -> float | None:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"{where}: rope_scaling type {kind!r} is not supported "
                                    "(supported: none, 'llama3')")
    for key, expected in _LLAMA3_ROPE_FIXED.items():
        if key in rs and float(rs[key]) != float(expected):
            raise UnsupportedModelError(
                f"{where}: rope_scaling.{key}={rs[key]} is not supported; megatron-core's Llama 3 "
                f"rope scaling fixes it to {expected}")
    return float(rs["factor"])


def load_hf_config(source) -> HFModelConfig:
    """Parse an HF config (directory, config.json path, or dict) of a supported architecture."""
    raw, where = _read(source)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}")
    q = ARCHITECTURES[arch]
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing config fields {missing}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // heads
    if q.bias_field and raw.get(q.bias_field):
        # HF's attention_bias also puts a bias on o_proj; megatron's add_qkv_bias covers q/k/v
        # only (add_bias_linear would add MLP biases as well), so the model cannot be built.
        raise UnsupportedModelError(f"{where}: {q.bias_field}=true is not supported (o_proj "
                                    "bias has no Megatron equivalent without MLP biases)")
    attn_bias = False
    if raw.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={raw['hidden_act']!r} is not supported "
                                    "(supported: 'silu')")
    rope_theta = raw.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
        rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return HFModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(raw.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        layernorm_epsilon=float(raw.get("rms_norm_eps", 1e-6)),
        init_method_std=float(raw.get("initializer_range", 0.02)),
        rope_theta=float(rope_theta),
        rope_scaling_factor=_rope_scaling(raw, where),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=q.qkv_bias or attn_bias,
        qk_layernorm=q.qk_layernorm,
        raw=raw,
    )


def layout_problems(cfg: HFModelConfig, tp: int, pp: int, vpp: int | None, what: str,
                    source: str) -> list[tuple[str, int, str]]:
    """(knob, value, reason) of every way Megatron cannot split this model at TP x PP (x VPP);
    knob is "tp" or "pp", each caller names it its own way (``parallel.tp``, ``--tp``).
    TransformerConfig refuses heads or KV groups not divisible by TP, the column-parallel MLP an
    FFN width not divisible by TP, and the transformer block layers not divisible by the
    pipeline chunks (no uneven split is configured). The vocabulary is padded, never refused.
    ``what`` (e.g. "student") and ``source`` (where the config came from) go into the reasons."""
    out = []
    chunks = pp * (vpp or 1)
    if cfg.num_layers % chunks:
        out.append(("pp", pp, f"{f'x parallel.vpp={vpp} ' if vpp else ''}must divide the "
                    f"{cfg.num_layers} layers of the {what} ({source})"))
    if cfg.num_attention_heads % tp or cfg.num_query_groups % tp:
        out.append(("tp", tp, f"must divide the {cfg.num_attention_heads} attention heads and "
                    f"the {cfg.num_query_groups} KV groups of the {what} ({source})"))
    if cfg.ffn_hidden_size % tp:
        out.append(("tp", tp, f"must divide the FFN width {cfg.ffn_hidden_size} of the {what} "
                    f"({source})"))
    return out


def hf_config_dict(cfg: HFModelConfig) -> dict[str, Any]:
    """Megatron side -> HF ``config.json`` dict (the reverse direction of the same table)."""
    out = dict(cfg.raw)
    for hf_name, mc_name in CONFIG_FIELDS:
        out[hf_name] = getattr(cfg, mc_name)
    out.update(architectures=[cfg.architecture], model_type=cfg.quirks.model_type,
               vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
               max_position_embeddings=cfg.max_position_embeddings)
    return out
