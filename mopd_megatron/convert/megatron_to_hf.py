"""Megatron torch_dist checkpoint -> HF directory (sharded safetensors + index, config.json,
tokenizer files), streaming: one Megatron tensor-layer is read, converted and written at a
time, whatever the shard size.

Works on any torch_dist model checkpoint (whatever TP/PP/DP wrote it): keys are layout-free.
The HF config comes from ``config.json`` next to the checkpoint (written there by the HF ->
Megatron converter) or from ``hf_config``.

Several writers can share one conversion (``part``): the plan (which tensor goes in which
shard file) depends only on the checkpoint, so each writer derives it alone and writes its own
files; nothing passes between them. The trainer's final export runs one writer per rank.
"""
from __future__ import annotations

import os

import torch

from ..models.hf_config import hf_config_dict, load_hf_config
from . import dcp_io
from .hf_io import (DTYPE_NAMES, SafetensorsStreamWriter, copy_side_files, plan_shards,
                    reference_shapes, require_empty_dir, shard_name, write_json)
from .mappings import ConversionError
from .tables import Item, context, items


def find_config_dir(ckpt_dir: str) -> str:
    """The directory holding the model's ``config.json``: the checkpoint or its parent."""
    for d in (ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir))):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"no config.json in {ckpt_dir} or its parent: pass --hf-config DIR "
                            "(an HF directory of the same model; its tokenizer is copied too)")


def _check_keys(ckpt_dir: str, md: dict, todo: list[Item], num_layers: int) -> None:
    expected = {it.key for it in todo}
    missing, extra = sorted(expected - set(md)), sorted(set(md) - expected)
    if missing or extra:
        raise ConversionError(f"{ckpt_dir}: checkpoint tensors do not match the architecture "
                              f"table:\n  missing: {missing}\n  unexpected: {extra}")
    for it in todo:
        if it.layer is not None and md[it.key].size[0] != num_layers:
            raise ConversionError(f"{it.key}: checkpoint stacks {md[it.key].size[0]} layers, "
                                  f"config.json has num_hidden_layers={num_layers}")


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str, hf_config: str | None = None,
                           max_shard_mb: float = 2048, progress: bool = False,
                           part: tuple[int, int] = (0, 1)) -> dict:
    """Write ``out_dir``; returns the safetensors index (``weight_map`` and total size).

    ``part=(i, n)``: writer ``i`` of ``n`` writes shard files i, i + n, ...; writer 0 also the
    index, config.json and tokenizer files. With n > 1 the caller makes sure ``out_dir`` is empty
    before any writer starts and that all have finished before the directory is used."""
    writer_index, writers = part
    if not 0 <= writer_index < writers:
        raise ValueError(f"part {part}: expected (i, n) with 0 <= i < n")
    reader = dcp_io.Reader(ckpt_dir)
    md = reader.tensors()
    config_dir = hf_config or find_config_dir(ckpt_dir)
    cfg = load_hf_config(config_dir)
    todo = items(cfg)
    _check_keys(ckpt_dir, md, todo, cfg.num_layers)
    ctx = context(cfg, padded_vocab=md["embedding.word_embeddings.weight"].size[0])
    ref = reference_shapes(cfg.raw)

    # Plan: HF shapes from the mapping on meta tensors, checked against transformers' model.
    specs, per_item_bytes = [], []  # per item: [(hf name, dtype, shape)]
    for it in todo:
        meta = md[it.key]
        size = meta.size[1:] if it.layer is not None else meta.size
        outs = it.row.mapping.to_hf(torch.empty(size, device="meta"), ctx)
        for name, t in zip(it.hf_names, outs):
            if tuple(t.shape) != ref[name]:
                raise ConversionError(f"{it}: gives {name} of shape {tuple(t.shape)}, config "
                                      f"implies {ref[name]}")
        dtype = meta.properties.dtype
        specs.append([(n, dtype, tuple(t.shape)) for n, t in zip(it.hf_names, outs)])
        per_item_bytes.append(sum(t.numel() for t in outs) * dtype.itemsize)
    shards = plan_shards(per_item_bytes, int(max_shard_mb * 2**20))
    weight_map = {name: shard_name(s, len(shards))
                  for s, shard in enumerate(shards) for idx in shard for name, _, _ in specs[idx]}
    dtypes = {md[it.key].properties.dtype for it in todo}
    mine = [s for s in range(len(shards)) if s % writers == writer_index]

    if writers == 1:
        require_empty_dir(out_dir)
    else:
        os.makedirs(out_dir, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(shards[s]) for s in mine), unit="tensor", desc="megatron -> hf")
    for s in mine:
        shard = shards[s]
        writer = SafetensorsStreamWriter(os.path.join(out_dir, shard_name(s, len(shards))),
                                         [spec for idx in shard for spec in specs[idx]])
        for idx in shard:
            it = todo[idx]
            meta = md[it.key]
            if it.layer is None:
                full = dcp_io.read_chunk(reader, it.key, (0,) * len(meta.size),
                                         tuple(meta.size))
            else:  # one layer of the stacked key: [1, ...] -> [...]
                start = (it.layer,) + (0,) * (len(meta.size) - 1)
                full = dcp_io.read_chunk(reader, it.key, start, (1, *meta.size[1:]))[0]
            for hf_name, t in zip(it.hf_names, it.row.mapping.to_hf(full, ctx)):
                writer.write(hf_name, t)
            if bar:
                bar.update(1)
        writer.close()
    if bar:
        bar.close()

    total = sum(per_item_bytes)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if writer_index == 0:
        write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
        config = hf_config_dict(cfg)
        if len(dtypes) == 1:
            config["dtype"] = DTYPE_NAMES.get(dtypes.pop(), config.get("dtype"))
        config.pop("torch_dtype", None)
        write_json(os.path.join(out_dir, "config.json"), config)
        copy_side_files(config_dir, out_dir)
    return index
