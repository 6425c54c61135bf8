"""The rollout engine interface: what the training loop needs from an inference engine.

The loop only talks to this interface; SGLang is one implementation (sglang_engine.py). A
sample carries the engine's own per-token log-probs, which are log mu in the MOPD importance
weight w_t = pi_theta / mu, and the weight version that produced it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = ["SamplingParams", "Sample", "RolloutEngine", "NamedTensorBucket"]

# One bucket of the converter's export: [(hf_name, tensor), ...], sized to ~N MiB.
NamedTensorBucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (mirrors the fields of rollout config)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def to_sglang(self) -> dict:
        out = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                   max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        return out


@dataclass
class Sample:
    """One response to one prompt."""

    prompt_index: int                 # position of the prompt in the generate() call
    sample_index: int                 # 0..n-1 within the prompt's group
    prompt_token_ids: list[int]
    token_ids: list[int]              # [T] response tokens
    logprobs: list[float]             # [T] log mu(y_t | prefix), from the engine
    finish_reason: str                # "stop" | "length" | "abort"
    weight_version: str               # engine weight version that generated the response
    retries: int = 0                  # times this request was resubmitted after a failure
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Sample: {len(self.token_ids)} tokens but {len(self.logprobs)} "
                             "log-probs; the engine response is inconsistent")


class RolloutEngine(abc.ABC):
    """Generation with log-probs, weight updates and memory control for the training loop.

    This class declares everything the loop calls; the loop never probes an engine for
    attributes. Class attributes describe how the loop drives it:
    ``collective``: every trainer rank calls generate() (in-trainer engines) instead of the
    driver alone; ``needs_weight_sync``: it samples from a copy of the weights that the loop
    must update after each optimizer step (false for engines that read the live weights).
    """

    collective: bool = False
    needs_weight_sync: bool = True

    @abc.abstractmethod
    def generate(self, prompts_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, ordered prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""

    @abc.abstractmethod
    def update_weights(self, named_tensor_buckets: Iterable[NamedTensorBucket],
                       version: str):
        """Load new weights (HF names) streamed in buckets; afterwards report `version`.
        Server engines return their SyncStats (bytes, transport) for the sync metrics."""

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Free the engine's weights and KV cache (colocated: before the training step)."""

    @abc.abstractmethod
    def resume_memory(self) -> None:
        """Re-occupy what release_memory freed (colocated: after the training step)."""

    @abc.abstractmethod
    def health(self) -> dict[str, bool]:
        """{server_url: healthy} for every server behind the engine."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Abort all in-flight generation; pending generate() calls return what they have."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop everything this engine started. Safe to call twice."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume this engine exactly ({}: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def connect_weight_group(self, master_address: str, master_port: int,
                             backend: str | None = None) -> None:
        """Join a process group with the trainer through which update_weights broadcasts
        (engines on other nodes). Engines that share memory with the trainer have none."""
        raise NotImplementedError(f"{type(self).__name__} has no weight-update group")

    def disconnect_weight_group(self) -> None:
        """Leave the weight-update group, if connected; safe to call when not connected."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
