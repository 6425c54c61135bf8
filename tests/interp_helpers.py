"""Running Triton kernels under TRITON_INTERPRET=1 from pytest.

TRITON_INTERPRET must be set before triton is imported, so an ops test file runs its Triton
cases in a child process: the file executed as a script, which calls ``run_cases``; the pytest
side calls ``run_in_interpreter`` on that file and requires every case to pass.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
ALL_PASSED = "ALL_CASES_PASSED"


def run_in_interpreter(script: str | Path, timeout_s: float = 500) -> None:
    """Run ``script`` in a child with the interpreter on; fail with its report unless every
    case passed."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(script).resolve())], env=env,
                          cwd=HERE.parent, capture_output=True, text=True, timeout=timeout_s)
    report = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert ALL_PASSED in proc.stdout, report


def run_cases(cases: Sequence[tuple[str, Callable[[], None]]]) -> int:
    """In the child: every case, each reported PASS or FAIL with its traceback; exit status."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test"
    import torch
    torch.set_num_threads(1)
    failed = 0
    for name, case in cases:
        try:
            case()
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every case, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    if not failed:
        print(ALL_PASSED)
    return 1 if failed else 0
