"""Metric sinks: a console progress line, a JSONL file, TensorBoard and W&B, behind one
``MetricLogger`` that fans out and is silent on every rank but the one it is told to log on.

Metrics are flat ``{name: number}`` dicts per step, names with ``/`` groups (``reward/math``,
``time/rollout``); tensors and numpy scalars are converted here, so callers pass what they have.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

__all__ = ["MetricSink", "ConsoleSink", "JsonlSink", "TensorBoardSink", "WandbSink",
           "MetricLogger", "PhaseTimer", "to_scalars"]


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats from numbers, 0-d tensors and numpy scalars (one host sync per tensor)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"metric {k!r} is {type(v).__name__}, not a number")
        out[k] = float(v)
    return out


class MetricSink:
    """One destination for per-step metrics."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConsoleSink(MetricSink):
    """``step 3/50 | loss 0.123 | reward/math 0.45 | ... | time/step 1.2``: one line per step.

    ``keys`` picks and orders what is shown; glob patterns (``acc/*``) expand to every matching
    metric in sorted order. Everything else goes only to the file sinks.
    """

    DEFAULT_KEYS = ("loss", "reward/*", "acc/*", "eval/*", "kl/*", "is/w_mean", "is/masked_frac",
                    "response_len/mean", "tokens_per_s", "time/step")

    def __init__(self, total_steps: int, keys: Iterable[str] = DEFAULT_KEYS,
                 stream: TextIO | None = None):
        self.total_steps, self.keys = total_steps, tuple(keys)
        self.stream = stream

    def format(self, step: int, metrics: Mapping[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        shown: set[str] = set()
        for pattern in self.keys:
            for name in sorted(fnmatch.filter(metrics, pattern)) if "*" in pattern else [pattern]:
                if name in metrics and name not in shown:
                    shown.add(name)
                    parts.append(f"{name} {_short(metrics[name])}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        stream = self.stream or sys.stdout  # looked up late so pytest's capture sees it
        print(self.format(step, metrics), file=stream, flush=True)


def _short(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


class JsonlSink(MetricSink):
    """One JSON object per step (``{"step": 3, "time": ..., "loss": ...}``), flushed per line.

    Non-finite values are written as null (strict JSON has no NaN). ``resume_step`` drops lines
    of steps after it, left by a run that crashed past its last checkpoint, so the file of a
    resumed run reads like the uninterrupted run's.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._f = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink(MetricSink):
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(MetricSink):
    def __init__(self, project: str, entity: str | None = None, mode: str = "online",
                 run_name: str | None = None, config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                f"logging.wandb_project={project!r} is set but wandb is not installed: "
                "pip install wandb, or set logging.wandb_project=null") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, mode=mode, name=run_name,
                              config=dict(config or {}))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Fans each step's metrics out to the sinks. ``enabled=False`` (every rank but the logging
    one) makes it a no-op, so callers never branch on rank."""

    def __init__(self, sinks: Iterable[MetricSink], *, enabled: bool = True, interval: int = 1):
        self.sinks = list(sinks) if enabled else []
        self.enabled, self.interval = enabled, interval

    @classmethod
    def from_config(cls, cfg: Any, *, total_steps: int, enabled: bool,
                    run_config: Mapping[str, Any] | None = None,
                    resume_step: int | None = None) -> "MetricLogger":
        """Build the sinks a ``LoggingConfig`` asks for (nothing is created when not enabled)."""
        sinks: list[MetricSink] = []
        if enabled:
            if cfg.console:
                sinks.append(ConsoleSink(total_steps))
            if cfg.jsonl_path:
                sinks.append(JsonlSink(cfg.jsonl_path, resume_step=resume_step))
            if cfg.tensorboard_dir:
                sinks.append(TensorBoardSink(cfg.tensorboard_dir))
            if cfg.wandb_project and cfg.wandb_mode != "disabled":
                sinks.append(WandbSink(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode,
                                       cfg.wandb_run_name, run_config))
        return cls(sinks, enabled=enabled, interval=cfg.interval)

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> None:
        """Log ``metrics`` for ``step`` if it falls on the interval (or ``force``)."""
        if not self.sinks or (step % self.interval != 0 and not force):
            return
        scalars = to_scalars(metrics)
        for sink in self.sinks:
            sink.log(step, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PhaseTimer:
    """``with timer("rollout"): ...`` adds the elapsed seconds to ``time/rollout``; ``pop()``
    returns the step's timings and starts the next step from zero.

    ``sync`` runs before each reading (``torch.cuda.synchronize`` on GPU, where kernels are
    asynchronous and the clock would otherwise stop before the work does).
    """

    def __init__(self, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock
        self._totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        start = self.clock()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            key = f"time/{name}"
            self._totals[key] = self._totals.get(key, 0.0) + (self.clock() - start)

    def record(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere (work that overlapped the phases, e.g. the
        verifiers' wall time while the teachers scored)."""
        key = f"time/{name}"
        self._totals[key] = self._totals.get(key, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        out, self._totals = self._totals, {}
        return out
