"""The verifier interface every reward type implements."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One scored response: `reward` (usually 0.0 or 1.0; fractional for partial code credit)
    and a short human-readable `reason` for logs and debugging."""

    reward: float
    reason: str


class Verifier:
    """Scores one response against its dataset row. Implementations must be thread-safe:
    `RewardRegistry.score_batch` calls `score` from several threads at once."""

    def score(self, response: str, row: dict) -> RewardResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release processes or other resources. Idempotent."""
