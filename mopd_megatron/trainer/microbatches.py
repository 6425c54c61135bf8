"""Which sequences go to which data-parallel rank and micro-batch, and how they become tensors.

Two groupings (``parallel.max_tokens_per_microbatch``):

* fixed (null): each DP rank takes a contiguous ``global_batch_size / dp`` slice of the step's
  sequences, in ``micro_batch_size`` rows per micro-batch, each row padded to the micro-batch's
  longest sequence (to the rollout batch's longest with PP: one activation shape).
* token budget: the step's sequences are dealt to DP ranks longest first, each to the rank with
  the fewest tokens so far (ranks then hold different numbers of sequences), and each rank's
  sequences go into micro-batches of at most the budget: first-fit decreasing on the sum of
  lengths when packed (``parallel.pack_sequences``); padded, runs of similar lengths (longest
  first, none under half the run's longest) with rows x longest row within the budget. A sequence longer than the budget gets a
  micro-batch of its own (a sequence is never split).

The MOPD normalisation does not depend on the grouping: the loss of a micro-batch is the sum of
its sequences' per-sequence means, its count the number of sequences (trainer/objective.py),
and Megatron divides by the count summed over micro-batches and DP ranks.

Packed micro-batches are one row ``[1, T]`` of whole sequences back to back; position ids
restart at each sequence and ``cu_seqlens`` holds the boundaries (the padding tail is one more
segment). mcore/schedule.py turns them into Transformer Engine's THD format or, on the local
layer spec, a block-diagonal causal mask.

Teacher log-probs and ORM advantages meet the student's micro-batches through *response slots*:
a flat numbering of this rank's response tokens. Every micro-batch (the student's and each
teacher's, grouped differently) carries ``resp_pos`` (flat positions of its response tokens
in its own ``[b*s]``) and ``resp_slot`` (their slots): one gather or scatter per micro-batch,
never a host round trip per row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .batch import RolloutBatch, response_positions

__all__ = ["Batching", "ResponseSlots", "split_data_parallel", "group_by_tokens",
           "build_microbatches", "rank_microbatches", "fill_from_slots", "slot_values",
           "per_domain_sums", "rollout_logp_slots", "padded_fraction", "pack_microbatches",
           "Prepared"]


def seq_len(batch: RolloutBatch, i: int) -> int:
    s = batch.samples[i]
    return len(s.prompt_token_ids) + len(s.token_ids)


def split_data_parallel(lengths: dict[int, int], indices: list[int], dp: int,
                        by_tokens: bool) -> list[list[int]]:
    """``indices`` -> one list per DP rank. Contiguous equal slices, or (``by_tokens``) longest
    first to the least-loaded rank (ties: fewer sequences, then lower rank), each list in
    rollout order. Deterministic: every rank computes every rank's share."""
    if not by_tokens:
        per = len(indices) // dp
        return [indices[r * per:(r + 1) * per] for r in range(dp)]
    load = [(0, 0, r) for r in range(dp)]          # (tokens, sequences, rank)
    shares: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        tokens, count, r = min(load)
        shares[r].append(i)
        load[r] = (tokens + lengths[i], count + 1, r)
    return [sorted(s) for s in shares]


