"""One declarative table per architecture: Megatron name -> HF name(s) + mapping.

Megatron names are the layout-free keys of a torch_dist checkpoint (per-layer tensors are
stacked on a leading layer axis there); HF names of per-layer rows carry ``{i}``, the global
layer index. Both conversion directions, the TP gather of the live export and the key checks
are derived from these tables; nothing here mentions a rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.hf_config import ARCHITECTURES, HFModelConfig, UnsupportedModelError
from .mappings import Context, Direct, FusedGateUp, FusedQKV, Mapping, VocabRows

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Row:
    megatron: str            # layout-free key without the "decoder.layers." prefix for layers
    mapping: Mapping
    per_layer: bool = False
    when: str | None = None  # HFModelConfig bool field that must be true for the row to exist
    unless: str | None = None  # ... or false

    def applies(self, cfg: HFModelConfig) -> bool:
        return ((self.when is None or bool(getattr(cfg, self.when)))
                and (self.unless is None or not bool(getattr(cfg, self.unless))))

    @property
    def key(self) -> str:
        return LAYER_PREFIX + self.megatron if self.per_layer else self.megatron

    def hf_names(self, layer: int | None) -> list[str]:
        return [n.format(i=layer) for n in self.mapping.hf_names]


def _layer(megatron: str, mapping: Mapping, **kw) -> Row:
    return Row(megatron, mapping, per_layer=True, **kw)


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."

# The dense decoder shared by Llama 3.x, Qwen2/2.5 and Qwen3 (same HF names in all three).
_DENSE = (
    Row("embedding.word_embeddings.weight", VocabRows("model.embed_tokens.weight")),
    _layer("self_attention.linear_qkv.layer_norm_weight",
           Direct("model.layers.{i}.input_layernorm.weight")),
    _layer("self_attention.linear_qkv.weight",
           FusedQKV(_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight")),
    _layer("self_attention.linear_proj.weight", Direct(_ATTN + "o_proj.weight")),
    _layer("mlp.linear_fc1.layer_norm_weight",
           Direct("model.layers.{i}.post_attention_layernorm.weight")),
    _layer("mlp.linear_fc1.weight",
           FusedGateUp(_MLP + "gate_proj.weight", _MLP + "up_proj.weight")),
    _layer("mlp.linear_fc2.weight", Direct(_MLP + "down_proj.weight")),
    Row("decoder.final_layernorm.weight", Direct("model.norm.weight")),
    Row("output_layer.weight", VocabRows("lm_head.weight"), unless="tie_word_embeddings"),
)
_QKV_BIAS = _layer("self_attention.linear_qkv.bias",
                   FusedQKV(_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),
                   when="qkv_bias")
_QK_NORM = (
    _layer("self_attention.q_layernorm.weight", Direct(_ATTN + "q_norm.weight"),
           when="qk_layernorm"),
    _layer("self_attention.k_layernorm.weight", Direct(_ATTN + "k_norm.weight"),
           when="qk_layernorm"),
)

TABLES: dict[str, tuple[Row, ...]] = {
    "LlamaForCausalLM": _DENSE,  # attention_bias=true is refused by load_hf_config
    "Qwen2ForCausalLM": _DENSE + (_QKV_BIAS,),
    "Qwen3ForCausalLM": _DENSE + _QK_NORM,
}
assert set(TABLES) == set(ARCHITECTURES), "every buildable architecture needs a table"

# Megatron linear modules carry an ``_extra_state`` object per layer in the checkpoint (None for
# the local spec; FP8 metadata under Transformer Engine). Writers must emit it, or loading fails.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Item:
    """One per-layer (or global) tensor: a row instantiated at a layer."""

    row: Row
    layer: int | None

    @property
    def key(self) -> str:
        return self.row.key

    @property
    def hf_names(self) -> list[str]:
        return self.row.hf_names(self.layer)

    def __str__(self) -> str:
        return self.key if self.layer is None else f"{self.key}[layer {self.layer}]"


def table_for(cfg: HFModelConfig) -> tuple[Row, ...]:
    if cfg.architecture not in TABLES:
        raise UnsupportedModelError(f"architecture {cfg.architecture!r} has no conversion "
                                    f"table; supported: {', '.join(sorted(TABLES))}")
    return tuple(r for r in TABLES[cfg.architecture] if r.applies(cfg))


def items(cfg: HFModelConfig) -> list[Item]:
    """All tensors of the model in HF order: embedding, layer by layer, final norm, head."""
    rows = table_for(cfg)
    out = [Item(r, None) for r in rows if not r.per_layer and r.key.startswith("embedding.")]
    for i in range(cfg.num_layers):
        out += [Item(r, i) for r in rows if r.per_layer]
    out += [Item(r, None) for r in rows if not r.per_layer and not r.key.startswith("embedding.")]
    return out


def hf_key_set(cfg: HFModelConfig) -> set[str]:
    return {n for it in items(cfg) for n in it.hf_names}


def context(cfg: HFModelConfig, padded_vocab: int) -> Context:
    return Context(num_attention_heads=cfg.num_attention_heads,
                   num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
                   vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab)

