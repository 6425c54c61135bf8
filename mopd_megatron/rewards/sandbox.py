"""Run an untrusted Python program in a sandbox and collect its output.

`run_program(source, stdin, config)` -> `SandboxResult`. Where programs run is decided once per
config by a probe (`probe_isolation`, cached), in this order:
  - "remote": `url` is set; a SandboxFusion server runs them (`remote.py`)
  - "namespaces": root; `_jail.py` builds the sandbox (its docstring has the exact steps)
  - "userns": not root; bubblewrap builds it in unprivileged user namespaces (`_bwrap.py`)
Where none works `SandboxUnavailable` is raised, naming every reason, unless the config sets
`allow_unisolated=True`: mode "none", rlimits and a private temp dir only (docs/rewards.md).

For the local modes this module prepares the run, feeds stdin, reads stdout/stderr under a byte
cap and a wall-clock deadline, and kills the whole sandbox when either is exceeded. Thread-safe:
the code verifier calls it from a worker pool.
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

from mopd_megatron.rewards import _bwrap
from mopd_megatron.rewards.sandbox_types import SandboxConfig, SandboxResult, SandboxUnavailable

_JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jail.py")
_MIB = 1 << 20


def _interpreter(config: SandboxConfig) -> tuple[str, list[str]]:
    """(interpreter path, directories the jail must bind read-only for it to run)."""
    python = os.path.realpath(config.python or getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.dirname(os.path.dirname(python))  # <prefix>/bin/python3.x
    return python, [prefix]


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How a config's programs run: `mode` "remote", "namespaces" or "userns", or "none" with
    `error` saying why no isolation is available; `detail`: what the mode is, for humans."""

    mode: str
    detail: str = ""
    error: str | None = None
    bwrap: str | None = None  # the binary of mode "userns"


_probe_lock = threading.Lock()
_probe_locks: dict[tuple, threading.Lock] = {}
_probe_result: dict[tuple, Isolation] = {}


def probe_isolation(config: SandboxConfig) -> Isolation:
    """Which isolation this config's runs get here. Probed once per (url, python, bwrap)."""
    key = (config.url, config.python, config.bwrap)
    with _probe_lock:
        lock = _probe_locks.setdefault(key, threading.Lock())
    with lock:  # one lock per key: a slow remote probe must not hold up the local ones
        if key not in _probe_result:
            _probe_result[key] = _probe(config)
        return _probe_result[key]


_CHECK = ("import os, socket\n"
          "assert os.getuid() != 0, 'still root'\n"
          "assert os.getpid() != 1 and os.getppid() == 1, 'no pid namespace'\n"
          "assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 2, 'host pids visible'\n"
          "s = socket.socket()\n"
          "try:\n    s.connect(('127.0.0.1', 9)); raise SystemExit('loopback reachable')\n"
          "except OSError: pass\n"
          "print('isolated')\n")


def _probe(config: SandboxConfig) -> Isolation:
    if config.url is not None:
        return _probe_remote(config)
    if not sys.platform.startswith("linux"):
        return Isolation("none", error=f"sandbox isolation needs Linux namespaces (platform is "
                                       f"{sys.platform}); or set sandbox.url")
    if os.geteuid() == 0:
        # Root keeps its own jail. bwrap run as root would map the program to host uid 0, for
        # which the kernel does not enforce RLIMIT_NPROC: no fork-bomb bound.
        iso = Isolation("namespaces", "root: mount, net, pid, ipc and uts namespaces and a "
                                      "private uid (rewards/_jail.py)")
        err = _check_local(config, iso)
        return iso if err is None else Isolation("none", error=(
            f"sandbox isolation as root failed: {err}; a container needs CAP_SYS_ADMIN, or set "
            "sandbox.url"))
    bwrap, err = _bwrap.find_bwrap(config.bwrap)
    err = err or _bwrap.kernel_problem()
    if not err:
        iso = Isolation("userns", f"rootless: {_bwrap.bwrap_version(bwrap)} ({bwrap}), user, "
                                  "pid, net and mount namespaces, uid mapped to nobody",
                        bwrap=bwrap)
        err = _check_local(config, iso)
        if err is None:
            return iso
    return Isolation("none", error=(
        f"no sandbox isolation for uid {os.geteuid()}: not root (the namespaces jail needs it), "
        f"and the rootless sandbox cannot run: {err}. Set sandbox.url to a SandboxFusion server"))


def _check_local(config: SandboxConfig, iso: Isolation) -> str | None:
    """None if a probe program run in mode `iso` comes out isolated, else what went wrong."""
    probe_cfg = dataclasses.replace(config, wall_time_s=20.0, allow_unisolated=False)
    try:
        res = _run(_CHECK, b"", probe_cfg, iso)
    except OSError as exc:  # the launcher could not even start
        return f"{type(exc).__name__}: {exc}"
    if res.succeeded and res.stdout.strip() == b"isolated":
        return None
    tail = res.stderr.decode(errors="replace").strip()[-500:]
    return (f"probe run failed (status={res.status}, exit={res.exit_code}): "
            + "; ".join(x for x in (res.detail, tail) if x))


def _probe_remote(config: SandboxConfig) -> Isolation:
    from mopd_megatron.rewards.remote import run_remote
    try:
        res = run_remote("print('ok')", b"", dataclasses.replace(config, wall_time_s=20.0))
    except SandboxUnavailable as exc:
        return Isolation("none", error=str(exc))
    if res.succeeded and res.stdout.strip() == b"ok":
        return Isolation("remote", f"SandboxFusion server at {config.url}")
    why = res.detail or res.stderr.decode(errors="replace")[-300:]
    return Isolation("none", error=(f"sandbox.url={config.url!r}: the server did not run a probe "
                                    f"program (status={res.status}, exit={res.exit_code}): {why}"))


