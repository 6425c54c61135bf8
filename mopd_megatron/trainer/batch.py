"""One rollout batch (its micro-batches: trainer/microbatches.py).

A sequence is prompt + response. Position t of the padded ``tokens`` row predicts token t+1, so
every per-token tensor is aligned to the *predicting* position: response token j (0-based)
of a prompt of P tokens is predicted at position P-1+j. ``loss_mask`` is 1 exactly there;
prompt tokens and padding are 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data import PromptRow
from ..rollout.engine import Sample

__all__ = ["RolloutBatch", "response_positions"]


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
