"""Hostile programs must be contained by the code sandbox and scored as failures.

Each program prints "pwned" only if its attack worked, and the test case expects "pwned": a
reward of 1.0 would mean the attack succeeded. Where the attack leaves traces on the host
(files, connections, surviving processes) the test also checks the host directly. Runs in
whichever local isolation this user gets: root's jail ("namespaces") or, unprivileged,
bubblewrap ("userns"; tests/test_sandbox_unprivileged.py runs this module as uid 65534 when the
suite runs as root). Without isolation the module is skipped, and the fail-closed behaviour is
tested instead.
"""
import os
import socket
import threading
import time
import uuid

import pytest

from launch_helpers import proc_statuses
from mopd_megatron.rewards import sandbox as sb
from mopd_megatron.rewards.code_verifier import CodeVerifier
from mopd_megatron.rewards.sandbox import SandboxConfig, SandboxUnavailable, run_program

LIMITS = {"wall_time_s": 3.0, "cpu_time_s": 2, "memory_mb": 256, "max_processes": 16,
          "output_limit_bytes": 1 << 16}
ISOLATION = sb.probe_isolation(SandboxConfig())
ISOLATION_ERROR = ISOLATION.error
needs_isolation = pytest.mark.skipif(ISOLATION_ERROR is not None,
                                     reason=f"sandbox isolation unavailable: {ISOLATION_ERROR}")
# Rootless, the program shares its uid with the sandbox's pid 1 (the launcher, _jail.py), which
# it can therefore see in /proc: its command line, not its environment, memory or fds.
OWN_INIT = ISOLATION.mode == "userns"


def _sandbox_processes():
    """Host pids of processes left over from runs: in a nested pid namespace (NSpid lists more
    than one pid) and under a sandbox uid (root mode: the random range; rootless: ours)."""
    lo, hi = SandboxConfig().uid_base, SandboxConfig().uid_base + (1 << 20)
    me = os.getuid()
    found = []
    for pid, fields in proc_statuses():
        uid = int(fields["Uid"].split()[0])
        nested = len(fields.get("NSpid", "").split()) > 1
        if lo <= uid < hi or (nested and uid == me and me != 0):
            found.append(pid)
    return found


def _processes_with(marker):
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    hits.append(pid)
        except OSError:
            continue
    return hits


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(sandbox=LIMITS)


def _score(verifier, program, expect="pwned"):
    row = {"tests": [{"stdin": "", "stdout": expect}]}
    t0 = time.monotonic()
    result = verifier.score(f"```python\n{program}\n```", row)
    elapsed = time.monotonic() - t0
    assert elapsed < LIMITS["wall_time_s"] + 3.0, f"run took {elapsed:.1f}s: limit not enforced"
    assert _sandbox_processes() == [], "a sandboxed process outlived its run"
    return result


@needs_isolation
def test_network_socket_blocked_including_loopback(verifier):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    udp_listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_listener.bind(("127.0.0.1", port))
    udp_listener.setblocking(False)
    # Root's jail leaves the namespace's loopback down, so even sending to it fails; bubblewrap
    # brings it up, so a datagram to 127.0.0.1 is sent, into the sandbox's own loopback: the
    # host-side listener is what shows it went nowhere.
    own_loopback_up = ISOLATION.mode == "userns"
    program = f"""
import socket
hits = []
for addr in [("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)]:
    s = socket.socket(); s.settimeout(1)
    try:
        s.connect(addr); s.sendall(b"leak"); hits.append(addr)
    except OSError:
        pass
try:
    socket.getaddrinfo("pypi.org", 443); hits.append("dns")
except OSError:
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for addr in [("127.0.0.1", {port})] * (not {own_loopback_up}) + [("8.8.8.8", 53)]:
    try:
        u.sendto(b"leak", addr); hits.append(("udp", addr))
    except OSError:
        pass
if {own_loopback_up}:
    try:
        u.sendto(b"leak", ("127.0.0.1", {port}))
    except OSError:
        pass
print("pwned" if hits else "contained", hits)
"""
    try:
        result = _score(verifier, program)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected to the host's loopback
        with pytest.raises(BlockingIOError):
            udp_listener.recv(64)  # and no datagram arrived there
    finally:
        listener.close()
        udp_listener.close()
    assert result.reward == 0.0 and "contained" in result.reason


