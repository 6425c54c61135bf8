"""Weight-sync parity probe: does the engine now compute what the trainer computes?

After each sync, a fixed token sequence is scored by the engine (prompt log-probs, no
sampling) and compared with the trainer's own log-probs for the same sequence. A faulty sync
(a missed tensor, a transposed QKV, a wrong TP shard, a dtype slip) shows up as a mean
absolute difference far above numerical noise; the step is then refused, because every
importance weight pi_theta / mu would be wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["ParityResult", "ParityError", "parity_probe", "check_parity", "probe_tokens"]


class ParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class ParityResult:
    mean_abs_diff: float   # nats per token, averaged over every probed position
    max_abs_diff: float
    tokens: int


def probe_tokens(vocab_size: int, length: int = 32, seed: int = 1234) -> list[int]:
    """A fixed pseudo-random sequence: the same on every rank and every step."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def parity_probe(engine, sequences: Sequence[Sequence[int]],
                 trainer_logprobs: Sequence[Sequence[float]]) -> ParityResult:
    """Score `sequences` with engine.score and compare position by position.

    trainer_logprobs[i][t] = log pi_theta(x_{t+1} | x_<=t) for t = 0..L_i-2 ([L_i - 1] each).
    """
    engine_logprobs = engine.score(sequences)
    total, worst, count = 0.0, 0.0, 0
    for i, (ours, theirs) in enumerate(zip(engine_logprobs, trainer_logprobs, strict=True)):
        if len(ours) != len(theirs):
            raise ValueError(f"parity_probe: sequence {i}: engine scored {len(ours)} positions, "
                             f"trainer gave {len(theirs)} (expected len(sequence) - 1)")
        for a, b in zip(ours, theirs):
            d = abs(float(a) - float(b))
            total, worst, count = total + d, max(worst, d), count + 1
    if count == 0:
        raise ValueError("parity_probe: no positions to compare (sequences shorter than 2)")
    return ParityResult(total / count, worst, count)


def check_parity(engine, sequences, trainer_logprobs, tolerance: float,
                 where: str = "") -> ParityResult:
    """parity_probe, raising ParityError when the mean abs diff exceeds `tolerance` (nats);
    ``where`` (e.g. " on <url> at step 3") goes into the error."""
    result = parity_probe(engine, sequences, trainer_logprobs)
    if not result.mean_abs_diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"weight-sync parity probe failed{where}: mean |log p_engine - log p_trainer| = "
            f"{result.mean_abs_diff:.3g} nats > rollout.parity_tolerance={tolerance:g} "
            f"(max {result.max_abs_diff:.3g} over {result.tokens} tokens); the engine is not "
            "running the trainer's weights")
    return result