def refusal(iso: Isolation, config: SandboxConfig) -> SandboxUnavailable:
    """The error for a run that `iso` cannot isolate (the waiver exists for local runs only)."""
    if config.url is not None:
        return SandboxUnavailable(iso.error)
    return SandboxUnavailable(
        f"{iso.error}. Refusing to run untrusted code without isolation; set the code reward's "
        "sandbox.allow_unisolated: true to accept the risk (rlimits + temp dir only)")


def run_program(source: str, stdin: bytes | str, config: SandboxConfig) -> SandboxResult:
    """Run `source` (Python) with `stdin`; never raises for anything the program does.

    Raises SandboxUnavailable when isolation is impossible and not explicitly waived, or when
    the remote sandbox cannot be reached.
    """
    iso = probe_isolation(config)
    if iso.error is not None and not config.allow_unisolated:
        raise refusal(iso, config)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    if iso.mode == "remote":
        from mopd_megatron.rewards.remote import run_remote
        return run_remote(source, stdin, config)
    return _run(source, stdin, config, iso)


def _run(source: str, stdin: bytes, config: SandboxConfig, iso: Isolation) -> SandboxResult:
    python, prefixes = _interpreter(config)
    isolation = iso.mode  # "namespaces", "userns" or "none"
    host = tempfile.mkdtemp(prefix="mopd-sbx-")  # mode 700, holds spec + program (+ cwd if unisolated)
    try:
        files = os.path.join(host, "files")
        os.makedirs(files)
        os.makedirs(os.path.join(host, "root"))
        work = os.path.join(host, "work")
        os.makedirs(work)
        with open(os.path.join(files, "main.py"), "w") as f:
            f.write(source)
        if isolation == "none":
            shutil.copy(os.path.join(files, "main.py"), work)
            os.chmod(host, 0o711)  # the dropped uid must reach work/ (but not list host/)
        home = work if isolation == "none" else "/sandbox"
        spec = {
            "isolation": isolation,
            "root_dir": os.path.join(host, "root"),
            "files_dir": files,
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
        if isolation == "userns":  # the launcher reads the spec inside the sandbox
            spec.update(files_dir=_bwrap.INSIDE + "/files", work_dir="/sandbox",
                        uid=_bwrap.SANDBOX_UID, root_dir=None)
            # The launcher (pid 1) counts against the run's process budget too: one more keeps
            # the program's own budget at max_processes, as in root mode.
            spec["limits"]["nproc"] += 1
        spec_path = os.path.join(host, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        if isolation == "userns":
            def argv(status_fd, info_fd):
                return _bwrap.bwrap_argv(
                    iso.bwrap, host_files=files, jail=_JAIL, spec=spec_path, python=python,
                    prefixes=prefixes, scratch_bytes=config.scratch_mb * _MIB,
                    status_fd=status_fd, info_fd=info_fd)
        else:
            def argv(status_fd, _info_fd):
                return [sys.executable, "-I", "-S", _JAIL, spec_path, str(status_fd)]
        return _supervise(argv, stdin, config, bwrap=isolation == "userns")
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _supervise(argv, stdin: bytes, config: SandboxConfig, bwrap: bool) -> SandboxResult:
    """Start `argv(status_fd, info_fd)` in a new session, pump its I/O, tear it down, report.
    The launcher writes the program's fate to STATUS_FD; bwrap writes its pid 1 to INFO_FD."""
    status_r, status_w = os.pipe()
    info_r, info_w = os.pipe() if bwrap else (None, None)
    child_fds = tuple(fd for fd in (status_w, info_w) if fd is not None)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv(status_w, info_w),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=child_fds, start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    except BaseException:
        for fd in (status_r, info_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    if bwrap:
        stop = lambda: _kill_sandbox_init(proc, info_r)  # noqa: E731
    else:
        stop = lambda: _signal(proc.pid, signal.SIGUSR1)  # noqa: E731 - the jail kills its init
    outcome, detail = "ok", ""
    out, err = bytearray(), bytearray()
    try:
        outcome, detail = _pump(proc, stdin, out, err, t0 + config.wall_time_s,
                                config.output_limit_bytes)
    finally:
        _teardown(proc, stop)
        status_bytes = _read_all(status_r)
        if info_r is not None:
            os.close(info_r)
    wall = time.monotonic() - t0
    status = json.loads(status_bytes) if status_bytes else {}
    if outcome == "ok" and status.get("stage") != "done":
        outcome = "error"
        detail = (status.get("error")
                  or f"sandbox launcher exited {proc.returncode} without a status")
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


def _teardown(proc, stop, grace_s: float = 5.0) -> None:
    """`stop()` the sandbox (the launcher kills its pid namespace) and wait for the launcher,
    which exits only when the namespace is empty; SIGKILL the process group as a fallback and
    for the unisolated mode, then reap. Afterwards no process of the run exists (isolated modes)."""
    if not _exited(proc.pid, 0.0):
        stop()
        _exited(proc.pid, grace_s)
    # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
    _kill_group(proc.pid)
    proc.wait()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_sandbox_init(proc, info_fd: int) -> None:
    """SIGKILL the sandbox's pid 1, whose host pid bwrap wrote to the info pipe. The kernel then
    kills the rest of the namespace, and bwrap exits once the namespace is empty."""
    os.set_blocking(info_fd, False)
    try:
        pid = int(json.loads(os.read(info_fd, 65536))["child-pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # bwrap never started it (or said nothing): the group kill is the fallback
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        # The pidfd pins one process; it is the sandbox's init only if bwrap is its parent.
        if _parent_pid(pid) == proc.pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # comm may contain spaces
    except (OSError, ValueError, IndexError):
        return None


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
