"""Which phase a rank is stuck in (runtime.phase_warn_minutes).

A hung collective shows on every rank as the same silence until the process-group timeout
kills the job, and the timeout's traceback names the collective, not the rank that never came
to it. Each rank therefore runs one daemon thread that knows the phase the trainer is in (set by
``Trainer.phase`` and the start-up builds) and prints once per phase entry when it has lasted
longer than the threshold: the ranks waiting in a collective all name one phase; the rank they
wait for names another (or is still in its work).

The thread only reads a few attributes under a lock; collectives release the GIL while they
wait, so it runs while its rank is blocked.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

__all__ = ["PhaseWatchdog"]


class PhaseWatchdog:
    """``with watchdog.phase("teacher", step): ...``; a phase longer than ``warn_after_s``
    prints ``rank R still in phase <name> (step S) after N min`` (step None: a start-up
    phase). ``warn_after_s <= 0``: off (no thread)."""

    def __init__(self, rank: int, warn_after_s: float, *, timeout_minutes: int | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float | None = None):
        self.rank, self.warn_after_s, self.timeout_minutes = rank, warn_after_s, timeout_minutes
        self.stream, self.clock = stream, clock
        self._lock = threading.Lock()
        self._current: tuple[str, int | None, float] | None = None  # (phase, step, start)
        self._warned = False
        self._stop = threading.Event()
        self._thread = None
        if warn_after_s > 0:
            # Poll a few times per threshold, so the line comes at most ~25% late.
            self._poll = poll_s if poll_s is not None else min(max(warn_after_s / 4, 0.01), 30.0)
            self._thread = threading.Thread(target=self._watch, name=f"phase-watchdog-{rank}",
                                            daemon=True)
            self._thread.start()

    @contextmanager
    def phase(self, name: str, step: int | None) -> Iterator[None]:
        with self._lock:
            outer, outer_warned = self._current, self._warned
            self._current, self._warned = (name, step, self.clock()), False
        try:
            yield
        finally:
            with self._lock:  # back to the enclosing phase (a start-up build inside start-up)
                self._current, self._warned = outer, outer_warned

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                cur, warned = self._current, self._warned
                if cur is None or warned or self.clock() - cur[2] < self.warn_after_s:
                    continue
                self._warned = True
            name, step, start = cur
            limit = (f"; the process-group timeout (runtime.timeout_minutes="
                     f"{self.timeout_minutes}) ends a collective wait at {self.timeout_minutes} min"
                     if self.timeout_minutes else "")
            at = f" (step {step})" if step is not None else ""
            held = self.clock() - start
            took = f"{held / 60:.1f} min" if held >= 60 else f"{held:.1f} s"
            print(f"watchdog: rank {self.rank} still in phase {name}{at} after {took}{limit}",
                  file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
