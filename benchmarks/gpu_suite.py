"""Every GPU-only check of mopd-megatron in one call (run it through benchmarks/gpu_suite.sh).

Checks (default order, cheap first; --list, --dry-run for what each measures):
  loss_kernel   fused MOPD loss: Triton numerics, then GB/s vs the HBM peak at T=16k
  te_parity     Transformer Engine layer spec vs the local spec, same weights (fp32, bf16)
  memory_plan   the planner's per-term prediction vs torch.cuda memory of a small training run
  fp8_step      FP8 vs BF16 training steps built from a recipe's model.fp8 (step time, losses)
  sglang_cuda   SGLang on CUDA: memory saver release/resume, CUDA-IPC weight sync, parity probe

Each check runs in its own process with its own time budget (stopped past it; the suite stops
starting checks after SUITE_BUDGET_S, so it ends inside 8 minutes on one H100/H200). A check
that fails is recorded as FAILED with its error and the suite goes on; a check whose packages
are missing here (Transformer Engine, SGLang, megatron-core) is SKIPPED with the reason.
Figures go to benchmarks/RESULTS.md (a section "GPU suite (<card>, <date>)", replaced when the
same card and date run again) and to a JSON file (--out); with $OUT set, both (and the section
and the log) are copied there too. Without a CUDA device a real run refuses (exit 2): nothing
is measured or written.

Exit status: 0 every check passed or was skipped, 1 a check failed, 2 no CUDA device or a
usage error.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/ first (the `gpu` package of checks), then the checkout (mopd_megatron, installed
# or not); the children get the same through PYTHONPATH.
for _p in (str(ROOT), str(HERE)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from gpu import CHECKS, SUITE_BUDGET_S, by_name  # noqa: E402

NO_CUDA = "no CUDA device: this suite only runs on a GPU; use --list/--dry-run here"
DEFAULT_OUT = ROOT / "benchmarks" / "gpu_suite_results.json"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
GRACE_S = 10          # SIGTERM -> SIGKILL for a check past its budget
MIN_BUDGET_S = 15     # a check is not started with less than this left of the suite's budget
DISTRIBUTIONS = {"torch": ("torch",), "megatron-core": ("megatron-core", "megatron_core"),
                 "transformer-engine": ("transformer-engine", "transformer_engine",
                                        "transformer-engine-cu12", "transformer_engine_torch"),
                 "sglang": ("sglang",), "triton": ("triton",)}


# ------------------------------------------------------------------------------- arguments
def _names(parser, values: list[str] | None) -> list[str]:
    out = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in out if n not in by_name()]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; checks: {', '.join(c.name for c in CHECKS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_suite", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the checks and their budgets; "
                   "imports nothing, needs no GPU")
    p.add_argument("--dry-run", action="store_true", help="print the checks in order and what "
                   "each would measure, and whether its packages are installed here; runs "
                   "nothing, needs no GPU")
    p.add_argument("--only", action="append", metavar="NAME[,NAME]",
                   help="run only these checks (repeatable), in the default order")
    p.add_argument("--skip", action="append", metavar="NAME[,NAME]",
                   help="leave these checks out (repeatable)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="JSON of the raw figures (default: benchmarks/gpu_suite_results.json)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="markdown file the section is written into (default: benchmarks/RESULTS.md)")
    p.add_argument("--setup", action="store_true",
                   help="(gpu_suite.sh) run `bash tools/setup_env.sh` first; ignored here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_budget", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    return p


def selected(parser, args) -> list:
    only, skip = _names(parser, args.only), _names(parser, args.skip)
    return [c for c in CHECKS if (not only or c.name in only) and c.name not in skip]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------- list / dry run
def print_list(checks) -> None:
    for c in checks:
        print(f"{c.name:12s} budget {c.budget_s:3d} s")


def print_dry_run(checks, args) -> None:
    total = sum(c.budget_s for c in checks)
    print(f"GPU suite, dry run: {len(checks)} check(s) in this order, each in its own process "
          f"stopped at its budget ({total} s together; no check starts after {SUITE_BUDGET_S} s "
          "of the suite). Nothing is run, imported or written.")
    for i, c in enumerate(checks, 1):
        needs = ", ".join(f"{m} ({'installed' if installed(m) else 'NOT installed: SKIPPED'})"
                          for m in ("torch", *c.needs))
        print(f"\n{i}. {c.name} (budget {c.budget_s} s; needs {needs})")
        print(textwrap.fill(c.measures, 96, initial_indent="   ", subsequent_indent="   "))
    print(f"\nA real run (CUDA only) writes the section 'GPU suite (<card>, <date>)' into "
          f"{args.results}, the raw figures to {args.out}, and copies both to $OUT when set.")


# --------------------------------------------------------------------------- child process
def child_main(args) -> int:
    """One check in this process; its status and figures go to args._result."""
    from gpu.common import CheckFailed, Recorder, Skip
    spec = by_name()[args._child]
    # A stop at the budget must still run `finally` blocks and atexit handlers: they stop the
    # SGLang servers this check started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rec = Recorder(args._result, args._budget)
    t0 = time.perf_counter()
    status, error, tb = "PASSED", None, None
    try:
        importlib.import_module(f"gpu.{spec.module}").run(rec, args)
    except Skip as e:
        status, error = "SKIPPED", str(e)
    except CheckFailed as e:
        status, error = "FAILED", str(e)
    except SystemExit as e:
        status, error = "FAILED", f"stopped (exit {e.code}): past its {args._budget:.0f} s budget"
    except BaseException as e:  # noqa: BLE001 - any error is this check's FAILED, not the suite's
        status, error = "FAILED", f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()[-6000:]
    rec.flush(status=status, error=error, traceback=tb, seconds=time.perf_counter() - t0)
    if tb:
        print(tb, file=sys.stderr)
    return 0


def probe_main() -> int:
    info = {"cuda": False}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(cuda=True, name=torch.cuda.get_device_name(0),
                        capability=list(torch.cuda.get_device_capability(0)),
                        total_memory=props.total_memory, device_count=torch.cuda.device_count())
    except Exception as e:  # noqa: BLE001 - reported as "no CUDA"
        info["error"] = f"{type(e).__name__}: {e}"
    print("PROBE " + json.dumps(info), flush=True)
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name, dists in DISTRIBUTIONS.items():
        for d in dists:
            try:
                out[name] = version(d)
                break
            except PackageNotFoundError:
                continue
        else:
            out[name] = None
    return out


# --------------------------------------------------------------------------------- driver
def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def probe() -> dict:
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_probe"],
                           capture_output=True, text=True, timeout=180, env=_env())
    except subprocess.TimeoutExpired:
        return {"cuda": False, "error": "the device probe timed out"}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {"cuda": False, "error": (r.stderr.strip().splitlines() or ["no output"])[-1]}


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_check(spec, budget: float, log: list[str]) -> dict:
    fd, path = tempfile.mkstemp(prefix=f"gpu_suite_{spec.name}.", suffix=".json")
    os.close(fd)
    os.unlink(path)  # the child writes it; absent means it never got to write anything
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", spec.name,
           "--_result", path, "--_budget", f"{budget:.0f}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=_env(), cwd=str(ROOT), start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.append(f"[{spec.name}] {line}")
            print(f"  [{spec.name}] {line}", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        os.unlink(path)
    status, error = data.get("status"), data.get("error")
    if timed_out:
        status = "FAILED"
        error = f"timed out: still running after its {budget:.0f} s budget" + (
            f" ({error})" if error else "")
    elif status is None:
        status, error = "FAILED", f"the check's process ended with exit code {proc.returncode} " \
                                  "before reporting (killed: out of memory, a crash?)"
    if timed_out or data.get("status") is None:
        for pgid in data.get("pgids", []):  # servers the check started in their own sessions
            _kill_group(pgid, signal.SIGKILL)
    if status == "FAILED" and (timed_out or data.get("status") is None or data.get("traceback")):
        error = f"{error}\nlast output:\n" + "\n".join(tail)
    return dict(name=spec.name, status=status, seconds=round(seconds, 1), budget_s=budget,
                error=error, traceback=data.get("traceback"), figures=data.get("figures", {}))


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=20).stdout.strip()
            return sha.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    given = os.environ.get("MOPD_COMMIT")
    return f"{given} (from MOPD_COMMIT)" if given else "unknown (no git checkout here; set MOPD_COMMIT)"


def section_markdown(meta: dict, results: list[dict]) -> str:
    key = f"{meta['card']} {meta['date']}"
    v = meta["versions"]
    lines = [f"<!-- gpu_suite: begin {key} -->",
             f"## GPU suite ({meta['card']}, {meta['date']})", "",
             f"`{meta['script']}` at commit {meta['commit']}; {meta['card']} "
             f"({meta['total_memory_gib']:.0f} GiB, compute capability {meta['capability']}), "
             f"torch {v.get('torch')} (CUDA {meta['torch_cuda']}), megatron-core "
             f"{v.get('megatron-core')}, transformer-engine {v.get('transformer-engine')}, "
             f"sglang {v.get('sglang')}, triton {v.get('triton')}; {meta['total_s']:.0f} s in all. "
             f"Raw figures: `{meta['json']}`.", "",
             "| check | status | seconds | note |", "|---|---|---|---|"]
    for r in results:
        note = (r["error"] or "").splitlines()[0][:160] if r["error"] else ""
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | "
                     f"{note.replace('|', '/')} |")
    for r in results:
        if not r["figures"]:
            continue
        try:
            body = importlib.import_module(f"gpu.{by_name()[r['name']].module}").summary(
                r["figures"])
        except Exception as e:  # noqa: BLE001 - partial figures must not lose the section
            body = [f"(summary failed: {type(e).__name__}: {e}; see the JSON)"]
        if body:
            lines += ["", f"### {r['name']} ({r['status']})", "", *body]
    lines.append(f"<!-- gpu_suite: end {key} -->")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, key: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(f"<!-- gpu_suite: begin {key} -->") + r".*?"
                         + re.escape(f"<!-- gpu_suite: end {key} -->") + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def driver_main(args, checks) -> int:
    info = probe()
    if not info.get("cuda"):
        why = f" ({info['error'][:200]})" if info.get("error") else ""
        print(NO_CUDA + why, file=sys.stderr)
        return 2
    card = info["name"]
    print(f"gpu_suite: {card}, {len(checks)} check(s): {', '.join(c.name for c in checks)}; "
          f"no check starts after {SUITE_BUDGET_S} s", flush=True)
    t_start = time.monotonic()
    log: list[str] = []
    results = []
    for spec in checks:
        left = SUITE_BUDGET_S - (time.monotonic() - t_start)
        budget = min(spec.budget_s, left)
        missing = [m for m in spec.needs if not installed(m)]
        if budget < MIN_BUDGET_S:
            r = dict(name=spec.name, status="SKIPPED", seconds=0.0, budget_s=0,
                     error=f"the suite's {SUITE_BUDGET_S} s budget is spent", figures={})
        elif missing:
            r = dict(name=spec.name, status="SKIPPED", seconds=0.0, budget_s=budget,
                     error=f"needs {', '.join(missing)}, not installed here "
                           "(`pip install -e .[gpu]`; see docs/testing.md)", figures={})
        else:
            print(f"--- {spec.name} (budget {budget:.0f} s)", flush=True)
            r = run_check(spec, budget, log)
        results.append(r)
        first = (r["error"] or "").splitlines()[0][:200] if r["error"] else ""
        print(f"--- {spec.name}: {r['status']} in {r['seconds']:.0f} s"
              + (f": {first}" if first else ""), flush=True)

    entry = os.environ.get("MOPD_GPU_SUITE_ENTRY", "benchmarks/gpu_suite.py")
    argv = [a for a in sys.argv[1:]]
    meta = dict(card=card, date=time.strftime("%Y-%m-%d", time.gmtime()), commit=git_commit(),
                script=" ".join([entry, *argv]), capability=".".join(map(str, info["capability"])),
                total_memory_gib=info["total_memory"] / 2**30, torch_cuda=info.get("torch_cuda"),
                versions=_versions(), total_s=time.monotonic() - t_start,
                suite_budget_s=SUITE_BUDGET_S, python=sys.executable,
                json=os.path.relpath(os.path.abspath(args.out), ROOT)
                if os.path.abspath(args.out).startswith(str(ROOT)) else args.out)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(suite=meta, checks=results), indent=1, default=str),
                   encoding="utf-8")
    section = section_markdown(meta, results)
    results_md = Path(args.results)
    write_section(results_md, section, f"{meta['card']} {meta['date']}")
    dest = os.environ.get("OUT")
    if dest and os.path.isdir(dest):
        # The device tool returns only what is under $OUT.
        shutil.copy(out, os.path.join(dest, out.name))
        shutil.copy(results_md, os.path.join(dest, results_md.name))
        Path(dest, "gpu_suite_section.md").write_text(section, encoding="utf-8")
        Path(dest, "gpu_suite.log").write_text("\n".join(log) + "\n", encoding="utf-8")
    print(f"\ngpu_suite: wrote {out} and the section in {results_md}"
          + (f" (copied to {dest})" if dest and os.path.isdir(dest) else ""))
    for r in results:
        print(f"  {r['name']:12s} {r['status']:8s} {r['seconds']:6.0f} s")
    return 1 if any(r["status"] == "FAILED" for r in results) else 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._probe:
        return probe_main()
    if args._child:
        return child_main(args)
    checks = selected(parser, args)
    if args.list:
        print_list(checks)
        return 0
    if args.dry_run:
        print_dry_run(checks, args)
        return 0
    if not checks:
        print("gpu_suite: no check left to run (--only/--skip)", file=sys.stderr)
        return 2
    return driver_main(args, checks)


if __name__ == "__main__":
    sys.exit(main())
