"""Domain -> verifier registry: the one object the trainer uses to turn responses into rewards.

    rewards = build_reward_registry({
        "math": {"type": "math", "answer_key": "answer", "timeout_s": 10},
        "code": {"type": "code", "tests_key": "tests", "sandbox": {"wall_time_s": 10}},
        "add":  {"type": "exact_match", "extract": r"(-?\\d+)\\s*$"},
    }, max_workers=4)
    r = rewards.score("math", response_text, row)          # RewardResult(reward, reason)
    rs = rewards.score_batch([(domain, text, row), ...])   # same order as the input
    rewards.close()

The verifier types are listed in VERIFIER_TYPES, in this file only: nothing registers itself on
import. Domain names are whatever the recipe calls them; several domains may share a type.
"""
from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from mopd_megatron.rewards.code_verifier import CodeVerifier
from mopd_megatron.rewards.math_verifier import MathVerifier
from mopd_megatron.rewards.sandbox import SandboxUnavailable
from mopd_megatron.rewards.simple import ExactMatchVerifier, RegexVerifier
from mopd_megatron.rewards.types import RewardResult, Verifier

VERIFIER_TYPES: dict[str, type[Verifier]] = {
    "math": MathVerifier,
    "code": CodeVerifier,
    "exact_match": ExactMatchVerifier,
    "regex": RegexVerifier,
}


def _build_verifier(domain: str, spec: dict, max_workers: int) -> Verifier:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"reward domain '{domain}': expected a mapping with a 'type' field "
                         f"(one of {sorted(VERIFIER_TYPES)}), got {spec!r}")
    kind = spec["type"]
    if kind not in VERIFIER_TYPES:
        raise ValueError(f"reward domain '{domain}': unknown verifier type '{kind}'; "
                         f"known types: {sorted(VERIFIER_TYPES)}")
    cls = VERIFIER_TYPES[kind]
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"reward domain '{domain}' (type '{kind}'): unknown field(s) "
                         f"{sorted(unknown)}; accepted: {sorted(accepted)}")
    if cls is MathVerifier:
        kwargs.setdefault("workers", max_workers)  # one math-verify process per pool thread
    try:
        return cls(**kwargs)
    except SandboxUnavailable as e:
        e.domain = domain  # so that start-up errors can name the recipe field
        raise


class RewardRegistry:
    """Maps each domain to its verifier; scores single items or batches with a bounded pool."""

    def __init__(self, verifiers: dict[str, Verifier], max_workers: int = 4):
        if max_workers < 1:
            raise ValueError(f"reward registry: max_workers must be >= 1, got {max_workers}")
        self.verifiers = dict(verifiers)
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None

    @property
    def domains(self) -> list[str]:
        return sorted(self.verifiers)

    def score(self, domain: str, response_text: str, row: dict) -> RewardResult:
        """Score one response. Raises KeyError for an unknown domain (listing the known ones)
        and for rows missing the fields their verifier needs; the program a response contains
        can only ever cost it reward, never raise."""
        try:
            verifier = self.verifiers[domain]
        except KeyError:
            raise KeyError(f"no reward verifier for domain '{domain}'; "
                           f"known domains: {self.domains}") from None
        return verifier.score(response_text, row)

    def score_batch(self, items: Sequence[tuple[str, str, dict]]) -> list[RewardResult]:
        """Score (domain, response_text, row) items concurrently on at most max_workers
        threads; results come back in input order. The first exception is re-raised."""
        return self.start_batch(items).result()

    def start_batch(self, items: Sequence[tuple[str, str, dict]]) -> "PendingRewards":
        """``score_batch`` without waiting: the items are queued on the pool now (the trainer
        scores teachers meanwhile); ``.result()`` waits for them."""
        for domain, _, _ in items:  # fail before starting any work
            if domain not in self.verifiers:
                raise KeyError(f"no reward verifier for domain '{domain}'; "
                               f"known domains: {self.domains}")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward")
        return PendingRewards([self._pool.submit(self.score, *item) for item in items])

    def close(self) -> None:
        """Stop the thread pool and any verifier processes. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for verifier in self.verifiers.values():
            verifier.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PendingRewards:
    """A batch being scored: ``result()`` -> results in input order (the first error raised);
    ``seconds`` -> wall time from the start to the last result (set by ``result``)."""

    def __init__(self, futures: list):
        import time
        self._futures, self._t0, self.seconds = futures, time.perf_counter(), None
        self._done_at = [None] * len(futures)
        for j, f in enumerate(futures):
            f.add_done_callback(lambda _f, j=j: self._done_at.__setitem__(j, time.perf_counter()))

    def result(self) -> list[RewardResult]:
        out = [f.result() for f in self._futures]
        ends = [t for t in self._done_at if t is not None]
        self.seconds = (max(ends) - self._t0) if ends else 0.0
        return out


def build_reward_registry(domains: dict[str, dict], max_workers: int = 4) -> RewardRegistry:
    """Build every domain's verifier from its config (a dict with 'type' plus that type's
    fields). Errors name the domain, the bad value and the accepted ones."""
    if not domains:
        raise ValueError("reward registry: no domains configured")
    if max_workers < 1:
        raise ValueError(f"reward registry: max_workers must be >= 1, got {max_workers}")
    built: dict[str, Verifier] = {}
    try:
        for domain, spec in domains.items():
            built[domain] = _build_verifier(domain, spec, max_workers)
    except BaseException:
        for verifier in built.values():
            verifier.close()
        raise
    return RewardRegistry(built, max_workers=max_workers)
