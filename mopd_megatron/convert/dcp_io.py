"""Streaming torch_dist (Megatron dist-checkpoint) I/O in one process, without a process group.

Writer: every tensor is declared up front (key, global shape, dtype, chunk offsets) and
produced lazily, one chunk at a time, when torch.distributed.checkpoint's serial writer asks
for it, so memory holds one chunk (one layer of one tensor), never the model. The files are
what Megatron's torch_dist strategy writes (``.metadata``, ``*.distcp``, ``common.pt``,
``metadata.json``), so ``dist_checkpointing.load`` reshards them to any TP/PP.

Reader: one chunk of one tensor (e.g. layer 17 of a stacked key), whatever chunking wrote it.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                    TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# What megatron-core's torch_dist save strategy writes next to the DCP files (0.16: v1).
MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}
# Single-process I/O is the intent here, not a missing process group.
_NO_DIST_WARNING = "torch.distributed is disabled"


@dataclass(frozen=True)
class Chunk:
    """One piece of a tensor to write: ``produce()`` returns it with shape ``sizes``."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class BytesObject:
    """A Megatron ShardedObject (pickled with torch.save), e.g. ``..._extra_state/shard_3_32``."""

    key: str
    produce: Callable[[], object]


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[Chunk], objects: list[BytesObject], on_write=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._by_index: dict[MetadataIndex, Chunk | BytesObject] = {}
        self._items: list[WriteItem] = []
        self._on_write = on_write
        for c in chunks:
            idx = MetadataIndex(c.key, torch.Size(c.offsets))
            self._by_index[idx] = c
            self._items.append(WriteItem(
                index=idx, type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape))))
        for o in objects:
            idx = MetadataIndex(o.key)
            self._by_index[idx] = o
            self._items.append(WriteItem(index=idx, type=WriteItemType.BYTE_IO))

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        spec = self._by_index[write_item.index]
        if isinstance(spec, BytesObject):
            buf = io.BytesIO()
            # megatron-core packs the data of all ShardedObjects under one key as a list.
            torch.save([spec.produce()], buf)
            buf.seek(0)
            return buf
        t = spec.produce()
        if tuple(t.shape) != spec.sizes:
            raise ValueError(f"{spec.key} at {spec.offsets}: produced shape {tuple(t.shape)}, "
                             f"declared {spec.sizes}")
        if self._on_write is not None:
            self._on_write(spec)
        return t.to(spec.dtype).contiguous()


def write(path: str, chunks: list[Chunk], objects: list[BytesObject], on_write=None) -> None:
    """Write a Megatron torch_dist checkpoint at ``path``, one chunk in memory at a time."""
    os.makedirs(path, exist_ok=True)
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, thread_count=1,
                                  sync_files=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects, on_write),
                 no_dist=True)
    torch.save({}, os.path.join(path, "common.pt"))  # no non-sharded state in a model checkpoint
    with open(os.path.join(path, "metadata.json"), "w", encoding="utf-8") as fh:
        json.dump(MCORE_METADATA, fh)


class Reader(dcp.FileSystemReader):
    """A checkpoint reader that parses ``.metadata`` once (it is re-read on every load
    otherwise, which makes reading a many-layer checkpoint chunk by chunk quadratic)."""

    def __init__(self, path: str):
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"{path}: not a torch_dist checkpoint (no .metadata file)")
        super().__init__(path)
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Model tensors: key -> global size, dtype, stored chunks."""
        return {k: v for k, v in self.read_metadata().state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")}


class _ChunkLoadPlanner(LoadPlanner):
    """Fill ``dest`` (shape = the requested chunk) from whatever chunks the checkpoint holds."""

    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor):
        self.key, self.offsets, self.dest = key, offsets, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        want = ChunkStorageMetadata(torch.Size(self.offsets), self.dest.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [want]))

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise AssertionError("only tensors are read")

    def resolve_tensor(self, read_item):
        t = self.dest
        for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, off, n)
        return t

    def commit_tensor(self, read_item, tensor):
        pass  # resolve_tensor returned a view of dest; the reader copied into it


def read_chunk(reader: Reader, key: str, offsets: tuple[int, ...],
               sizes: tuple[int, ...]) -> torch.Tensor:
    """The ``sizes`` block of ``key`` starting at ``offsets`` (e.g. one layer of a stacked key)."""
    dest = torch.empty(sizes, dtype=reader.tensors()[key].properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        dcp.load({}, storage_reader=reader, planner=_ChunkLoadPlanner(key, tuple(offsets), dest),
                 no_dist=True)
    return dest
