"""Record once, replay many: rollouts saved from one run and replayed, without any inference
engine, through other parallel layouts, train-only debugging and the tests.

A recording is a list of generate() answers (one list[Sample] per call, in call order), saved
with ``torch.save``. Replay checks that the trainer asks for the same prompts in the same order
(the sampler is deterministic); a mismatch is an error, never a silent substitution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .engine import RolloutEngine, Sample, SamplingParams
from .local import InProcessEngine

__all__ = ["RecordingEngine", "ReplayEngine"]


class RecordingEngine(RolloutEngine):
    """Wraps an engine and appends every generate() answer to ``path`` (rewritten per call)."""

    def __init__(self, inner: RolloutEngine, path: str | Path):
        self.inner, self.path, self.calls = inner, Path(path), []
        self.collective = inner.collective
        self.needs_weight_sync = inner.needs_weight_sync

    def generate(self, prompts_token_ids, n, sampling):
        out = self.inner.generate(prompts_token_ids, n, sampling)
        self.calls.append(out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.calls, self.path)
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def update_weights(self, buckets, version):
        return self.inner.update_weights(buckets, version)

    def release_memory(self):
        self.inner.release_memory()

    def resume_memory(self):
        self.inner.resume_memory()

    def health(self):
        return self.inner.health()

    def abort(self):
        self.inner.abort()

    def shutdown(self):
        self.inner.shutdown()


class ReplayEngine(InProcessEngine):
    """Answers generate() call k with the k-th recorded answer."""

    collective = False
    needs_weight_sync = False
    health_name = "replay"

    def __init__(self, calls: list[list[Sample]] | str | Path):
        if not isinstance(calls, list):
            calls = torch.load(calls, weights_only=False)
        self.recorded, self.calls, self.version = calls, 0, "replay"

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        k = self.calls
        if k >= len(self.recorded):
            raise RuntimeError(f"ReplayEngine: generate call {k} but only {len(self.recorded)} "
                               "were recorded (run fewer steps or record more)")
        out = self.recorded[k]
        want = [list(p) for p in prompts_token_ids for _ in range(n)]
        got = [list(s.prompt_token_ids) for s in out]
        if want != got:
            raise RuntimeError(f"ReplayEngine: call {k} asks for other prompts (or another n) than "
                               "the recording; the data, sampler seed or batch size changed")
        self.calls += 1
        return out

