"""How one Megatron tensor relates to its Hugging Face tensor(s): the few special mappings.

Every mapping works on *full, per-layer* tensors (no layer axis, no tensor-parallel split),
so a mapping never knows about ranks. Three operations, all derived from the same layout
knowledge:

- ``to_megatron(hf_tensors, ctx)``: HF tensors (in ``hf_names`` order) -> one Megatron tensor.
- ``to_hf(tensor, ctx)``: the inverse, one HF tensor per name.
- ``gather_tp(shards, dim)``: the full Megatron tensor from its TP shards (live export).
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


def _check_count(name: str, got: int, want: int) -> None:
    if got != want:
        raise ConversionError(f"{name}: expected {want} tensor(s), got {got}")


class Mapping:
    """One Megatron tensor <-> ``len(hf_names)`` HF tensors."""

    def __init__(self, *hf_names: str):
        self.hf_names = hf_names

    def to_megatron(self, hf: list[torch.Tensor], ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
        raise NotImplementedError

    def gather_tp(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Megatron splits the full tensor into equal contiguous pieces along ``dim``."""
        return torch.cat(shards, dim=dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.hf_names}"


class Direct(Mapping):
    """Same tensor, same layout (norms, o_proj/linear_proj, down_proj/linear_fc2)."""

    def to_megatron(self, hf, ctx):
        _check_count(repr(self), len(hf), 1)
        return hf[0]

    def to_hf(self, t, ctx):
        return [t]


class VocabRows(Direct):
    """Embedding / LM head: Megatron pads the vocabulary rows so that every TP rank holds the
    same number ([V, H] <-> [V_padded, H]); the padding rows are zero and never trained (their
    logits are masked to -inf)."""

    def to_megatron(self, hf, ctx):
        (t,) = hf
        if t.shape[0] != ctx.vocab_size:
            raise ConversionError(f"{self.hf_names[0]}: {t.shape[0]} rows but vocab_size="
                                  f"{ctx.vocab_size} in config.json")
        pad = ctx.padded_vocab_size - ctx.vocab_size
        if pad < 0:
            raise ConversionError(f"padded vocabulary {ctx.padded_vocab_size} is smaller than "
                                  f"vocab_size={ctx.vocab_size}")
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

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

    def to_megatron(self, hf, ctx):
        _check_count(repr(self), len(hf), 3)
        q, k, v = hf
        g, d = ctx.num_query_groups, ctx.kv_channels
        qpg = ctx.num_attention_heads // g
        rest = q.shape[1:]
        want = {"q": (g * qpg * d, *rest), "k": (g * d, *rest), "v": (g * d, *rest)}
        for name, t in zip("qkv", (q, k, v)):
            if tuple(t.shape) != want[name]:
                raise ConversionError(f"{self.hf_names['qkv'.index(name)]}: shape "
                                      f"{tuple(t.shape)}, expected {want[name]} from the config")
        fused = torch.cat([q.reshape(g, qpg * d, *rest), k.reshape(g, d, *rest),
                           v.reshape(g, d, *rest)], dim=1)  # [g, (qpg + 2) * d, ...]
        return fused.reshape(g * (qpg + 2) * d, *rest)

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

    def to_megatron(self, hf, ctx):
        _check_count(repr(self), len(hf), 2)
        gate, up = hf
        if gate.shape != up.shape:
            raise ConversionError(f"{self.hf_names[0]} {tuple(gate.shape)} and "
                                  f"{self.hf_names[1]} {tuple(up.shape)} differ in shape")
        return torch.cat([gate, up], dim=0)

    def to_hf(self, t, ctx):
        return [x.contiguous() for x in t.chunk(2, dim=0)]

    def gather_tp(self, shards, dim):
        halves = [s.chunk(2, dim=0) for s in shards]  # each [F/tp, H] x 2
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
