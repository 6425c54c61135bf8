"""The hostile-program tests again, as an unprivileged user: what a Slurm or container job is.

CI runs as root, where the sandbox takes root's path (rewards/_jail.py). This test runs
tests/test_sandbox_hostile.py in a child pytest as uid/gid 65534 (nobody, no supplementary
groups, no capabilities) via setpriv, so that every hostile program meets the rootless path
(bubblewrap in user namespaces), with MOPD_SANDBOX_EXPECT_MODE=userns so that a module that
skipped would fail. Afterwards nothing of the child run may be left: no process in a sandbox's
pid namespace, no sandbox temp dir.

Where the interpreter lies under a directory nobody cannot enter (pyenv under /root, mode 700),
the child runs in a private mount namespace in which that directory is an empty, enterable
tmpfs with only the needed subtree bound back: the host's permissions are not touched.
Skipped when the suite already runs unprivileged (the hostile module then runs as this user
directly), and when setpriv or unprivileged user namespaces are not available.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from launch_helpers import proc_statuses
from mopd_megatron.rewards import _bwrap

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return ("the suite runs as uid %d: tests/test_sandbox_hostile.py already runs "
                "unprivileged" % os.geteuid())
    for tool in ("setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    problem = _bwrap.kernel_problem()
    if problem:
        return problem
    probe = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "unshare",
         "--user", "--map-root-user", "--pid", "--fork", "--net", "--mount", "true"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"unprivileged user namespaces unavailable: {probe.stderr.strip()}"
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _closed_dirs(paths) -> dict[Path, set[Path]]:
    """{directory others cannot enter: its children on the way to `paths`}."""
    closed: dict[Path, set[Path]] = {}
    for path in paths:
        parts = Path(path).parts
        for i in range(1, len(parts) - 1):
            d = Path(*parts[:i + 1])
            if not os.stat(d).st_mode & 0o001:
                closed.setdefault(d, set()).add(Path(*parts[:i + 2]))
    return closed


def _open_up(closed: dict[Path, set[Path]], keep: str) -> list[str]:
    """Shell lines for a private mount namespace: each closed directory becomes an enterable
    tmpfs holding only the needed children, bound back from where they were. Outermost first,
    so that a closed directory inside another is reached through the first one's rebinding."""
    lines = []
    for n, d in enumerate(sorted(closed, key=lambda p: len(p.parts))):
        kids = sorted(closed[d])
        # a file is bound onto a file, a directory onto a directory
        make = {kid: "touch" if os.path.isfile(kid) else "mkdir -p" for kid in kids}
        for k, kid in enumerate(kids):
            lines += [f"{make[kid]} {keep}/{n}.{k}",
                      f"mount --rbind {shlex.quote(str(kid))} {keep}/{n}.{k}"]
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(d))}")
        for k, kid in enumerate(kids):
            lines += [f"{make[kid]} {shlex.quote(str(kid))}",
                      f"mount --move {keep}/{n}.{k} {shlex.quote(str(kid))}"]
    return lines


def _leftovers(tmp: str) -> list[str]:
    found = [f"temp dir {name}" for name in os.listdir(tmp) if name.startswith("mopd-sbx-")]
    for pid, fields in proc_statuses():
        if int(fields["Uid"].split()[0]) == NOBODY and len(fields.get("NSpid", "").split()) > 1:
            found.append(f"process {pid} ({fields['Name'].strip()})")
    return found


@pytest.mark.slow
def test_hostile_programs_contained_as_unprivileged_user():
    home = tempfile.mkdtemp(prefix="mopd-nobody-")  # /tmp: nobody cannot enter pytest's tmp_path
    keep = tempfile.mkdtemp(prefix="mopd-keep-")  # root's: where subtrees wait while rebinding
    try:
        os.chown(home, NOBODY, NOBODY)
        # The checkout's own entries, not the checkout: a checkout in a directory others cannot
        # enter (mktemp -d makes it 0700) is itself rebound, entry by entry.
        needed = [os.path.realpath(sys.executable), sys.base_prefix, sys.prefix,
                  *(str(ROOT / name) for name in os.listdir(ROOT))]
        report = os.path.join(home, "junit.xml")
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "MOPD_SANDBOX_EXPECT_MODE": "userns"}
        child = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=-all", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                 sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                 "tests/test_sandbox_hostile.py", f"--junitxml={report}",
                 f"--basetemp={home}/pytest"]
        script = "\n".join(["set -e", *_open_up(_closed_dirs(needed), keep),
                            f"cd {shlex.quote(str(ROOT))}", "exec " + shlex.join(child)])
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=600)
        output = (run.stdout + run.stderr)[-6000:]
        assert run.returncode == 0, f"hostile tests failed as uid {NOBODY}:\n{output}"
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        assert counts["tests"] >= 10 and counts["failures"] == counts["errors"] == 0, counts
        assert counts["skipped"] == 0, f"skipped as uid {NOBODY}:\n{output}"
        assert _leftovers(home) == [], "left behind by the unprivileged run"
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(keep, ignore_errors=True)
