"""Hugging Face checkpoint directories: read tensors one at a time, write sharded safetensors.

Reading opens the safetensors file per tensor, so no memory map stays resident across the
conversion (mapped pages would count against the process however large the model is), and
reads only the block asked for (``get_slice``): a TP rank loading its shard reads its rows or
columns, not the tensor.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import torch

from .mappings import Source

# Copied verbatim between an HF directory and a converted checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Non-parameter entries some exporters leave in safetensors files.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class HFCheckpoint:
    """Tensor names, shapes and dtypes of an HF directory's safetensors files (headers only)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open
        self.dir = hf_dir
        self.bytes_read = 0  # what read() returned so far (the direct load reports it)
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (only safetensors "
                                    "checkpoints are supported)")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(os.path.join(hf_dir, f), framework="pt") as fh:
                for name in fh.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    if name in self.file_of:
                        raise ValueError(f"{hf_dir}: tensor {name} is in both "
                                         f"{self.file_of[name]} and {f}")
                    self.file_of[name] = f
                    self.shape[name] = tuple(fh.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its block ``index`` (a tuple of slices)."""
        from safetensors import safe_open
        with safe_open(os.path.join(self.dir, self.file_of[name]), framework="pt") as fh:
            t = fh.get_tensor(name) if index is None else fh.get_slice(name)[index]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def source(self, names: list[str]) -> "HFSource":
        return HFSource(self, names)


class HFSource(Source):
    """The HF tensors of one mapping, read from the files on demand."""

    def __init__(self, ckpt: HFCheckpoint, names: list[str]):
        self.ckpt, self.names = ckpt, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, i: int) -> tuple[int, ...]:
        return self.ckpt.shape[self.names[i]]

    def read(self, i: int, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        return self.ckpt.read(self.names[i], index)


def reference_shapes(raw_config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the HF model that ``transformers`` builds from this config (on the
    meta device: no memory). Tied weights appear once, as HF saves them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = {k: v for k, v in raw_config.items()
              if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(raw_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Group consecutive entries (byte sizes) into shards of at most ``max_shard_bytes``
    (an entry larger than the limit gets a shard of its own)."""
    shards, current, used = [], [], 0
    for i, n in enumerate(sizes):
        if current and used + n > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def require_empty_dir(path: str) -> None:
    """Refuse to mix a new conversion with stale files of an old one."""
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"output directory {path} is not empty; choose a new one")
    os.makedirs(path, exist_ok=True)


class SafetensorsStreamWriter:
    """One safetensors file written tensor by tensor, so that memory holds one tensor, not the
    shard: the header (names, dtypes, shapes, byte offsets) is known up front and written first,
    then each tensor's bytes in the declared order.

    Format: u64 little-endian header length, JSON header (space-padded to 8 bytes), raw data.
    """

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path, self._specs, self._next = path, specs, 0
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self._specs[self._next]
        got = (name, t.dtype, tuple(t.shape))
        if got != want:
            raise ValueError(f"{self.path}: expected tensor {want}, got {got}")
        self._fh.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._specs):
            missing = [s[0] for s in self._specs[self._next:]]
            raise ValueError(f"{self.path}: tensors never written: {missing}")
