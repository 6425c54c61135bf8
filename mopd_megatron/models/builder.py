"""Build Megatron GPTModel chunks for this rank from an HF model config and the recipe's sections.

One road from recipe to model: ``transformer_config`` takes the ``parallel`` and ``model.fp8``
sections themselves (no mirror types), so every field the recipe sets for the model lands in
Megatron's ``TransformerConfig`` here, and the same function serves ``--dry-run`` (no process
group, no weights) and the run. Model code never creates process groups.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..runtime import have_transformer_engine
from .fp8 import check_fp8
from .hf_config import HFModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Megatron-LM's default; the padded size does not depend on TP (see padded_vocab_size).
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


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


def fp8_transformer_kwargs(fp8) -> dict[str, Any]:
    """``model.fp8`` (an FP8Config section) -> TransformerConfig fields; {} when disabled."""
    if fp8 is None or not fp8.enabled:
        return {}
    return dict(fp8=fp8.format, fp8_recipe=fp8.recipe, fp8_param=fp8.param,
                first_last_layers_bf16=fp8.first_last_layers_bf16,
                num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
                num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16)


def packed_attention_format(use_te: bool | None = None) -> str:
    """How packed rows keep attention inside each sequence (mcore/schedule.py): Transformer
    Engine's THD kernels, or an explicit mask on the local spec (which the CUDA fused softmax
    would ignore for a causal model: trainer/model_checks.py refuses that combination)."""
    use_te = have_transformer_engine() if use_te is None else use_te
    return "thd" if use_te else "mask"


def transformer_config(hf: HFModelConfig, parallel, *, dtype: str, fp8=None,
                       frozen: bool = False, **overrides):
    """Megatron TransformerConfig for ``hf`` in the layout of ``parallel`` (a ParallelConfig
    section), with ``dtype`` (model.dtype) and ``fp8`` (the model.fp8 section).

    ``frozen``: a forward-only teacher. It gets no FP8 (its log-probs are the distillation
    target, scored in ``dtype``) and no recompute (there is no backward to save memory for).
    Needs no process group and allocates nothing: --dry-run prints what it returns.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig
    torch_dtype = DTYPES[dtype]
    recompute = None if frozen or parallel.recompute == "none" else parallel.recompute
    kw = hf.transformer_config_kwargs()
    kw.update(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=torch_dtype, pipeline_dtype=torch_dtype,
        bf16=torch_dtype == torch.bfloat16, fp16=torch_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,  # needs Apex's fused wgrad kernels
        # p2p without batch sync avoids a device synchronise per exchange. Overlapped p2p uses
        # separate isend/irecv; without it they are batched, as Megatron-LM pairs the two. Only
        # the interleaved schedule overlaps (the 1F1B one refuses the flag), and with virtual PP
        # the batched exchange gives wrong results on megatron-core 0.16 (config validation
        # requires overlap there).
        batch_p2p_sync=False,
        overlap_p2p_comm=parallel.overlap_p2p_comm and parallel.vpp is not None,
        batch_p2p_comm=not parallel.overlap_p2p_comm,
        calculate_per_token_loss=True,  # the loss normalises by global counts (see mcore/schedule.py)
        # Pipeline stages exchange each micro-batch's shape first: teachers score short last
        # groups, token budgets and packing give every micro-batch its own shape. One small
        # send per exchange; without PP there is nothing to exchange.
        variable_seq_lengths=parallel.pp > 1,
        # megatron-core refuses variable_seq_lengths with its default "allgather" MoE
        # dispatcher even for dense models (which have no dispatcher); the models built here are
        # dense, so the dispatcher named only satisfies that check.
        **({"moe_token_dispatcher_type": "alltoall"} if parallel.pp > 1 else {}),
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **({} if frozen else fp8_transformer_kwargs(fp8)),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_model_chunks(hf: HFModelConfig, parallel, *, dtype: str, fp8=None,
                       frozen: bool = False, use_te: bool | None = None,
                       **config_overrides) -> list:
    """This rank's GPTModel chunk(s): one per virtual pipeline stage (one without VPP).

    Megatron's parallel state must already hold the layout of ``parallel`` (runtime.init_runtime).
    ``use_te``: the Transformer Engine layer spec; None: whenever TE can run here.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    fp8 = None if frozen else fp8
    if fp8 is not None:
        check_fp8(fp8)
    use_te = have_transformer_engine() if use_te is None else use_te
    if fp8 is not None and fp8.enabled and not use_te:
        raise ValueError("model.fp8.enabled=true needs the Transformer Engine layer spec")
    live = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size())
    if live != (parallel.tp, parallel.pp, parallel.vpp):
        raise ValueError(f"the process groups hold tp, pp, vpp = {live}, the parallel section "
                         f"{(parallel.tp, parallel.pp, parallel.vpp)}")
    config = transformer_config(hf, parallel, dtype=dtype, fp8=fp8, frozen=frozen,
                                **config_overrides)
    spec = _layer_spec(hf, use_te)
    vpp = parallel.vpp
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(hf.vocab_size, MAKE_VOCAB_SIZE_DIVISIBLE_BY, parallel.tp),
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
