"""Run an untrusted Python program in a sandbox and collect its output.

`run_program(source, stdin, config)` -> `SandboxResult`. The isolation itself happens in
`_jail.py` (read its docstring for the exact steps); this module prepares the run, feeds stdin,
reads stdout/stderr under a byte cap and a wall-clock deadline, and kills the whole process group
when either is exceeded. Thread-safe: the code verifier calls it from a worker pool.

Isolation needs root on Linux (mount, network, pid namespaces + an unprivileged uid). Where it is
unavailable `SandboxUnavailable` is raised, naming the reason, unless the config sets
`allow_unisolated=True`, which runs with rlimits and a private temp dir only (see README).
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

_JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jail.py")
_MIB = 1 << 20


class SandboxUnavailable(RuntimeError):
    """Isolation was required but this machine/user cannot provide it."""


@dataclasses.dataclass
class SandboxConfig:
    """Limits for one program run. Every limit applies per run."""

    wall_time_s: float = 10.0
    """Wall-clock limit; on expiry the whole process group (and pid namespace) is SIGKILLed."""
    cpu_time_s: int = 10
    """RLIMIT_CPU per process (seconds)."""
    memory_mb: int = 1024
    """RLIMIT_AS per process (MiB of address space)."""
    max_processes: int = 32
    """RLIMIT_NPROC (processes + threads) for the run's private uid."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write (MiB)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    scratch_mb: int = 64
    """Size of the program's tmpfs scratch dir (isolated mode)."""
    output_limit_bytes: int = 1 << 20
    """Cap on stdout and on stderr each; more is a failure ('output limit exceeded')."""
    allow_unisolated: bool = False
    """Run without namespaces/uid drop when isolation is unavailable. Unsafe for untrusted code."""
    python: str | None = None
    """Interpreter for the program; default: the real binary of the running Python's base install."""
    uid_base: int = 2_000_000_000
    """Each run uses a random uid in [uid_base, uid_base + 2**20): RLIMIT_NPROC counts per uid,
    so concurrent runs (and other users' processes) do not share one process budget."""
    nice: int = 0
    """Niceness of the program. 0 by default: rewards are on the training step's critical path,
    and under CPU contention a positive value slows runs by an order of magnitude."""

    def __post_init__(self):
        for name in ("wall_time_s", "cpu_time_s", "memory_mb", "max_processes", "max_file_mb",
                     "max_open_files", "scratch_mb", "output_limit_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        if self.python is not None and not os.access(self.python, os.X_OK):
            raise ValueError(f"SandboxConfig.python: {self.python!r} is not an executable file")


@dataclasses.dataclass
class SandboxResult:
    status: str
    """'ok' (program ran to completion, any exit code), 'timeout', 'output_limit', 'error'."""
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    detail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "ok" and self.exit_code == 0


def _interpreter(config: SandboxConfig) -> tuple[str, list[str]]:
    """(interpreter path, directories the jail must bind read-only for it to run)."""
    python = os.path.realpath(config.python or getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.dirname(os.path.dirname(python))  # <prefix>/bin/python3.x
    return python, [prefix]


_probe_lock = threading.Lock()
_probe_result: dict[str, str | None] = {}


def isolation_error(config: SandboxConfig) -> str | None:
    """None when isolated runs work here, else why not. Probed once per interpreter (cached)."""
    key = config.python or ""
    with _probe_lock:
        if key not in _probe_result:
            _probe_result[key] = _probe(config)
        return _probe_result[key]


def _probe(config: SandboxConfig) -> str | None:
    if not sys.platform.startswith("linux"):
        return f"sandbox isolation needs Linux namespaces (platform is {sys.platform})"
    if os.geteuid() != 0:
        return ("sandbox isolation needs root (mount/net/pid namespaces and a uid switch); "
                f"running as uid {os.geteuid()}")
    check = ("import os, socket\n"
             "assert os.getuid() != 0, 'still root'\n"
             "assert os.getpid() != 1 and os.getppid() == 1, 'no pid namespace'\n"
             "s = socket.socket()\n"
             "try:\n    s.connect(('127.0.0.1', 9)); raise SystemExit('loopback reachable')\n"
             "except OSError: pass\n"
             "print('isolated')\n")
    probe_cfg = dataclasses.replace(config, wall_time_s=20.0, allow_unisolated=False)
    res = _run(check, b"", probe_cfg, isolation="namespaces")
    if res.succeeded and res.stdout.strip() == b"isolated":
        return None
    return (f"sandbox isolation probe failed (status={res.status}, exit={res.exit_code}): "
            f"{res.detail or res.stderr.decode(errors='replace')[-500:]}")


def run_program(source: str, stdin: bytes | str, config: SandboxConfig) -> SandboxResult:
    """Run `source` (Python) with `stdin`; never raises for anything the program does.

    Raises SandboxUnavailable when isolation is impossible and not explicitly waived.
    """
    err = isolation_error(config)
    if err is not None and not config.allow_unisolated:
        raise SandboxUnavailable(
            f"{err}. Refusing to run untrusted code without isolation; set the code reward's "
            "sandbox.allow_unisolated: true to accept the risk (rlimits + temp dir only)")
    if isinstance(stdin, str):
        stdin = stdin.encode()
    return _run(source, stdin, config, isolation="none" if err else "namespaces")


def _run(source: str, stdin: bytes, config: SandboxConfig, isolation: str) -> SandboxResult:
    python, prefixes = _interpreter(config)
    host = tempfile.mkdtemp(prefix="mopd-sbx-")  # mode 700, holds spec + program (+ cwd if unisolated)
    try:
        os.makedirs(os.path.join(host, "files"))
        os.makedirs(os.path.join(host, "root"))
        work = os.path.join(host, "work")
        os.makedirs(work)
        with open(os.path.join(host, "files", "main.py"), "w") as f:
            f.write(source)
        if isolation == "none":
            shutil.copy(os.path.join(host, "files", "main.py"), work)
            os.chmod(host, 0o711)  # the dropped uid must reach work/ (but not list host/)
        home = "/sandbox" if isolation == "namespaces" else work
        spec = {
            "isolation": isolation,
            "root_dir": os.path.join(host, "root"),
            "files_dir": os.path.join(host, "files"),
            "work_dir": work,
            "uid": config.uid_base + secrets.randbelow(1 << 20),
            "ro_binds": ["/usr", "/etc/ld.so.cache", *prefixes],
            "scratch_bytes": config.scratch_mb * _MIB,
            "scratch_inodes": 4096,
            "wall_s": config.wall_time_s,
            "nice": config.nice,
            "argv": [python, "-I", "-B", "main.py"],
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
                    "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
            "limits": {"cpu_s": int(config.cpu_time_s), "as_bytes": config.memory_mb * _MIB,
                       "nproc": config.max_processes, "fsize_bytes": config.max_file_mb * _MIB,
                       "nofile": config.max_open_files},
        }
        spec_path = os.path.join(host, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        return _supervise(spec_path, stdin, config)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _supervise(spec_path: str, stdin: bytes, config: SandboxConfig) -> SandboxResult:
    status_r, status_w = os.pipe()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _JAIL, spec_path, str(status_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(status_w,), start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    finally:
        os.close(status_w)
    outcome, detail = "ok", ""
    out, err = bytearray(), bytearray()
    try:
        outcome, detail = _pump(proc, stdin, out, err, t0 + config.wall_time_s,
                                config.output_limit_bytes)
    finally:
        _teardown(proc)
        status_bytes = _read_all(status_r)
    wall = time.monotonic() - t0
    status = json.loads(status_bytes) if status_bytes else {}
    if outcome == "ok" and status.get("stage") != "done":
        outcome = "error"
        detail = status.get("error") or f"jail exited {proc.returncode} without a status"
    return SandboxResult(status=outcome, exit_code=status.get("exit_code"),
                         signal=status.get("signal"), stdout=bytes(out), stderr=bytes(err),
                         wall_s=wall, detail=detail)


def _pump(proc, stdin: bytes, out: bytearray, err: bytearray, deadline: float, cap: int):
    """Feed stdin, drain stdout/stderr until both close; stop at the deadline or the byte cap."""
    sel = selectors.DefaultSelector()
    for stream, buf in ((proc.stdout, out), (proc.stderr, err)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ, buf)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    else:
        proc.stdin.close()
    try:
        # Until both outputs close; unwritten stdin is irrelevant once nobody can answer.
        while any(k.data is not None for k in sel.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", "wall-time limit exceeded"
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                if key.data is None:  # stdin writable
                    try:
                        n = os.write(key.fd, pending[:65536])
                        pending = pending[n:]
                    except (BrokenPipeError, BlockingIOError) as exc:
                        if isinstance(exc, BrokenPipeError):
                            pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if len(key.data) > cap:
                    del key.data[cap:]
                    return "output_limit", f"output limit exceeded ({cap} bytes)"
        # Outputs closed: the program and everything holding its pipes are gone or detached.
        remaining = max(0.0, deadline - time.monotonic())
        if not _exited(proc.pid, remaining):  # not reaped: _teardown still needs its pgid
            return "timeout", "wall-time limit exceeded"
        return "ok", ""
    finally:
        sel.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def _teardown(proc, grace_s: float = 5.0) -> None:
    """Ask the jail to kill its pid namespace and wait for it (the jail exits only when the
    namespace is empty), SIGKILL the process group as a fallback and for the unisolated mode,
    then reap. Afterwards no process of the run exists (isolated mode)."""
    if not _exited(proc.pid, 0.0):
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        _exited(proc.pid, grace_s)
    # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
    _kill_group(proc.pid)
    proc.wait()


def _exited(pid: int, timeout_s: float) -> bool:
    """Whether `pid` has exited, waiting up to timeout_s, WITHOUT reaping it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)
