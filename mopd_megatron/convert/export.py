"""Live model -> HF-named tensors, for weight sync into the rollout engine.

``export_hf_weights`` is a collective: every rank of the job iterates it in lock-step and
every rank receives every tensor (full, unpadded, HF layout), grouped in buckets. Why all
ranks: colocated engines are fed by each trainer rank from its own GPU, and a dedicated
engine's sender (global rank 0) is one of them; a rank that does not push simply drops the
buckets. Cost per tensor: one all-gather over TP on the owning stage (TP-split tensors only)
and, with PP > 1, one broadcast over the PP group; DP replicas work independently.

The same table and mappings as the checkpoint converter are used, so the two never disagree.
Yielded tensors may alias live parameters (tensors that need no gather or reshuffle): send or
copy each bucket before the next optimizer step.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..mcore.optimizer import unwrap_ddp
from ..models.hf_config import HFModelConfig
from .mappings import ConversionError
from .tables import LAYER_PREFIX, Item, context, items

TIED_HEAD = "output_layer.weight"  # last stage's copy of the embedding when tied (PP > 1)


def local_parameters(chunks: list) -> dict[tuple[str, int | None], torch.nn.Parameter]:
    """This rank's parameters under (layout-free key, global layer index)."""
    out = {}
    for chunk in chunks:
        model = unwrap_ddp(chunk)
        for name, p in model.named_parameters():
            if not name.startswith(LAYER_PREFIX):
                out[(name, None)] = p
                continue
            local_idx, rest = name[len(LAYER_PREFIX):].split(".", 1)
            layer = model.decoder.layers[int(local_idx)]
            # The local spec names norms separately; checkpoints use the fused-module names
            # (e.g. input_layernorm. -> self_attention.linear_qkv.layer_norm_).
            for src, dst in layer.submodules_config.sharded_state_dict_keys_map.items():
                if rest.startswith(src):
                    rest = dst + rest[len(src):]
            out[(LAYER_PREFIX + rest, layer.layer_number - 1)] = p  # layer_number is 1-based
    return out


def _full_shape(p: torch.nn.Parameter, tp: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def _gather_tp(item: Item, p: torch.nn.Parameter, tp_group, tp: int) -> torch.Tensor:
    t = p.detach()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return t
    shards = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(shards, t.contiguous(), group=tp_group)
    return item.row.mapping.gather_tp(shards, p.partition_dim)


def export_hf_weights(chunks: list, hf_cfg: HFModelConfig, layout,
                      bucket_mb: float = 512) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets (lists of ``(hf_name, tensor)``, ~``bucket_mb`` MiB each) covering exactly
    the HF checkpoint's tensors, in HF order. Collective over the whole job (see module doc):
    ``layout`` (runtime.Layout) gives this rank's TP and PP groups and pipeline stage."""
    from ..runtime import device
    tp, pp = layout.tp, layout.pp
    tp_group, pp_group = layout.tp_group, layout.pp_group
    todo = items(hf_cfg)
    wanted = {(it.key, it.layer) for it in todo}
    local = local_parameters(chunks)
    if hf_cfg.tie_word_embeddings:
        local.pop((TIED_HEAD, None), None)
    extra = sorted(f"{k}[{i}]" for k, i in set(local) - wanted)
    if extra:
        raise ConversionError(f"model parameters not in the {hf_cfg.architecture} table: {extra}")

    # Who owns what, with full shapes, so that other stages can receive it (one exchange).
    mine = {k: (_full_shape(p, tp), p.dtype) for k, p in local.items()}
    if pp > 1:
        per_stage = [None] * pp
        torch.distributed.all_gather_object(per_stage, mine, group=pp_group)
    else:
        per_stage = [mine]
    owner = {k: (stage, *info) for stage, d in enumerate(per_stage) for k, info in d.items()}
    missing = sorted(str(it) for it in todo if (it.key, it.layer) not in owner)
    if missing:
        raise ConversionError(f"model lacks parameters of the {hf_cfg.architecture} table: "
                              f"{missing}")
    emb_rows = owner[("embedding.word_embeddings.weight", None)][1][0]
    ctx = context(hf_cfg, padded_vocab=emb_rows)
    my_stage = layout.pp_rank

    limit = bucket_mb * 2**20
    bucket, used = [], 0
    for it in todo:
        stage, shape, dtype = owner[(it.key, it.layer)]
        if stage == my_stage:
            full = _gather_tp(it, local[(it.key, it.layer)], tp_group, tp)
        else:
            full = torch.empty(shape, dtype=dtype, device=device())
        if pp > 1:
            src = torch.distributed.get_global_rank(pp_group, stage)
            full = full.contiguous()
            torch.distributed.broadcast(full, src=src, group=pp_group)
        for name, t in zip(it.hf_names, it.row.mapping.to_hf(full, ctx)):
            bucket.append((name, t))
            used += t.numel() * t.element_size()
        if used >= limit:
            yield bucket
            bucket, used = [], 0
    if bucket:
        yield bucket
