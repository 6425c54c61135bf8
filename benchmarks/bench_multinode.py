#!/usr/bin/env python
"""Weight sync and colocated memory release/resume, per engine, on two emulated nodes.

Runs the tiny recipe (a wider student than the tests' so that a sync moves megabytes) as two
torchrun agents on this machine (``mopd_megatron/launch/emulate.py``), 2 ranks per node,
TP=2 x DP=2, with real SGLang CPU servers:

- ``colocated``: one engine per emulated node, loaded by its own node's ranks over shared
  memory, released before teacher scoring and resumed before the sync every step;
- ``dedicated``: two engines started by the launcher's engine-task command on a third
  emulated node, loaded over the gloo weight-update group hosted by global rank 0.

From each run's own metrics (``metrics.jsonl``) it reports, per step after the first (the
first includes warm-up): sync seconds, bytes per engine and which rank loaded it, the
transport, and ``time/release`` / ``time/resume``; medians and the rate. With
``--results FILE`` the table replaces the section between ``<!-- bench_multinode -->`` markers
in FILE (benchmarks/RESULTS.md), with the machine, date and command.

    python benchmarks/bench_multinode.py --results benchmarks/RESULTS.md

Needs the SGLang CPU harness (tests/harness/sglang_cpu/setup.sh). Takes ~5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench_multinode -->", "<!-- /bench_multinode -->"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--modes", default="colocated,dedicated",
                    help="comma-separated: colocated, dedicated (default both)")
    ap.add_argument("--steps", type=int, default=5, help="MOPD steps per run (default 5)")
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="student layers (default 4)")
    ap.add_argument("--work-dir", default=None, help="where inputs and runs go (default: a "
                    "temporary directory, deleted afterwards)")
    ap.add_argument("--results", default=None,
                    help="markdown file whose bench_multinode section is replaced")
    return ap.parse_args(argv)


def build_inputs(out: Path, hidden: int, layers: int) -> Path:
    """Demo inputs with a wider student; the teachers' quality does not matter here."""
    flags = ["--teacher-steps", "2", "--student-steps", "2", "--hidden", str(hidden), "--ffn",
             str(2 * hidden), "--layers", str(layers), "--batch", "16", "--seed", "0",
             "--train-prompts", "64", "--max-len", "5", "--unused-tokens", "110"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_demo_teachers.py"),
                    "--out", str(out), *flags], check=True, env=env, cwd=ROOT, timeout=900)
    return out


def overrides(tiny: Path, run: Path, port: int, steps: int, extra: list[str]) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import recipe_overrides  # the tests' own tiny-recipe settings
    return recipe_overrides(tiny, run, steps=steps, extra=[
        "rollout.engine=sglang", "rollout.mode=colocated", f"model.checkpoint={tiny}/student/hf",
        "model.checkpoint_format=hf", "rollout.max_total_tokens=8192",
        f"rollout.base_port={port}", "rollout.startup_timeout_s=300",
        f"rollout.server_log_dir={run}/sglang", "rollout.parity_interval=1",
        "rollout.server_cpu_threads=1", "train.cpu_threads=1", "parallel.tp=2", *extra])


def run_mode(mode: str, tiny: Path, work: Path, steps: int) -> list[dict]:
    from mopd_megatron.config import load_recipe
    from mopd_megatron.launch.emulate import run_nodes, start_engine_tasks, stop_engine_tasks
    from mopd_megatron.rollout.server import wait_healthy
    run = work / mode
    port = 21000 + os.getpid() % 20000
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    extra: list[str] = []
    tasks = []
    try:
        if mode == "dedicated":
            urls = [f"http://127.0.0.1:{port + i}" for i in range(2)]
            cfg = load_recipe(str(ROOT / "recipes" / "tiny_cpu.yaml"),
                              overrides(tiny, run, port, steps, []))
            tasks = start_engine_tasks(cfg, 2, run / "sglang", {"PYTHONPATH": str(ROOT)})
            for url in urls:
                wait_healthy(url, 300)
            extra = ["rollout.mode=dedicated", f"rollout.external_urls=[{','.join(urls)}]"]
        sets = [a for o in overrides(tiny, run, port, steps, extra) for a in ("--set", o)]
        print(f"[bench_multinode] {mode}: 2 emulated nodes x 2 ranks, {steps} steps",
              file=sys.stderr, flush=True)
        run_nodes(2, 2, sets, run, env, ROOT, timeout_s=1500)
    finally:
        stop_engine_tasks(tasks)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summarize(mode: str, steps: list[dict]) -> list[str]:
    later = steps[1:] or steps
    engines = sorted({k.rsplit("engine", 1)[1] for s in steps for k in s
                      if k.startswith("sync/bytes/engine")}, key=int)
    med = lambda key: statistics.median(s[key] for s in later) if all(key in s for s in later) else None  # noqa: E731
    rows = []
    secs = med("sync/seconds")
    total = med("sync/bytes")
    transport = ", ".join(sorted(k.removeprefix("sync/transport/") for k in steps[-1]
                                 if k.startswith("sync/transport/")))
    for e in engines:
        nbytes = med(f"sync/bytes/engine{e}")
        rows.append(f"| {mode} | engine{e} | rank {int(later[-1][f'sync/loader_rank/engine{e}'])} "
                    f"| {transport} | {nbytes / 2**20:.2f} | {secs:.3f} | "
                    f"{total / 2**20 / secs:.1f} | "
                    + (f"{med('time/release'):.3f} | {med('time/resume'):.3f}"
                       if mode == "colocated" else "- | -")  # dedicated engines never release
                    + f" | {max(s['rollout/parity_mean_abs'] for s in steps):.1e} |")
    return rows


def write_results(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("colocated", "dedicated")]
    if bad:
        print(f"bench_multinode: unknown --modes {bad} (colocated, dedicated)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench_multinode_")
    work = Path(args.work_dir or tmp.name)
    try:
        tiny = build_inputs(work / "inputs", args.hidden, args.layers)
        rows = []
        for mode in modes:
            rows += summarize(mode, run_mode(mode, tiny, work, args.steps))
    finally:
        if tmp is not None:
            tmp.cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    text = "\n".join([
        f"### Two emulated nodes, CPU ({datetime.date.today()}, commit {commit})", "",
        f"Machine: {os.cpu_count()} x {cpu}; torch threads 1 per rank and server. Command: "
        f"`python benchmarks/bench_multinode.py --steps {args.steps} --hidden {args.hidden} "
        f"--layers {args.layers}`. Student: hidden {args.hidden}, {args.layers} layers, fp32; "
        "TP=2 x DP=2 on 2 emulated nodes; medians over steps 2..N. `sync s` is the whole "
        "sync (export with its TP gathers, serialize, load into every engine); MiB/s is all "
        "engines' bytes over it. Release/resume: the colocated engines' calls per step.", "",
        "| mode | engine | loaded by | transport | MiB per sync | sync s | MiB/s | release s | "
        "resume s | worst parity (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows])
    print(text)
    if args.results:
        write_results(Path(args.results), text)
        print(f"[bench_multinode] wrote {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
