"""Finding the processes of one launcher run, to prove none outlives it.

A test sets MOPD_LAUNCHER_TEST_RUN=<marker> in the environment of what it launches; every
child (trainer ranks, SGLang servers and their scheduler/detokenizer processes) inherits it,
so /proc finds them all, whatever process group or session they moved to.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARK = "MOPD_LAUNCHER_TEST_RUN"


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of live processes whose environment holds MARK=marker."""
    want = f"{MARK}={marker}".encode()
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if want in (p / "environ").read_bytes().split(b"\0"):
                found[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
        except OSError:
            continue
    return found


def left_behind(marker: str, grace_s: float = 15.0) -> dict[int, str]:
    """Processes of this run still alive after grace_s; killed (by pid) before returning."""
    deadline = time.monotonic() + grace_s
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def kill_tree(pid: int) -> list[int]:
    """SIGKILL pid and every descendant (an SGLang server and its scheduler/detokenizer), but
    not its parent: what a crash of that one server looks like. The pids killed."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            try:
                tree += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def kill_when_logged(path: Path, find, timeout_s: float = 600.0) -> list[int]:
    """Once the file at path is non-empty (a run logged its first step), kill_tree every pid
    that find() returns; the pids killed. For a thread beside a running launch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (path.exists() and path.read_text()):
        time.sleep(0.2)
    return [k for pid in find() for k in kill_tree(pid)]


def proc_statuses():
    """(pid, fields of /proc/<pid>/status) for every process still readable: the sandbox tests
    find leftovers by uid and pid namespace depth (NSpid)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                yield pid, dict(ln.split(":", 1) for ln in f if ":" in ln)
        except OSError:
            continue
