#!/usr/bin/env python
"""The embedded demo several ways with the same budget (steps, prompts, samples, lr):

    orm_only   A = alpha * A_ORM  (GRPO; the teacher term is removed by scoring each response
               with the student itself, in the same forward: log pi_dom := log pi_theta, so the
               teacher term is 0 whatever the rollout engine, synchronous or one step off)
    mopd       A = sg[log pi_dom - log pi_theta] + alpha * A_ORM   (loss.signal=sampled)
    full_vocab the exact reverse KL over the vocabulary + the ORM term (loss.signal=full_vocab)
    no_orm     the recipe's loss.signal without the ORM term (loss.alpha = 0)

Each (variant, seed) runs in its own process (Megatron state is per process); seed k sets
train.seed = 1234 + k and data.seed = k. Reported per variant over the seeds: greedy per-domain
accuracy on the held-out prompts after training (mean, min-max) and steps-to-teacher: the first
periodic eval (train.eval_interval) at which the student is within 2 points of that domain's
teacher (median over the seeds that got there, and how many did). The table replaces the
section "## Embedded demo" of benchmarks/RESULTS.md.

    python benchmarks/bench_demo.py [--recipe R] [--set a.b=c ...] [--seeds 3]
                                    [--variants orm_only,mopd,full_vocab] [--no-write]
                                    [--keep DIR]

The budget is the recipe's; change it with --set (e.g. --set train.steps=500).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# orm_only names the sampled signal: its teacher term is removed through the sampled teacher
# log-probs (below), which loss.signal=full_vocab (the demo recipe's) does not read.
VARIANTS = {"orm_only": ["loss.signal=sampled"], "mopd": ["loss.signal=sampled"],
            "full_vocab": ["loss.signal=full_vocab"], "no_orm": ["loss.alpha=0.0"]}
TARGET = 0.02  # within 2 points of the teacher

CHILD = r'''
import json, sys
from mopd_megatron.config import load_recipe
from mopd_megatron.ops import score_logprobs
from mopd_megatron.train import Trainer

class OrmOnlyTrainer(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        inner, temperature = self.loss_fn, cfg.rollout.temperature
        tp = self.layout.tp_group_or_none

        def loss_fn(batch, logits):  # the teacher is the student at this very forward
            flat = logits.detach().reshape(-1, logits.shape[-1]) / temperature
            own = score_logprobs(flat, batch["targets"].reshape(-1).clamp(min=0), tp)
            return inner(dict(batch, teacher_logp=own.reshape(batch["teacher_logp"].shape)),
                         logits)
        self.loss_fn = loss_fn

def main():
    variant, recipe, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cls = OrmOnlyTrainer if variant == "orm_only" else Trainer
    t = cls(load_recipe(recipe, overrides))
    try:
        report = t.train()
    finally:
        t.close()
    print("REPORT " + json.dumps(report))

if __name__ == "__main__":
    main()
'''


def run_variant(name: str, recipe: str, overrides: list[str], tmp: Path,
                seed: int = 0) -> tuple[dict, float]:
    script = tmp / "bench_child.py"
    script.write_text(CHILD)
    run_dir = tmp / f"{name}_{seed}"
    ov = overrides + VARIANTS[name] + [
        f"train.seed={1234 + seed}", f"data.seed={seed}", "checkpoint.dir=null",
        f"logging.jsonl_path={run_dir}/metrics.jsonl", "logging.console=false"]
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    t0 = time.time()
    p = subprocess.run([sys.executable, str(script), name, recipe, json.dumps(ov)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("REPORT "))
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if name == "orm_only":  # the baseline must really have no teacher term
        worst = max(abs(m["adv/teacher_term_mean"]) + m["adv/teacher_term_std"] for m in steps)
        if worst > 1e-4:
            raise RuntimeError(f"orm_only: teacher term reached {worst:.2e} (expected 0)")
    report = json.loads(line[len("REPORT "):])
    report["evals"] = {m["step"]: {k[5:]: v for k, v in m.items() if k.startswith("eval/")}
                       for m in steps if any(k.startswith("eval/") for k in m)}
    return report, time.time() - t0


def steps_to_teacher(report: dict, teachers: dict) -> dict:
    """{domain: first eval step within TARGET of the best teacher, or None}."""
    out = {}
    for d, best in teachers.items():
        hit = [int(s) for s, acc in sorted(report["evals"].items(), key=lambda x: int(x[0]))
               if acc.get(d, -1.0) >= best - TARGET]
        out[d] = hit[0] if hit else None
    return out


def _spread(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs) * 100:.1f} ({min(xs) * 100:.1f}-{max(xs) * 100:.1f})"


def table(results: dict, cfg_line: str, seeds: int) -> str:
    """results[variant] = [(report, seconds) per seed]."""
    runs = [r for rs in results.values() for r, _ in rs]
    domains = sorted({d for r in runs for d in r["after"].get("student", {})})
    first = runs[0]
    teacher_runs = {k: v for k, v in first["before"].items() if k.startswith("teacher:")}
    best = {d: max(a[d] for a in teacher_runs.values() if d in a) for d in domains}
    out = ["## Embedded demo", "", cfg_line, "",
           f"Accuracy: greedy on the held-out prompts after training, mean (min-max) over {seeds} "
           "seed(s); steps to teacher: the first periodic eval within 2 points of the teacher, "
           "median over the seeds that got there (how many of them).", "",
           "| run | " + " | ".join(f"{d} acc" for d in domains) + " | "
           + " | ".join(f"{d} steps to teacher" for d in domains) + " | wall s |",
           "|---|" + "---|" * (2 * len(domains) + 1)]
    before = [r["before"]["student"] for r in runs if r["before"].get("student")]
    out.append("| student before | " + " | ".join(_spread([b[d] for b in before]) for d in domains)
               + " |" + " |" * len(domains) + " |")
    for t, accs in teacher_runs.items():
        out.append(f"| {t} | " + " | ".join(f"{accs[d] * 100:.1f}" if d in accs else "-"
                                           for d in domains) + " |" + " |" * len(domains) + " |")
    for name, rs in results.items():
        after = [r["after"]["student"] for r, _ in rs]
        reach = [steps_to_teacher(r, best) for r, _ in rs]
        cells = []
        for d in domains:
            got = sorted(x[d] for x in reach if x[d] is not None)
            cells.append(f"{got[len(got) // 2]} ({len(got)}/{len(rs)})" if got else
                         f"not reached (0/{len(rs)})")
        secs = sum(t for _, t in rs) / len(rs)
        out.append(f"| {name} | " + " | ".join(_spread([a[d] for a in after]) for d in domains)
                   + " | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(out) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace this benchmark's section of RESULTS.md (others own the other sections)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find("## Embedded demo")
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny_cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variants", default="orm_only,mopd,full_vocab",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=3, help="runs per variant (seed 0..N-1)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="also copy each run's metrics to DIR/<variant>_<seed>.jsonl (the table "
                         "keeps only steps-to-teacher of the periodic evals)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.cli import ensure_demo_inputs
    cfg = load_recipe(args.recipe, args.overrides)
    ensure_demo_inputs(cfg)
    import tempfile
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    results: dict[str, list] = {}
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            for name in names:
                r = run_variant(name, args.recipe, list(args.overrides), Path(d), seed)
                results.setdefault(name, []).append(r)
                if args.keep:
                    shutil.copy(Path(d) / f"{name}_{seed}" / "metrics.jsonl",
                                Path(args.keep) / f"{name}_{seed}.jsonl")
                print(name, f"seed {seed}", r[0]["after"], f"{r[1]:.0f}s", flush=True)
    engine = cfg.rollout.engine + (", one step off" if cfg.train.async_rollout else "")
    cfg_line = (f"{cfg.train.steps} steps x {cfg.rollout_batch_size} samples, lr {cfg.optimizer.lr}, "
                f"alpha {cfg.loss.alpha}, rollout engine {engine}; greedy accuracy (%) on "
                "held-out prompts; "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"OMP_NUM_THREADS=1, {time.strftime('%Y-%m-%d')}")
    text = table(results, cfg_line, args.seeds)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()
