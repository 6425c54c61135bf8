"""Build Megatron GPTModel chunks for this rank from an HF model config.

Model code here is layout-agnostic: it reads the TP/PP sizes Megatron's parallel state already
holds and never creates process groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..runtime import have_transformer_engine
from .fp8 import FP8Settings, check_fp8
from .hf_config import HFModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BuildOptions:
    """How to instantiate an architecture on this rank (dtypes, memory/compute trade-offs)."""

    dtype: str = "fp32"
    make_vocab_size_divisible_by: int = 128
    recompute: str | None = None  # None, "selective" or "full"
    fp8: FP8Settings = field(default_factory=FP8Settings)
    use_te: bool | None = None  # None: Transformer Engine spec whenever TE can run

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"model.recompute={self.recompute!r}: expected none, selective or full")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary rows after padding so that every TP shard has the same, aligned size.

    The multiple is lcm(divisible_by, tp), not Megatron-LM's divisible_by * tp: the padded size
    then does not depend on TP (for any TP dividing 128), so one checkpoint loads at every TP.
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def mask_padded_vocab_(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of padding rows to -inf in place ([..., V/tp]); they are not tokens.

    Only the padded tail of the last shard(s) is touched, so this costs no pass over the logits.
    """
    v_local = logits.shape[-1]
    first_pad = vocab_size - tp_rank * v_local  # local index of the first padding row
    if first_pad < v_local:
        logits[..., max(first_pad, 0):] = float("-inf")
    return logits


def _layer_spec(hf: HFModelConfig, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=hf.qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=hf.qk_layernorm, normalization="RMSNorm")


def transformer_config(hf: HFModelConfig, opts: BuildOptions, **overrides):
    """Megatron TransformerConfig for ``hf`` under the current parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig
    dtype = DTYPES[opts.dtype]
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    kw = hf.transformer_config_kwargs()
    kw.update(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,  # needs Apex's fused wgrad kernels
        sequence_parallel=False,
        # p2p without batch sync avoids a device synchronise per exchange; with virtual PP the
        # default (batched, non-overlapped) exchange gives wrong results on megatron-core 0.16,
        # the overlapped one matches the non-interleaved schedule.
        batch_p2p_sync=False,
        batch_p2p_comm=False,
        overlap_p2p_comm=vpp is not None,
        calculate_per_token_loss=True,  # the loss normalises by global counts (see training/)
        recompute_granularity=opts.recompute,
        recompute_method="uniform" if opts.recompute == "full" else None,
        recompute_num_layers=1 if opts.recompute == "full" else None,
        **opts.fp8.transformer_config_kwargs(),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_model_chunks(hf: HFModelConfig, opts: BuildOptions | None = None,
                       **config_overrides) -> list:
    """This rank's GPTModel chunk(s): one per virtual pipeline stage (one without VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    opts = opts or BuildOptions()
    check_fp8(opts.fp8)
    use_te = have_transformer_engine() if opts.use_te is None else opts.use_te
    if opts.fp8.enabled and not use_te:
        raise ValueError("model.fp8.enabled=true needs the Transformer Engine layer spec "
                         "(model.use_te must not be false)")
    config = transformer_config(hf, opts, **config_overrides)
    spec = _layer_spec(hf, use_te)
    tp = ps.get_tensor_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(hf.vocab_size, opts.make_vocab_size_divisible_by, tp),
            max_sequence_length=hf.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=hf.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(hf.rope_theta),
            rope_scaling=hf.rope_scaling_factor is not None,
            rope_scaling_factor=hf.rope_scaling_factor or 8.0,
            vp_stage=vp,
        ))
    if config.params_dtype != torch.float32:
        # torch's RMSNorm fallback creates fp32 weights; Megatron-LM's Float16Module would cast
        # them, but it also upcasts the logits to fp32 (a full [tokens, V/tp] copy the fused
        # loss exists to avoid), so cast the parameters here instead.
        for chunk in chunks:
            chunk.to(dtype=config.params_dtype)
    return chunks
