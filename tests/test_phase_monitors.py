"""What a rank reports about its phases: the watchdog's line when one lasts too long
(runtime.phase_warn_minutes) and the peak memory of each (mem/<phase>_max_gib), with the
planner's terms beside it at the first step."""
from __future__ import annotations

import io
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_watchdog_names_the_phase_and_step_once():
    from mopd_megatron.trainer.watchdog import PhaseWatchdog
    out = io.StringIO()
    dog = PhaseWatchdog(5, 0.05, timeout_minutes=30, stream=out, poll_s=0.01)
    try:
        with dog.phase("student", 12):
            time.sleep(0.02)          # under the threshold: nothing yet
            assert out.getvalue() == ""
            time.sleep(0.3)
        with dog.phase("sync", 12):  # a short phase after it: nothing more
            pass
        time.sleep(0.1)
    finally:
        dog.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("watchdog: rank 5 still in phase student (step 12) after ")
    assert "runtime.timeout_minutes=30" in lines[0]


def test_watchdog_speaks_while_its_rank_is_blocked():
    """A rank waiting in a collective holds no Python; the line comes from the thread, and a
    start-up phase has no step. The enclosing phase is restored when an inner one ends."""
    from mopd_megatron.trainer.watchdog import PhaseWatchdog
    out = io.StringIO()
    dog = PhaseWatchdog(0, 0.05, stream=out, poll_s=0.01)
    try:
        with dog.phase("start-up", None):
            with dog.phase("start-up: teachers", None):
                threading.Event().wait(0.3)   # blocked, as in a collective
            threading.Event().wait(0.3)
    finally:
        dog.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "still in phase start-up: teachers after " in lines[0]
    assert "still in phase start-up after" in lines[1] and "step" not in out.getvalue()


def test_watchdog_off_and_default_threshold():
    from mopd_megatron.config import RuntimeConfig
    from mopd_megatron.trainer.watchdog import PhaseWatchdog
    assert PhaseWatchdog(0, 0)._thread is None                 # 0: no thread at all
    assert RuntimeConfig().phase_warn_seconds == 15 * 60      # half the 30-minute timeout
    assert RuntimeConfig(timeout_minutes=60, phase_warn_minutes=2.5).phase_warn_seconds == 150


def test_phase_memory_records_each_phase_peak():
    from mopd_megatron.trainer.memory import PhaseMemory
    mem = PhaseMemory(cuda=False)
    with mem("teacher"):
        block = bytearray(256 * 2 ** 20)
        block[::4096] = b"x" * len(block[::4096])   # touch the pages: resident
        del block
    with mem("student"):
        pass
    got = mem.pop()
    assert set(got) == {"mem/teacher_max_gib", "mem/student_max_gib"}
    assert got["mem/teacher_max_gib"] > 0.25 > 0 < got["mem/student_max_gib"]
    if mem.resettable:  # the peak was reset as "student" started: the block is not in it
        assert got["mem/student_max_gib"] < got["mem/teacher_max_gib"] - 0.2
    assert mem.pop() == {}


def test_memory_report_puts_the_plan_beside_the_measurement():
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.memory import PhaseMemory, memory_report
    cfg = load_recipe(ROOT / "recipes" / "mopd_70b.yaml")   # known configs: no model files
    layout = types.SimpleNamespace(rank=0, pp_rank=0, pp=cfg.parallel.pp, nodes=8,
                                   local_world_size=8, world_size=64)
    measured = {"mem/student_max_gib": 1.5, "mem/teacher_max_gib": 1.25}
    text = memory_report(cfg, layout, measured, PhaseMemory(cuda=False), 1)
    assert text.startswith("memory at step 1, rank 0 (pipeline stage 1 of 4)")
    assert "plan  student weights" in text and "plan  optimizer state" in text
    assert "phase student  plan" in text and "measured host RSS peak 1.500 GiB" in text
    assert "not comparable" in text   # CPU: GPU plan vs host RSS, said so


def test_memory_report_without_a_plan(tmp_path):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.memory import PhaseMemory, memory_report
    cfg = load_recipe(ROOT / "recipes" / "mopd_70b.yaml",
                      [f"model.hf_config={tmp_path}/unknown_model"])
    layout = types.SimpleNamespace(rank=0, pp_rank=0, pp=4, nodes=8, local_world_size=8,
                                   world_size=64)
    text = memory_report(cfg, layout, {"mem/rollout_max_gib": 2.0}, PhaseMemory(cuda=False), 3)
    assert "plan unavailable" in text and "measured host RSS peak 2.000 GiB" in text