@needs_isolation
def test_write_outside_scratch(verifier, tmp_path):
    marker = f"mopd-escape-{uuid.uuid4().hex}"
    targets = [str(tmp_path / marker), f"/work/{marker}", f"/root/{marker}", f"/etc/{marker}",
               f"/usr/{marker}", f"/{marker}", f"/dev/{marker}", f"/proc/{marker}"]
    program = f"""
import os
hits = []
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x"); hits.append(path)
    except OSError:
        pass
# /tmp inside the sandbox is the scratch dir: writable there, invisible on the host.
open("/tmp/{marker}", "w").write("scratch")
print("pwned" if hits else "contained", hits)
"""
    result = _score(verifier, program)
    assert result.reward == 0.0 and "contained" in result.reason
    for path in targets + [f"/tmp/{marker}"]:
        assert not os.path.exists(path), f"sandbox wrote {path} on the host"


@needs_isolation
def test_read_forbidden_files_and_other_processes(verifier, monkeypatch):
    secret = f"mopd-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("MOPD_TEST_SECRET", secret)  # the trainer's environment must not leak
    targets = ["/etc/shadow", "/etc/passwd", os.path.abspath(__file__), "/root/.bashrc",
               "/proc/1/environ", "/proc/1/cmdline", f"/proc/{os.getpid()}/environ"]
    program = f"""
import os
def own_init(pid):  # rootless: pid 1 is the sandbox's own launcher, not a host process
    return {OWN_INIT} and pid == "1" and b"/.mopd/jail.py" in open("/proc/1/cmdline", "rb").read()
hits = []
for path in {targets!r}:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        continue
    if b"{secret}" in data or (data and not (path == "/proc/1/cmdline" and own_init("1"))):
        hits.append(path)
if "{secret}" in repr(dict(os.environ)): hits.append("env")
others = [p for p in os.listdir("/proc")
          if p.isdigit() and int(p) != os.getpid() and not own_init(p)]
if others: hits.append(("pids", others))
if os.path.exists("/work") or os.path.exists("/home"): hits.append("host dirs visible")
print("pwned" if hits else "contained", hits)
"""
    result = _score(verifier, program)
    assert result.reward == 0.0 and "contained" in result.reason


@needs_isolation
def test_fork_bomb(verifier):
    program = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    result = _score(verifier, program)
    assert result.reward == 0.0
    assert "wall-time" in result.reason or "runtime error" in result.reason


@needs_isolation
def test_infinite_loop():
    # CPU limit far above the wall limit, so that it is the wall clock that stops it.
    verifier = CodeVerifier(sandbox={**LIMITS, "cpu_time_s": 60})
    result = _score(verifier, "while True:\n    pass")
    assert result.reward == 0.0 and "wall-time" in result.reason


@needs_isolation
def test_infinite_loop_cpu_limit_alone():
    # Wall time well above the CPU limit: RLIMIT_CPU (SIGXCPU/SIGKILL) must stop it first.
    res = run_program("while True:\n    pass", b"", SandboxConfig(**{**LIMITS, "wall_time_s": 20}))
    assert res.status == "ok" and res.signal in (9, 24), res  # SIGKILL or SIGXCPU
    assert res.wall_s < 10


@needs_isolation
def test_memory_bomb(verifier):
    program = "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))"
    result = _score(verifier, program)
    assert result.reward == 0.0 and "MemoryError" in result.reason


@needs_isolation
def test_huge_output(verifier):
    result = _score(verifier, "while True:\n    print('pwned' * 1000)")
    assert result.reward == 0.0 and "output limit" in result.reason


@needs_isolation
def test_kill_the_parent(verifier):
    host_pid = os.getpid()
    program = f"""
import os, signal
hits = []
for pid in (os.getppid(), 1, {host_pid}, -1):
    try:
        os.kill(pid, signal.SIGKILL); hits.append(pid)
    except OSError:
        pass
print("pwned" if hits else "contained", hits)
"""
    # kill(-1) succeeds in killing the program itself (its own uid only); either way it fails.
    # Rootless, kill(1) "succeeds" (same uid) but the kernel drops signals from inside a pid
    # namespace to its init unless init handles them, and SIGKILL it never does.
    result = _score(verifier, program)
    assert result.reward == 0.0
    os.kill(host_pid, 0)  # still here


