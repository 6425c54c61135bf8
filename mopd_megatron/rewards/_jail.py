"""Sandbox launcher: runs ONE untrusted program; executed as a script, never imported by the package.

Started by `sandbox.run_program` as `python -I -S _jail.py SPEC_JSON STATUS_FD` in a new session
(its own process group). Standard library only, so it starts in milliseconds.

Isolated mode ("namespaces", needs root):
  jail (outside)  unshare(mount, net, pid, ipc, uts) -> fork
    init (pid 1 of the new pid namespace, still root)
      1. private mount propagation, so nothing below leaks to the host
      2. a fresh 1 MiB tmpfs as the new root; read-only, nosuid, nodev binds of /usr, the
         interpreter prefix and ld.so.cache; /bin, /lib... recreated as the same symlinks
      3. /dev with null, zero, full, random, urandom only; a new /proc for the new pid namespace
         (hidepid, so the program cannot even list init); /sandbox: a size-capped tmpfs owned by
         the sandbox uid, the program's only writable place (cwd, HOME and TMPDIR)
      4. the root tmpfs remounted read-only, chroot into it
      5. fork the program: drop to an unprivileged uid/gid with no supplementary groups,
         PR_SET_NO_NEW_PRIVS (setuid binaries cannot give root back), rlimits, exec
      6. reap every child until the program exits, report, exit. Init exiting makes the kernel
         SIGKILL everything left in the pid namespace: daemons the program left behind die here.
  The new network namespace has only a loopback device, and it is down: no sockets reach anything,
  127.0.0.1 included.

Rootless mode ("userns", `_bwrap.py`): bubblewrap has already built the sandbox (user, pid, net,
mount, ipc, uts namespaces; uid mapped to nobody; read-only root; no capabilities) and runs this
script as pid 1 of the new pid namespace, with the spec and the run's files bound read-only under
/.mopd. It copies the files into the scratch dir, then does steps 5 (without the uid switch:
the namespace has one uid) and 6 above.

Unisolated mode ("none", only when the recipe allows it): rlimits, a private temp cwd, and (when
started as root) the same unprivileged uid + no_new_privs; no namespaces, so the program sees the
host's file system and network. After it exits the whole process group is killed (a program that
calls setsid() escapes that).

The status (JSON) goes to STATUS_FD, which the program never inherits.
"""
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
ROOT_SYMLINK_CANDIDATES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src} -> {dst} ({fstype})")


def _bind_ro(src, dst):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    # A bind mount ignores MS_RDONLY on creation; the remount is what makes it read-only.
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _report(fd, **status):
    try:
        os.write(fd, json.dumps(status).encode())
    except OSError:
        pass


def _build_root(spec):
    root, uid = spec["root_dir"], spec["uid"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # 1. no propagation back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")  # 2.
    for path in ROOT_SYMLINK_CANDIDATES:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
    for path in spec["ro_binds"]:
        if os.path.exists(path):
            _bind_ro(path, root + path)
    os.makedirs(root + "/dev")  # 3.
    for dev in DEVICES:
        _bind_ro_dev("/dev/" + dev, root + "/dev/" + dev)
    os.makedirs(root + "/proc")
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    except OSError:  # older kernels without hidepid on a fresh mount: still a private pid ns
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    scratch = root + "/sandbox"
    os.makedirs(scratch)
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['scratch_bytes']},nr_inodes={spec['scratch_inodes']},mode=700,"
           f"uid={uid},gid={uid}")
    _copy_files(spec["files_dir"], scratch, uid)
    os.symlink("sandbox", root + "/tmp")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)  # 4.
    os.chroot(root)
    os.chdir("/sandbox")
    _libc.sethostname(b"sandbox", 7)  # own UTS namespace; cosmetic, failure is harmless


def _bind_ro_dev(src, dst):
    open(dst, "a").close()
    _mount(src, dst, None, MS_BIND)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _copy_files(src_dir, dst_dir, uid):
    for name in os.listdir(src_dir):
        with open(os.path.join(src_dir, name), "rb") as f:
            data = f.read()
        dst = os.path.join(dst_dir, name)
        with open(dst, "wb") as f:
            f.write(data)
        if uid is not None:
            os.chown(dst, uid, uid)


