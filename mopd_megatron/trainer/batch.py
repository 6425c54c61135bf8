"""One rollout batch and its packing into padded micro-batches.

A sequence is prompt + response. Position t of the padded ``tokens`` row predicts token t+1, so
every per-token tensor is aligned to the *predicting* position: response token j (0-based)
of a prompt of P tokens is predicted at position P-1+j. ``loss_mask`` is 1 exactly there;
prompt tokens and padding are 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import PromptRow
from ..rollout.engine import Sample

__all__ = ["RolloutBatch", "pack_microbatches", "response_positions"]


@dataclass
class RolloutBatch:
    """What rollout and rewards produce for one step; picklable (broadcast, record/replay)."""

    rows: list[PromptRow]          # [prompts]
    samples: list[Sample]          # [prompts * n], prompt-major
    n: int                         # samples per prompt
    rewards: list[float] = field(default_factory=list)      # [prompts * n]
    advantages: list[float] = field(default_factory=list)   # [prompts * n], GRPO A_ORM
    texts: list[str] = field(default_factory=list)          # decoded responses (rewards, logs)

    def domain(self, i: int) -> str:
        return self.rows[self.samples[i].prompt_index].domain

    @property
    def domains(self) -> list[str]:
        return [self.domain(i) for i in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.samples)


def response_positions(sample: Sample) -> slice:
    """Positions of the padded row that predict the response tokens."""
    p = len(sample.prompt_token_ids)
    return slice(p - 1, p - 1 + len(sample.token_ids))


def pack_microbatches(batch: RolloutBatch, indices: list[int], micro_batch_size: int,
                      pad_id: int, length: int | None = None,
                      device: torch.device | str = "cpu") -> list[dict]:
    """Micro-batches of the sequences ``indices`` (in order), each padded to ``length`` (when
    given: pipeline parallelism needs one shape for all) or to its own longest sequence.

    Each dict holds [b, s] tensors: tokens, position_ids, targets, loss_mask (float),
    rollout_logp, orm_adv, teacher_logp (zeros until the teacher pool fills it), seq_ids (the
    sequence's index in the rollout batch, constant along the row), and ``index`` (list[int]).
    """
    if len(indices) % micro_batch_size:
        raise ValueError(f"{len(indices)} sequences do not split into micro-batches of "
                         f"{micro_batch_size}")
    out = []
    for start in range(0, len(indices), micro_batch_size):
        idx = indices[start:start + micro_batch_size]
        seqs = [batch.samples[i] for i in idx]
        s = length or max(len(x.prompt_token_ids) + len(x.token_ids) for x in seqs)
        b = len(idx)
        tokens = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros(b, s)
        rollout = torch.zeros(b, s)
        adv = torch.zeros(b, s)
        for r, (i, x) in enumerate(zip(idx, seqs)):
            full = list(x.prompt_token_ids) + list(x.token_ids)
            if len(full) > s:
                raise ValueError(f"sequence {i} has {len(full)} tokens > pack length {s}")
            tokens[r, :len(full)] = torch.tensor(full, dtype=torch.long)
            pos = response_positions(x)
            mask[r, pos] = 1.0
            rollout[r, pos] = torch.tensor(x.logprobs, dtype=torch.float32)
            adv[r, pos] = float(batch.advantages[i]) if batch.advantages else 0.0
        targets = torch.roll(tokens, -1, dims=1)
        targets[:, -1] = pad_id  # never a response position (masked), any valid id will do
        mb = dict(
            tokens=tokens, position_ids=torch.arange(s).expand(b, s), targets=targets,
            loss_mask=mask, rollout_logp=rollout, orm_adv=adv, teacher_logp=torch.zeros(b, s),
            seq_ids=torch.tensor(idx, dtype=torch.long)[:, None].expand(b, s).contiguous())
        mb = {k: v.to(device) for k, v in mb.items()}
        mb["index"] = list(idx)
        out.append(mb)
    return out
