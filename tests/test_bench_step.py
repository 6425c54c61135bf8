"""benchmarks/bench_step.py runs end to end (--quick, TP=1) and reports the three groupings on
the same batch. Timings are never asserted here; only what does not depend on the machine:
which paths ran, their padding, and that they computed the same loss."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_reports_every_path(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick",
                           "--layouts", "tp1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["script"] == "benchmarks/bench_step.py" and res["commit"] and res["cpu"]
    paths = res["layouts"]["tp1"]
    assert sorted(r["kind"] for r in paths.values()) == ["budget", "fixed", "packed"]
    by_kind = {r["kind"]: r for r in paths.values()}
    fixed, budget, packed = by_kind["fixed"], by_kind["budget"], by_kind["packed"]
    assert packed["student_padded"] < fixed["student_padded"]
    assert packed["teacher_padded"] < fixed["teacher_padded"]
    assert packed["student_padded"] == 0.0  # pad_multiple 1: a packed row has no padding
    assert fixed["max_tokens"] is None and budget["max_tokens"] == packed["max_tokens"]
    for r in paths.values():
        assert r["teacher_calls"] == 2          # one schedule call per teacher
        assert r["ok"] and r["loss_spread"] <= 1e-6  # every repeat from the same weights
        assert abs(r["loss"] - fixed["loss"]) < 2e-5  # the same step, whatever the grouping
        assert r["teacher_s"] > 0 and r["student_s"] > 0
    # the table printed names every path
    for name in paths:
        assert f"| tp1 | {name} |" in proc.stdout
