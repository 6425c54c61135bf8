"""Metric sinks: console line, JSONL, TensorBoard, W&B (fake module), fan-out, phase timer."""
from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
import torch

from mopd_megatron.config import LoggingConfig
from mopd_megatron.logging import (ConsoleSink, JsonlSink, MetricLogger, PhaseTimer,
                                   TensorBoardSink, WandbSink, to_scalars)

METRICS = {"loss": 0.123456, "reward/math": 0.5, "reward/code": 0.25, "acc/math": 0.75,
           "grad_norm": 3.0, "tokens_per_s": 1234.5, "time/step": 1.25}


def test_console_line_is_compact_and_ordered():
    out = io.StringIO()
    ConsoleSink(50, stream=out).log(3, METRICS)
    # reward/* expands sorted; grad_norm is not a console key; integers print without '.0'.
    assert out.getvalue() == ("step 3/50 | loss 0.1235 | reward/code 0.25 | reward/math 0.5 | "
                              "acc/math 0.75 | tokens_per_s 1234 | time/step 1.25\n")
    assert ConsoleSink(5, keys=["grad_norm", "nope"]).format(1, METRICS) == "step 1/5 | grad_norm 3"
    assert ConsoleSink(5, keys=["loss"]).format(1, {"loss": float("nan")}) == "step 1/5 | loss nan"


def test_to_scalars_accepts_tensors_and_numpy():
    got = to_scalars({"a": torch.tensor(2.5), "b": np.float32(0.5), "c": 3})
    assert got == {"a": 2.5, "b": 0.5, "c": 3.0} and all(type(v) is float for v in got.values())
    with pytest.raises(TypeError, match="metric 'd' is str"):
        to_scalars({"d": "x"})


def test_jsonl_is_flushed_per_step_and_resume_truncates(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in (1, 2, 3):
        sink.log(step, {"loss": step / 10, "bad": float("nan")})
        # Readable while the sink is still open: each line is flushed.
        assert len(path.read_text().splitlines()) == step
    sink.close()
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[2]["loss"] == 0.3 and recs[0]["bad"] is None
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # the crash cut the last line short
    sink = JsonlSink(path, resume_step=2)  # resumed from the step-2 checkpoint
    sink.log(3, {"loss": 0.33})
    sink.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.33


def test_tensorboard_values_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sink = TensorBoardSink(tmp_path / "tb")
    sink.log(1, {"loss": 0.5, "reward/math": 0.25})
    sink.log(2, {"loss": 0.25})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("reward/math")] == [(1, 0.25)]


def test_wandb_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match=r"logging.wandb_project='proj' is set but wandb is not "
                                           r"installed: pip install wandb"):
        WandbSink("proj")


def test_wandb_sink_calls_the_api(monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggingConfig(console=False, wandb_project="p", wandb_entity="e", wandb_mode="offline")
    with MetricLogger.from_config(cfg, total_steps=2, enabled=True, run_config={"lr": 1}) as ml:
        ml.log(1, {"loss": torch.tensor(0.5)})
    assert calls == [("init", {"project": "p", "entity": "e", "mode": "offline", "name": None,
                               "config": {"lr": 1}}),
                     ("log", {"loss": 0.5}, 1), ("finish",)]


def test_logger_fans_out_and_only_the_enabled_rank_writes(tmp_path, capsys):
    cfg = LoggingConfig(jsonl_path=str(tmp_path / "m.jsonl"), tensorboard_dir=str(tmp_path / "tb"),
                        interval=2)
    with MetricLogger.from_config(cfg, total_steps=4, enabled=False) as other_rank:
        other_rank.log(2, {"loss": 1.0})
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "tb").exists()
    assert capsys.readouterr().out == ""
    with MetricLogger.from_config(cfg, total_steps=4, enabled=True) as ml:
        for step in (1, 2, 3):
            ml.log(step, {"loss": step * 1.5})
        ml.log(3, {"loss": 9.0}, force=True)  # e.g. the final step off the interval
    assert capsys.readouterr().out == "step 2/4 | loss 3\nstep 3/4 | loss 9\n"
    assert [json.loads(l)["step"] for l in (tmp_path / "m.jsonl").read_text().splitlines()] == [2, 3]
    assert any((tmp_path / "tb").iterdir())


def test_phase_timer_accumulates_and_resets():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 13.0])
    synced = []
    timer = PhaseTimer(sync=lambda: synced.append(1), clock=lambda: next(ticks))
    with timer("rollout"):
        pass
    with timer("teacher"):
        pass
    assert timer.pop() == {"time/rollout": 1.5, "time/teacher": 0.25}
    with pytest.raises(KeyError):
        with timer("rollout"):
            raise KeyError("a failing phase still records its time")
    assert timer.pop() == {"time/rollout": 3.0} and len(synced) == 6
    assert timer.pop() == {}
    real = PhaseTimer()
    with real("x"):
        pass
    assert 0 <= real.pop()["time/x"] < 1