def group_by_tokens(lengths: dict[int, int], indices: list[int], max_tokens: int,
                    packed: bool) -> list[list[int]]:
    """Micro-batches of at most ``max_tokens``; a sequence over the budget is alone in its own.

    packed: first-fit decreasing on the sum of lengths (any lengths share a row, so the bins
    fill up). padded (rows x longest row): longest first, consecutive sequences while they fit
    and are at least half the micro-batch's longest, so that no row is more than half padding
    (the budget alone let a 215-token sequence open a micro-batch of 19 rows, 12 of them 51-80
    tokens long: 22% padding on bench_step's batch at 4096)."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    if not packed:
        for i in order:
            if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= max_tokens \
                    and 2 * lengths[i] >= lengths[bins[-1][0]]:
                bins[-1].append(i)
            else:
                bins.append([i])
        return bins
    used: list[int] = []
    for i in order:
        n = lengths[i]
        for b, items in enumerate(bins):
            if used[b] + n <= max_tokens:
                items.append(i)
                used[b] += n
                break
        else:
            bins.append([i])
            used.append(n)
    return bins


@dataclass(frozen=True)
class Batching:
    """The micro-batching of one run (from the parallel section); shared by the student update
    and the teachers' scoring so both see the same shapes and packing."""

    micro_batch_size: int
    max_tokens: int | None = None     # parallel.max_tokens_per_microbatch
    packed: bool = False              # parallel.pack_sequences
    pad_multiple: int = 1             # packed rows: sequence parallel splits T over TP ranks
    pipeline: int = 1                 # pp: with the interleaved schedule, micro-batches % pp
    interleaved: bool = False

    @classmethod
    def from_config(cls, parallel, fp8_enabled: bool = False) -> "Batching":
        multiple = parallel.tp if parallel.sequence_parallel else 1
        if fp8_enabled:  # FP8 GEMMs want the token dimension in multiples of 16
            multiple = multiple * 16 // math.gcd(multiple, 16)
        return cls(parallel.micro_batch_size, parallel.max_tokens_per_microbatch,
                   parallel.pack_sequences, multiple, parallel.pp, parallel.vpp is not None)

    @property
    def by_tokens(self) -> bool:
        return self.max_tokens is not None

    def groups(self, lengths: dict[int, int], indices: list[int], *,
               whole: bool = True) -> list[list[int]]:
        """Micro-batch groups of ``indices``. ``whole``: the fixed grouping needs a multiple of
        micro_batch_size (the student's update); teachers accept a short last group."""
        if self.by_tokens:
            groups = group_by_tokens(lengths, indices, self.max_tokens, self.packed)
        else:
            if whole and len(indices) % self.micro_batch_size:
                raise ValueError(f"{len(indices)} sequences do not split into micro-batches of "
                                 f"{self.micro_batch_size}")
            groups = [indices[i:i + self.micro_batch_size]
                      for i in range(0, len(indices), self.micro_batch_size)]
        if self.interleaved:
            # The interleaved schedule runs micro-batches in groups of pp; a ragged last group
            # is refused by Megatron. Empty fillers (one masked token) make the count whole.
            groups += [[] for _ in range(-len(groups) % self.pipeline)]
        return groups


class ResponseSlots:
    """A flat numbering of the response tokens of ``indices`` (this rank's sequences)."""

    def __init__(self, batch: RolloutBatch, indices: list[int]):
        self.offset: dict[int, int] = {}
        self.length: dict[int, int] = {}
        total = 0
        for i in indices:
            self.offset[i], self.length[i] = total, len(batch.samples[i].token_ids)
            total += self.length[i]
        self.total = total
        # [total] the rollout-batch index of each slot's sequence: built once, read by the
        # advantages' fill and both per-domain KL sums of a step
        self._seq = torch.repeat_interleave(
            torch.tensor(list(self.offset), dtype=torch.long),
            torch.tensor([self.length[i] for i in self.offset], dtype=torch.long))

    def seq_of_slot(self) -> torch.Tensor:
        """[total] the rollout-batch index of each slot's sequence."""
        return self._seq


def _row(batch: RolloutBatch, i: int) -> list[int]:
    x = batch.samples[i]
    return list(x.prompt_token_ids) + list(x.token_ids)