@needs_isolation
def test_background_process_is_gone_afterwards(verifier):
    marker = f"mopd-daemon-{uuid.uuid4().hex}"
    program = f"""
import os, signal, sys
if os.fork() == 0:
    os.setsid()  # leave the process group and session
    if os.fork() == 0:
        for sig in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        fd = os.open("/dev/null", os.O_RDWR)
        for k in (0, 1, 2):
            os.dup2(fd, k)  # do not hold the output pipes: the run must end without them
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", "{marker}"])
    os._exit(0)
import time
time.sleep(0.3)
print("started")
"""
    # The program itself passes its test: containment must not depend on it failing.
    result = _score(verifier, program, expect="started")
    assert result.reward == 1.0, result.reason
    deadline = time.monotonic() + 2.0
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == [], "daemonized child survived the sandbox run"


@needs_isolation
def test_process_budget_is_per_run():
    """max_processes bounds the run alone: the trainer's own threads (same host uid when
    rootless) must not use it up. 40 threads here, 16 processes allowed, 8 forked there."""
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(40)]
    for t in threads:
        t.start()
    program = """
import os
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
print("forked", len(kids))
"""
    try:
        res = run_program(program, b"", SandboxConfig(**LIMITS))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert res.succeeded and res.stdout == b"forked 8\n", res


def test_expected_isolation_mode():
    """A run that must exercise one mode (MOPD_SANDBOX_EXPECT_MODE, set by
    test_sandbox_unprivileged.py) fails here instead of skipping every test above."""
    expected = os.environ.get("MOPD_SANDBOX_EXPECT_MODE")
    if expected is None:
        pytest.skip("no mode expected (MOPD_SANDBOX_EXPECT_MODE unset)")
    assert ISOLATION.mode == expected, ISOLATION


@needs_isolation
def test_isolated_run_identity():
    """What the program sees: unprivileged uid, pid namespace, scratch cwd/HOME, lo down."""
    program = """
import os, socket
print(os.getuid() != 0, os.getppid() == 1, os.getcwd(), os.environ["HOME"])
print(sorted(os.listdir(".")))
print(open("/proc/net/dev").read().count(":"))
"""
    res = run_program(program, b"", SandboxConfig(**LIMITS))
    assert res.succeeded, res
    lines = res.stdout.decode().splitlines()
    assert lines[0] == "True True /sandbox /sandbox"
    assert lines[1] == "['main.py']"  # a fresh, empty scratch dir apart from the program
    assert lines[2] == "1"  # one interface (lo) in the new network namespace


def test_fail_closed_without_isolation(monkeypatch):
    """Where isolation is unavailable, building or running refuses unless explicitly waived."""
    monkeypatch.setattr(sb, "_probe_result", {})  # fresh cache, restored afterwards
    monkeypatch.setattr(sb, "_probe",
                        lambda config: sb.Isolation("none", error="pretend: no namespaces here"))
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        CodeVerifier(sandbox=LIMITS)
    with pytest.raises(SandboxUnavailable, match="pretend: no namespaces here"):
        run_program("print(1)", b"", SandboxConfig(**LIMITS))
    # Waived: rlimits, a private temp cwd and (as root) an unprivileged uid, which must be
    # able to execute the interpreter: pyenv's under /root (mode 700) is not, /usr/bin's is.
    limits = {**LIMITS, "allow_unisolated": True}
    if os.geteuid() == 0:
        if not os.path.exists("/usr/bin/python3"):
            pytest.skip("as root the unisolated run needs an interpreter outside /root")
        limits["python"] = "/usr/bin/python3"
    waived = CodeVerifier(sandbox=limits)
    assert waived.isolated is False
    row = {"tests": [{"stdin": "3\n", "stdout": "6"}]}
    assert waived.score("```python\nprint(2 * int(input()))\n```", row).reward == 1.0
    res = run_program("import os; print(os.getcwd(), os.getuid())", b"", SandboxConfig(**limits))
    cwd, uid = res.stdout.decode().split()
    assert res.succeeded and os.path.basename(cwd) == "work"
    assert int(uid) != 0  # never untrusted code as root, isolated or not