def _set_limits(spec):
    lim = spec["limits"]
    pairs = [
        (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, (lim["as_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),  # counted per uid: unique uid per run
        (resource.RLIMIT_FSIZE, (lim["fsize_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    for which, value in pairs:
        resource.setrlimit(which, value)


def _exec_program(spec, drop_privileges):
    """In the forked child: close inherited fds, drop privileges, limit, exec. Never returns."""
    try:
        os.closerange(3, 65536)  # STATUS_FD and anything else inherited stays with the jail
        os.nice(spec["nice"])
        if drop_privileges:
            uid = spec["uid"]
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _set_limits(spec)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as exc:  # noqa: BLE001 - report anything, then die
        os.write(2, f"sandbox: cannot start program: {exc}\n".encode())
    os._exit(127)


def _run_and_reap(spec, status_fd, drop_privileges):
    child = os.fork()
    if child == 0:
        _exec_program(spec, drop_privileges)
    while True:  # 6. as pid 1 we inherit orphans; reap them all, stop when the program is done
        try:
            pid, st = os.wait()
        except ChildProcessError:
            _report(status_fd, stage="run", error="program vanished")
            return
        if pid == child:
            break
    _report(status_fd, stage="done",
            exit_code=os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else None,
            signal=os.WTERMSIG(st) if os.WIFSIGNALED(st) else None)


def _init_main(spec, status_fd):
    """pid 1 of the new pid namespace."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Self-destruct if the host side disappears without killing us; init only receives signals
    # it handles, hence the handler rather than the default action.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(int(spec["wall_s"]) + 5)
    try:
        _build_root(spec)
    except Exception as exc:  # noqa: BLE001
        _report(status_fd, stage="setup", error=f"{type(exc).__name__}: {exc}")
        os._exit(3)
    _run_and_reap(spec, status_fd, drop_privileges=True)
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def _userns_init_main(spec, status_fd):
    """pid 1 of the sandbox bubblewrap built. The program runs under our uid (the namespace maps
    only one), so what root mode gets from the uid switch is done here instead."""
    # Non-dumpable: the program may not ptrace us or open /proc/1/fd/STATUS_FD, /proc/1/environ
    # or /proc/1/mem, so it cannot forge the status that says how it ended.
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")
    # Signals from inside the namespace reach pid 1 only through handlers it installed; Python's
    # SIGINT handler would be one, so drop it. SIGALRM stays: the program can only end itself.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(int(spec["wall_s"]) + 5)
    try:
        _copy_files(spec["files_dir"], spec["work_dir"], None)
        os.chdir(spec["work_dir"])
    except OSError as exc:
        _report(status_fd, stage="setup", error=f"{type(exc).__name__}: {exc}")
        os._exit(3)
    _run_and_reap(spec, status_fd, drop_privileges=False)
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def main():
    spec_path, status_fd = sys.argv[1], int(sys.argv[2])
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["isolation"] == "userns":
        _userns_init_main(spec, status_fd)
    if spec["isolation"] == "none":
        work = spec["work_dir"]
        os.chdir(work)
        # Still never run untrusted code as root: root ignores RLIMIT_NPROC and may kill(-1).
        drop = os.geteuid() == 0
        if drop:
            for path in [work] + [os.path.join(work, n) for n in os.listdir(work)]:
                os.chown(path, spec["uid"], spec["uid"])
        _run_and_reap(spec, status_fd, drop_privileges=drop)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # takes stragglers (and us) down together
        os._exit(0)  # not reached; never fall through to the namespace path
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    try:
        _check(_libc.unshare(flags), "unshare(mount|net|pid|ipc|uts)")
    except OSError as exc:
        _report(status_fd, stage="setup", error=str(exc))
        sys.exit(3)
    init = os.fork()
    if init == 0:
        _init_main(spec, status_fd)
    # The host side asks for teardown with SIGUSR1 (timeout, output cap). Killing init makes the
    # kernel kill the whole namespace, and waitpid(init) returns only once the namespace is
    # empty: when this process exits, nothing the program started is still running.
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(init, signal.SIGKILL))
    _, st = os.waitpid(init, 0)
    sys.exit(os.waitstatus_to_exitcode(st) & 0xFF)


if __name__ == "__main__":
    main()
