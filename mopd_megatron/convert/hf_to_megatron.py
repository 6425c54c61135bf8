"""HF safetensors directory -> Megatron torch_dist checkpoint (streaming, one process).

The checkpoint is layout-free: per-layer tensors are stored per layer under Megatron's stacked
keys, so ``dist_checkpointing.load`` reshards it to any TP/PP on load. The vocabulary padding
(``padded_vocab_size(V, divisible_by, tp)``, a multiple of lcm(divisible_by, tp)) is the same for
every TP dividing ``divisible_by``; ``tp`` and ``pp`` are checked against the model's shape.
"""
from __future__ import annotations

import os

import torch

from ..models.builder import DTYPES, padded_vocab_size
from ..models.hf_config import HFModelConfig, hf_config_dict, layout_problems, load_hf_config
from . import dcp_io
from .hf_io import (HFCheckpoint, copy_side_files, reference_shapes, require_empty_dir,
                    write_json)
from .mappings import WHOLE, ConversionError
from .tables import EXTRA_STATE_MODULES, Item, context, hf_key_set, items

CONVERT_INFO = "mopd_convert.json"  # how the checkpoint was made (vocab padding, dtype)


def check_hf_tensors(ckpt: HFCheckpoint, expected: set[str], shapes: dict[str, tuple]) -> None:
    """Missing/extra tensors (listed) and shape mismatches (tensor and both shapes)."""
    have = set(ckpt.shape)
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        raise ConversionError(f"{ckpt.dir}: tensors do not match the architecture table:\n"
                              f"  missing: {missing}\n  unexpected: {extra}")
    bad = [f"{n}: file has {ckpt.shape[n]}, config implies {shapes[n]}"
           for n in sorted(expected) if n in shapes and ckpt.shape[n] != shapes[n]]
    if bad:
        raise ConversionError(f"{ckpt.dir}: shape mismatch:\n  " + "\n  ".join(bad))


def open_checked(hf_dir: str, cfg) -> HFCheckpoint:
    """The safetensors headers of ``hf_dir``, checked against the architecture table and the
    shapes ``transformers`` gives ``cfg`` (nothing else is read). Shared by the converter and
    the trainer's direct load, so that both accept exactly the same checkpoints."""
    ckpt = HFCheckpoint(hf_dir)
    expected = hf_key_set(cfg)
    ref = reference_shapes(cfg.raw)
    if set(ref) != expected:  # the table and transformers disagree: a bug here, not in the input
        raise ConversionError(f"{cfg.architecture}: conversion table names differ from "
                              f"transformers' parameters: {sorted(set(ref) ^ expected)}")
    tied_head = "lm_head.weight"
    if cfg.tie_word_embeddings and tied_head in ckpt.shape:
        del ckpt.shape[tied_head], ckpt.file_of[tied_head]  # a saved copy of the embedding
    check_hf_tensors(ckpt, expected, ref)
    return ckpt


def checked_padded_vocab(cfg: HFModelConfig, tp: int, pp: int, divisible_by: int,
                         source: str) -> int:
    """Refuse a TP/PP the model cannot be split into (the check start-up and the planner make:
    models/hf_config.py::layout_problems); returns the padded vocabulary size."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    for knob, value, reason in layout_problems(cfg, tp, pp, None, "model", source)[:1]:
        raise ValueError(f"--{knob} {value} {reason}")
    if divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {divisible_by}")
    return padded_vocab_size(cfg.vocab_size, divisible_by, tp)


def _megatron_shape(item: Item, ckpt: HFCheckpoint, ctx) -> tuple[int, ...]:
    # Run the mapping on meta tensors: the shape comes from the same code as the data.
    metas = [torch.empty(ckpt.shape[n], device="meta") for n in item.hf_names]
    return tuple(item.row.mapping.to_megatron(metas, ctx).shape)


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                           dtype: str = "bf16", make_vocab_size_divisible_by: int = 128,
                           progress: bool = False) -> dict:
    """Write ``out_dir``: the torch_dist checkpoint, config.json, tokenizer files and
    ``mopd_convert.json``. Returns the latter's content."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    cfg = load_hf_config(hf_dir)
    padded = checked_padded_vocab(cfg, tp, pp, make_vocab_size_divisible_by,
                                  os.path.join(hf_dir, "config.json"))
    ctx = context(cfg, padded)
    ckpt = open_checked(hf_dir, cfg)
    todo = items(cfg)

    require_empty_dir(out_dir)
    torch_dtype, L = DTYPES[dtype], cfg.num_layers
    chunks = []
    for it in todo:
        shape = _megatron_shape(it, ckpt, ctx)

        def produce(it=it):  # the whole tensor: the direct load's shard() at TP=1
            return it.row.mapping.shard(ckpt.source(it.hf_names), ctx, WHOLE)

        if it.layer is None:
            chunks.append(dcp_io.Chunk(it.key, (0,) * len(shape), shape, shape, torch_dtype,
                                       produce))
        else:  # one [1, ...] block of the stacked [L, ...] key per layer
            chunks.append(dcp_io.Chunk(it.key, (it.layer,) + (0,) * len(shape), (1, *shape),
                                       (L, *shape), torch_dtype,
                                       lambda p=produce: p().unsqueeze(0)))
    objects = [dcp_io.BytesObject(f"decoder.layers.{m}._extra_state/shard_{i}_{L}", lambda: None)
               for i in range(L) for m in EXTRA_STATE_MODULES]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunks), unit="tensor", desc="hf -> megatron")
    dcp_io.write(out_dir, chunks, objects, on_write=(lambda c: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    write_json(os.path.join(out_dir, "config.json"), hf_config_dict(cfg))
    copy_side_files(hf_dir, out_dir)
    info = dict(source=os.path.abspath(hf_dir), architecture=cfg.architecture, dtype=dtype,
                vocab_size=cfg.vocab_size, padded_vocab_size=padded,
                make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp, pp=pp)
    write_json(os.path.join(out_dir, CONVERT_INFO), info)
    return info
