"""How one Megatron tensor relates to its Hugging Face tensor(s): the few special mappings.

Every mapping works on *per-layer* tensors (no layer axis). Four operations, all derived from
the same layout knowledge:

- ``shard(source, ctx, split)``: one TP rank's piece of the Megatron tensor, reading only the
  rows/columns of the HF tensors that piece is made of. The offline converter calls it with
  ``WHOLE`` (the full tensor) and the trainer's direct HF load with the rank's ``Split``, so the
  two paths share one function and cannot drift.
- ``to_megatron(hf_tensors, ctx)``: HF tensors (in ``hf_names`` order) -> the full Megatron tensor
  (``shard`` of in-memory tensors, ``WHOLE``).
- ``to_hf(tensor, ctx)``: the inverse of ``to_megatron``, one HF tensor per name.
- ``gather_tp(shards, dim)``: the full Megatron tensor from its TP shards (live export); the
  inverse of ``shard``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class ConversionError(ValueError):
    """A checkpoint does not match what the architecture table expects."""


@dataclass(frozen=True)
class Context:
    """What a mapping may need to know about the model (never the parallel layout)."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int          # true vocabulary rows (HF)
    padded_vocab_size: int   # Megatron rows (multiple of lcm(divisible_by, tp))


@dataclass(frozen=True)
class Split:
    """The piece of a Megatron tensor one TP rank holds: Megatron cuts the full tensor into
    ``tp`` equal contiguous pieces along ``dim`` (the parameter's ``partition_dim``)."""

    dim: int = 0
    rank: int = 0
    tp: int = 1

    def piece(self, size: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's piece of ``size`` units along the split."""
        if size % self.tp:
            raise ConversionError(f"{what}: {size} is not divisible by TP={self.tp}")
        n = size // self.tp
        return self.rank * n, n


WHOLE = Split()  # the full tensor (the offline converter; tensors no TP rank splits)


class Source:
    """The HF tensors of one mapping, in ``hf_names`` order, read on demand: ``shape(i)``
    without reading, ``read(i, index)`` only the block ``index`` (a tuple of slices; None: all).
    ``hf_io.HFSource`` reads safetensors files; ``Tensors`` serves tensors in memory."""

    def __len__(self) -> int:
        raise NotImplementedError

    def shape(self, i: int) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, i: int, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        raise NotImplementedError


class Tensors(Source):
    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = list(tensors)

    def __len__(self):
        return len(self.tensors)

    def shape(self, i):
        return tuple(self.tensors[i].shape)

    def read(self, i, index=None):
        t = self.tensors[i]
        return t if index is None else t[index]


def _rows(start: int, stop: int) -> tuple[slice, ...]:
    return (slice(start, stop),)


def _check_count(name: str, got: int, want: int) -> None:
    if got != want:
        raise ConversionError(f"{name}: expected {want} tensor(s), got {got}")


class Mapping:
    """One Megatron tensor <-> ``len(hf_names)`` HF tensors."""

    # The dimensions Megatron may split the tensor along over TP; None: any (Direct).
    split_dims: tuple[int, ...] | None = (0,)

    def __init__(self, *hf_names: str):
        self.hf_names = hf_names

    def shard(self, src: Source, ctx: Context, split: Split = WHOLE) -> torch.Tensor:
        """``split``'s piece of the Megatron tensor, reading only what it is made of."""
        raise NotImplementedError

    def _check_split(self, split: Split) -> None:
        if split.tp > 1 and self.split_dims is not None and split.dim not in self.split_dims:
            raise ConversionError(f"{self!r}: Megatron splits it along dim {split.dim}, this "
                                  f"mapping only along {self.split_dims}")

    def to_megatron(self, hf: list[torch.Tensor], ctx: Context) -> torch.Tensor:
        return self.shard(Tensors(hf), ctx, WHOLE)

    def to_hf(self, t: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
        raise NotImplementedError

    def gather_tp(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Megatron splits the full tensor into equal contiguous pieces along ``dim``."""
        return torch.cat(shards, dim=dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.hf_names}"


class Direct(Mapping):
    """Same tensor, same layout (norms, o_proj/linear_proj, down_proj/linear_fc2)."""

    split_dims = None

    def shard(self, src, ctx, split=WHOLE):
        _check_count(repr(self), len(src), 1)
        if split.tp == 1:
            return src.read(0)
        start, n = split.piece(src.shape(0)[split.dim], self.hf_names[0])
        return src.read(0, (slice(None),) * split.dim + (slice(start, start + n),))

    def to_hf(self, t, ctx):
        return [t]


class VocabRows(Direct):
    """Embedding / LM head: Megatron pads the vocabulary rows so that every TP rank holds the
    same number ([V, H] <-> [V_padded, H]); the padding rows are zero and never trained (their
    logits are masked to -inf)."""

    split_dims = (0,)

    def shard(self, src, ctx, split=WHOLE):
        _check_count(repr(self), len(src), 1)
        self._check_split(split)
        rows, *rest = src.shape(0)
        if rows != ctx.vocab_size:
            raise ConversionError(f"{self.hf_names[0]}: {rows} rows but vocab_size="
                                  f"{ctx.vocab_size} in config.json")
        if ctx.padded_vocab_size < ctx.vocab_size:
            raise ConversionError(f"padded vocabulary {ctx.padded_vocab_size} is smaller than "
                                  f"vocab_size={ctx.vocab_size}")
        start, n = split.piece(ctx.padded_vocab_size, "padded vocabulary")
        # The piece's real rows (none for a piece wholly in the padding), then zero rows.
        lo, hi = min(start, rows), min(start + n, rows)
        t = src.read(0, _rows(lo, hi))
        pad = n - (hi - lo)
        return torch.cat([t, t.new_zeros(pad, *rest)]) if pad else t

    def to_hf(self, t, ctx):
        if t.shape[0] < ctx.vocab_size:
            raise ConversionError(f"{self.hf_names[0]}: Megatron tensor has {t.shape[0]} rows, "
                                  f"fewer than vocab_size={ctx.vocab_size}")
        return [t[:ctx.vocab_size]]


class FusedQKV(Mapping):
    """q/k/v projections (weights [out, H] or biases [out]) <-> Megatron's linear_qkv.

    Megatron interleaves by query group so that a TP rank owns whole groups:
    [groups, (q_per_group + 2) * head_dim, ...] = per group: its q heads, then k, then v.
    """

    def shard(self, src, ctx, split=WHOLE):
        _check_count(repr(self), len(src), 3)
        self._check_split(split)
        g, d = ctx.num_query_groups, ctx.kv_channels
        qpg = ctx.num_attention_heads // g
        rest = src.shape(0)[1:]
        want = {"q": (g * qpg * d, *rest), "k": (g * d, *rest), "v": (g * d, *rest)}
        for i, name in enumerate("qkv"):
            if src.shape(i) != want[name]:
                raise ConversionError(f"{self.hf_names[i]}: shape "
                                      f"{src.shape(i)}, expected {want[name]} from the config")
        # A TP rank holds whole query groups: its q heads' rows and its k/v heads' rows.
        first, n = split.piece(g, "query groups")
        q = src.read(0, _rows(first * qpg * d, (first + n) * qpg * d))
        k = src.read(1, _rows(first * d, (first + n) * d))
        v = src.read(2, _rows(first * d, (first + n) * d))
        fused = torch.cat([q.reshape(n, qpg * d, *rest), k.reshape(n, d, *rest),
                           v.reshape(n, d, *rest)], dim=1)  # [n, (qpg + 2) * d, ...]
        return fused.reshape(n * (qpg + 2) * d, *rest)

    def to_hf(self, t, ctx):
        g, d = ctx.num_query_groups, ctx.kv_channels
        qpg = ctx.num_attention_heads // g
        rest = t.shape[1:]
        per_group = t.reshape(g, (qpg + 2) * d, *rest)
        q, k, v = per_group.split([qpg * d, d, d], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


class FusedGateUp(Mapping):
    """gate_proj and up_proj [F, H] <-> Megatron's GLU linear_fc1 [2F, H] = [gate; up].

    TP splits gate and up separately: rank r holds [gate_r; up_r], so a plain concatenation of
    shards would interleave them; ``gather_tp`` regroups.
    """

    def shard(self, src, ctx, split=WHOLE):
        _check_count(repr(self), len(src), 2)
        self._check_split(split)
        if src.shape(0) != src.shape(1):
            raise ConversionError(f"{self.hf_names[0]} {src.shape(0)} and "
                                  f"{self.hf_names[1]} {src.shape(1)} differ in shape")
        start, n = split.piece(src.shape(0)[0], self.hf_names[0])
        rows = _rows(start, start + n)
        return torch.cat([src.read(0, rows), src.read(1, rows)], dim=0)  # [gate_r; up_r]

    def to_hf(self, t, ctx):
        return [x.contiguous() for x in t.chunk(2, dim=0)]

    def gather_tp(self, shards, dim):
        halves = [s.chunk(2, dim=0) for s in shards]  # each [F/tp, H] x 2
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