def build_microbatches(batch: RolloutBatch, groups: list[list[int]], pad_id: int, *,
                       slots: ResponseSlots | None = None, packed: bool = False,
                       length: int | None = None, pad_multiple: int = 1,
                       device: torch.device | str = "cpu") -> list[dict]:
    """One dict per group. Padded: ``[b, s]`` rows, ``s`` = ``length`` or the group's longest
    sequence. Packed: one ``[1, T]`` row, T the group's tokens rounded up to ``pad_multiple``,
    with ``cu_seqlens`` (int32, [segments + 1]) and ``max_seqlen``. An empty group (a filler for
    the interleaved schedule) is one masked row of ``pad_multiple`` tokens.

    Keys: tokens, position_ids, targets (next token of the same sequence), loss_mask (float, 1
    at positions predicting a response token), rollout_logp, orm_adv (0 until filled unless
    ``batch.advantages`` is set),
    teacher_logp (0 until filled), seq_ids (rollout-batch index; -1 on padding), ``index``
    (list[int]) and, with ``slots``, resp_pos / resp_slot (see the module docstring).
    """
    out = []
    for idx in groups:
        rows = [_row(batch, i) for i in idx]
        if packed:
            total = sum(map(len, rows))
            t = max(pad_multiple, -(-total // pad_multiple) * pad_multiple)
            shape, starts = (1, t), []
            cur = 0
            for r in rows:
                starts.append(cur)
                cur += len(r)
        else:
            s = length or max((len(r) for r in rows), default=1)
            s = -(-s // pad_multiple) * pad_multiple  # sequence parallel splits s over TP
            shape, starts = (max(len(rows), 1), s), [0] * len(rows)
        b, s = shape
        tokens = torch.full(shape, pad_id, dtype=torch.long)
        targets = torch.full(shape, pad_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape)
        rollout = torch.zeros(shape)
        adv = torch.zeros(shape)
        seq_ids = torch.full(shape, -1, dtype=torch.long)
        resp_pos, resp_slot = [], []
        for r, (i, full, start) in enumerate(zip(idx, rows, starts)):
            row = 0 if packed else r
            if start + len(full) > s:
                raise ValueError(f"sequence {i} has {len(full)} tokens > pack length {s}")
            span = slice(start, start + len(full))
            tokens[row, span] = torch.tensor(full, dtype=torch.long)
            targets[row, start:start + len(full) - 1] = tokens[row, start + 1:start + len(full)]
            position_ids[row, span] = torch.arange(len(full))
            seq_ids[row, span] = i
            rp = response_positions(batch.samples[i])
            pos = slice(start + rp.start, start + rp.stop)
            mask[row, pos] = 1.0
            rollout[row, pos] = torch.tensor(batch.samples[i].logprobs, dtype=torch.float32)
            if batch.advantages:  # known already (replay, tests); else filled when they arrive
                adv[row, pos] = float(batch.advantages[i])
            if slots is not None:
                n = rp.stop - rp.start
                resp_pos.append(torch.arange(n) + row * s + pos.start)
                resp_slot.append(torch.arange(n) + slots.offset[i])
        if not packed:
            # Rows end in padding; the padded (fixed) path has always let those positions
            # carry the sequence's own ids so that they look like one sequence.
            for r, i in enumerate(idx):
                seq_ids[r] = i
        mb = dict(tokens=tokens, position_ids=position_ids if packed else
                  torch.arange(s).expand(b, s), targets=targets, loss_mask=mask,
                  rollout_logp=rollout, orm_adv=adv,
                  teacher_logp=torch.zeros(shape), seq_ids=seq_ids)
        if packed:
            bounds = starts + [cur] + ([t] if t > cur else [])
            mb["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
            mb["max_seqlen"] = max(b2 - a for a, b2 in zip(bounds, bounds[1:]))
        if slots is not None:
            cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
            mb["resp_pos"], mb["resp_slot"] = cat(resp_pos), cat(resp_slot)
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        mb["index"] = list(idx)
        mb["real_tokens"] = sum(map(len, rows))
        out.append(mb)
    return out


def fill_from_slots(microbatches: list[dict], key: str, values: torch.Tensor) -> None:
    """``mb[key]`` at the response positions <- ``values[slot]`` (values: [slots.total])."""
    for mb in microbatches:
        if "resp_pos" in mb:
            mb[key].view(-1)[mb["resp_pos"]] = values[mb["resp_slot"]].to(mb[key].dtype)


def padded_fraction(microbatches: list[dict]) -> torch.Tensor:
    """tensor([padding tokens, all tokens]) over the micro-batches (float64)."""
    total = sum(mb["tokens"].numel() for mb in microbatches)
    real = sum(mb["real_tokens"] for mb in microbatches)
    return torch.tensor([total - real, total], dtype=torch.float64)


def rank_microbatches(batch: RolloutBatch, batching: Batching, *, global_batch_size: int,
                      optimizer_steps: int, dp: int, dp_rank: int, pad_id: int,
                      fixed_length: bool, device) -> tuple[list[list[dict]], list[int], ResponseSlots]:
    """This DP rank's micro-batches for each optimizer step of the rollout batch (step j takes
    sequences [j*gbs, (j+1)*gbs)), the rank's sequences and their response slots.
    ``fixed_length`` (fixed micro-batches with PP): every row padded to the batch's longest."""
    lengths = {i: seq_len(batch, i) for i in range(len(batch))}
    shares = [split_data_parallel(lengths, list(range(j * global_batch_size,
                                                      (j + 1) * global_batch_size)),
                                  dp, batching.by_tokens)[dp_rank]
              for j in range(optimizer_steps)]
    mine = [i for share in shares for i in share]
    slots = ResponseSlots(batch, mine)
    length = max(lengths.values()) if fixed_length and not batching.by_tokens else None
    steps = [build_microbatches(batch, batching.groups(lengths, share), pad_id, slots=slots,
                                packed=batching.packed, length=length,
                                pad_multiple=batching.pad_multiple, device=device)
             for share in shares]
    return steps, mine, slots


def slot_values(slots: ResponseSlots, per_sequence) -> torch.Tensor:
    """[slots.total] each slot's sequence's value (e.g. its GRPO advantage)."""
    return torch.as_tensor(per_sequence, dtype=torch.float32)[slots.seq_of_slot()]


def per_domain_sums(batch: RolloutBatch, slots: ResponseSlots,
                    values: torch.Tensor) -> dict[str, torch.Tensor]:
    """{domain: tensor([sum of values over its slots, slots])} (float64, on the host: one copy)."""
    domains = sorted(set(batch.domains))
    dom_of_seq = torch.tensor([domains.index(d) for d in batch.domains], dtype=torch.long)
    dom = dom_of_seq[slots.seq_of_slot()].to(values.device)
    sums = torch.zeros(len(domains), 2, dtype=torch.float64, device=values.device)
    sums[:, 0].index_add_(0, dom, values.double())
    sums[:, 1].index_add_(0, dom, torch.ones_like(values, dtype=torch.float64))
    sums = sums.cpu()
    return {d: sums[k] for k, d in enumerate(domains) if sums[k, 1] > 0}


def rollout_logp_slots(batch: RolloutBatch, slots: ResponseSlots) -> torch.Tensor:
    """[slots.total] log mu of each response token."""
    return torch.tensor([lp for i in slots.offset for lp in batch.samples[i].logprobs],
                        dtype=torch.float32)


def pack_microbatches(batch: RolloutBatch, indices: list[int], micro_batch_size: int,
                      pad_id: int, length: int | None = None,
                      device: torch.device | str = "cpu") -> list[dict]:
    """Fixed micro-batches of ``micro_batch_size`` consecutive ``indices``, each row padded to
    ``length`` or to its micro-batch's longest sequence (no response slots)."""
    groups = Batching(micro_batch_size).groups({}, list(indices))
    return build_microbatches(batch, groups, pad_id, length=length, device=device)


@dataclass
class Prepared:
    """This rank's share of one rollout batch, ready for the loss."""

    steps: list[list[dict]]          # micro-batches of each optimizer step
    slots: object                    # trainer.microbatches.ResponseSlots of the rank's sequences
    kl: dict[str, torch.Tensor]      # {domain: [sum(log mu - log pi_dom), tokens]} (last stage)
    padded: torch.Tensor             # [padding tokens, all tokens] of the micro-batches
    batch: RolloutBatch | None = None
    signal: object = None            # teachers.TeacherSignal (last stage)

    def exact_kl(self) -> dict[str, torch.Tensor]:
        """{domain: [sum of KL_t, tokens]} the loss measured (loss.signal != sampled)."""
        sig = self.signal
        if sig is None or sig.kl is None:
            return {}
        seen = ~torch.isnan(sig.kl)
        return per_domain_sums(self.batch, self.slots, torch.where(seen, sig.kl, 0.0)) \
            if bool(seen.all()) else {}
