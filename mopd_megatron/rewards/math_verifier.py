"""Math reward: extract the final answer, compare it with the gold answer using math-verify.

Extraction (cheap, in this process): the last \\boxed{...} / \\fbox{...} (balanced braces), else
an anchored final answer ("final answer is X", "answer: X", "#### X"), else the response's last
2000 characters are handed to math-verify's own extraction. Equivalence (fractions, LaTeX,
numeric tolerance, sets, intervals) is math-verify's `verify`, run in worker processes that are
killed and replaced when an item exceeds its timeout: math-verify/sympy can hang or allocate
without bound on adversarial LaTeX, and only a process can be stopped from outside.
"""
from __future__ import annotations

import json
import os
import queue
import re
import selectors
import subprocess
import sys
import threading
import time
import weakref

from mopd_megatron.rewards.types import RewardResult, Verifier

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")
_ANCHORED = re.compile(
    r"(?:final answer is|final answer:|answer is|answer:|####)\s*(.+?)\s*(?:\.\s*)?$",
    re.IGNORECASE | re.MULTILINE)


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def extract_answer(text: str) -> tuple[str, str]:
    """(string to hand to math-verify, how it was found: 'boxed' | 'anchored' | 'tail')."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return f"${boxed}$", "boxed"
    matches = _ANCHORED.findall(text)
    if matches:
        ans = matches[-1].strip().strip("$").strip()
        return f"${ans}$", "anchored"
    return text[-2000:], "tail"


class _Worker:
    def __init__(self, memory_mb: int, startup_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, _WORKER, str(memory_mb << 20)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True)  # the trainer's Ctrl-C is handled by the trainer, not here
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        if self.readline(startup_timeout_s) is None:
            self.kill()
            raise RuntimeError(f"math-verify worker did not start within {startup_timeout_s}s "
                               f"(is math-verify installed for {sys.executable}?)")

    def readline(self, timeout_s: float) -> dict | None:
        if not self._sel.select(timeout=timeout_s):
            return None
        line = self.proc.stdout.readline()  # a response is one short line; written in one go
        return json.loads(line) if line else None

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self._sel.close()


class MathWorkerPool:
    """Up to `size` math-verify processes, started on demand, replaced after a timeout."""

    def __init__(self, size: int, memory_mb: int = 4096, startup_timeout_s: float = 120.0):
        self.size, self.memory_mb, self.startup_timeout_s = size, memory_mb, startup_timeout_s
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.Semaphore(size)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        weakref.finalize(self, MathWorkerPool._kill_all, self._all)

    def check(self, gold: str, pred: str, timeout_s: float) -> dict:
        """math-verify's verdict, or {"timeout": True} when it took longer than timeout_s."""
        with self._slots:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = _Worker(self.memory_mb, self.startup_timeout_s)
                with self._lock:
                    self._all.add(worker)
            try:
                worker.proc.stdin.write(json.dumps({"gold": gold, "pred": pred}) + "\n")
                worker.proc.stdin.flush()
                resp = worker.readline(timeout_s)
            except (BrokenPipeError, OSError, ValueError):
                resp = None
            if resp is None:  # hung or died: never reuse it
                with self._lock:
                    self._all.discard(worker)
                worker.kill()
                return {"timeout": True}
            self._idle.put(worker)
            return resp

    @staticmethod
    def _kill_all(workers):
        for w in list(workers):
            w.kill()
        workers.clear()

    def close(self):
        with self._lock:
            MathWorkerPool._kill_all(self._all)


class MathVerifier(Verifier):
    """Config: answer_key (row field with the gold answer, default "answer"), timeout_s (per
    item, default 10), memory_mb (worker address-space cap, default 4096), max_chars (response
    tail kept, default 20000). Reward 1.0 if equivalent, else 0.0."""

    def __init__(self, answer_key: str = "answer", timeout_s: float = 10.0,
                 memory_mb: int = 4096, max_chars: int = 20000, workers: int = 2):
        if timeout_s <= 0:
            raise ValueError(f"math verifier: timeout_s must be > 0, got {timeout_s!r}")
        self.answer_key, self.timeout_s, self.max_chars = answer_key, timeout_s, max_chars
        self.pool = MathWorkerPool(workers, memory_mb=memory_mb)

    def score(self, response: str, row: dict) -> RewardResult:
        if self.answer_key not in row:
            raise KeyError(f"math verifier: row has no '{self.answer_key}' field "
                           f"(fields: {sorted(row)})")
        pred, how = extract_answer(response[-self.max_chars:])
        t0 = time.monotonic()
        resp = self.pool.check(str(row[self.answer_key]), pred, self.timeout_s)
        if resp.get("timeout"):
            return RewardResult(0.0, f"math-verify timed out after {self.timeout_s}s")
        if resp["error"]:
            return RewardResult(0.0, f"{resp['error']} ({how})")
        verdict = "correct" if resp["correct"] else "wrong"
        return RewardResult(1.0 if resp["correct"] else 0.0,
                            f"{verdict}: {resp['pred_parsed']} vs gold {resp['gold_parsed']} "
                            f"({how}, {time.monotonic() - t0:.2f}s)")

    def close(self):
        self.pool.close()
