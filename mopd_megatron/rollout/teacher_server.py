"""Teacher-as-server: a frozen domain teacher served by SGLang instead of held in Megatron.

MOPD needs log pi_dom(y_t | x, y_<t) for each sampled response token. A teacher served by
SGLang computes it as prompt log-probs of the concatenated sequence (zero new tokens), which
frees trainer memory at the cost of one HTTP round trip per sequence.
"""
from __future__ import annotations

from typing import Sequence

from .sglang_engine import SGLangEngine

__all__ = ["ServedTeacher"]


class ServedTeacher:
    """Scores (prompt, response) pairs with a teacher model behind SGLang servers."""

    def __init__(self, engine: SGLangEngine, domain: str):
        self.engine, self.domain = engine, domain

    def response_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """[len(response_i)] log pi_dom(y_t | x, y_<t) per pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"ServedTeacher[{self.domain}]: {len(prompts)} prompts but "
                             f"{len(responses)} responses")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"ServedTeacher[{self.domain}]: prompt {i} is empty; the first "
                                 "response token needs context")
        full = [list(p) + list(r) for p, r in zip(prompts, responses)]
        scored = self.engine.score(full)   # [L - 1] each: position t predicts token t + 1
        return [s[len(p) - 1:] for s, p in zip(scored, prompts)]

    def shutdown(self) -> None:
        self.engine.shutdown()
