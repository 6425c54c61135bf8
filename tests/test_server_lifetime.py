"""Launched servers never outlive the process that launched them, however it ends.

A "trainer" here is a child Python process that starts a long-running command through
rollout/server.py::ManagedProcess (the class every SGLang server and router is started with),
in its own session as servers are. Then the trainer ends: by an exception, by SIGTERM without a
handler (Python runs no atexit then), by SIGKILL (nothing of it runs). The command, found by a
marker in its environment, must be gone within a few seconds each time. SIGUSR1, Slurm's cue for
the trainer to save and stop, must not reach the command.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from launch_helpers import left_behind, marked_processes
from train_helpers import ROOT

TRAINER = textwrap.dedent("""
    import os, sys, time
    from mopd_megatron.rollout.server import ManagedProcess
    p = ManagedProcess("stand-in server", ["sleep", "600"], dict(os.environ), None)
    p.start()
    print(p.pid, flush=True)
    if sys.argv[1] == "exception":
        time.sleep(0.5)
        raise RuntimeError("the trainer failed")
    time.sleep(600)
""")


def _start(how: str, marker: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MOPD_LAUNCHER_TEST_RUN=marker)
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, how], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = int(trainer.stdout.readline())
    deadline = time.monotonic() + 10
    # Until the launcher's shell has set its traps and exec'd the command, the pid is the shell
    # (whose command line already names "sleep 600"): wait for the exec itself.
    while not _cmdline(server).startswith("sleep\x00600"):
        assert time.monotonic() < deadline, "the stand-in server never started"
        time.sleep(0.05)
    assert any("sleep 600" in c for c in marked_processes(marker).values())
    return trainer, server


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


@pytest.mark.parametrize("how", ["exception", "SIGTERM", "SIGKILL"])
def test_the_server_dies_with_its_trainer(how):
    marker = uuid.uuid4().hex
    trainer, server = _start(how, marker)
    try:
        if how != "exception":
            trainer.send_signal(getattr(signal, how))
        trainer.wait(timeout=30)
        # SIGKILL and SIGTERM: the watcher polls every second
        left = left_behind(marker, grace_s=5)
    finally:
        trainer.kill()
    assert left == {}, f"outlived the trainer ({how}): {left}"
    assert not _running(server)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigusr1_to_the_group_does_not_stop_the_server():
    marker = uuid.uuid4().hex
    trainer, server = _start("SIGKILL", marker)
    try:
        os.killpg(server, signal.SIGUSR1)  # what Slurm's --signal does to the whole step
        time.sleep(1.0)
        assert _running(server)
    finally:
        trainer.kill()
        trainer.wait()
        left_behind(marker, grace_s=5)
