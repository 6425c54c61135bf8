#!/usr/bin/env python
"""The embedded demo three ways with the same budget (steps, prompts, samples, lr, seed):

    mopd       A = sg[log pi_dom - log pi_theta] + alpha * A_ORM   (the recipe as is)
    orm_only   A = alpha * A_ORM  (GRPO; the teacher term is removed by scoring each response
               with the student itself, in the same forward: log pi_dom := log pi_theta, so the
               teacher term is 0 whatever the rollout engine, synchronous or one step off)
    no_orm     A = sg[log pi_dom - log pi_theta]   (loss.alpha = 0)

Each variant runs in its own process (Megatron state is per process) and reports greedy
per-domain accuracy on the held-out prompts; the table is appended to benchmarks/RESULTS.md
under "## Embedded demo".

    python benchmarks/bench_demo.py [--recipe R] [--set a.b=c ...] [--variants mopd,orm_only]
                                    [--no-write]

The budget is the recipe's; change it with --set (e.g. --set train.steps=500).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"mopd": [], "orm_only": [], "no_orm": ["loss.alpha=0.0"]}

CHILD = r'''
import json, sys
from mopd_megatron.config import load_recipe
from mopd_megatron.ops import score_logprobs
from mopd_megatron.train import Trainer

class OrmOnlyTrainer(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        inner, temperature, tp = self.loss_fn, cfg.rollout.temperature, self._tp_group()

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


def run_variant(name: str, recipe: str, overrides: list[str], tmp: Path) -> tuple[dict, float]:
    script = tmp / "bench_child.py"
    script.write_text(CHILD)
    run_dir = tmp / name
    ov = overrides + VARIANTS[name] + [f"checkpoint.dir=null", f"logging.jsonl_path={run_dir}/metrics.jsonl",
                                       "logging.console=false"]
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
    if name == "orm_only":  # the baseline must really have no teacher term
        steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        worst = max(abs(m["adv/teacher_term_mean"]) + m["adv/teacher_term_std"] for m in steps)
        if worst > 1e-4:
            raise RuntimeError(f"orm_only: teacher term reached {worst:.2e} (expected 0)")
    return json.loads(line[len("REPORT "):]), time.time() - t0


def table(results: dict, cfg_line: str) -> str:
    domains = sorted({d for r, _ in results.values() for d in r["after"].get("student", {})})
    first = next(iter(results.values()))[0]
    out = ["## Embedded demo", "", cfg_line, "",
           "| run | " + " | ".join(f"{d} acc" for d in domains) + " | wall s |",
           "|---|" + "---|" * (len(domains) + 1)]
    teachers = {k: v for k, v in first["before"].items() if k.startswith("teacher:")}
    out.append("| student before | " + " | ".join(f"{first['before']['student'][d] * 100:.1f}" for d in domains) + " | |")
    for t, accs in teachers.items():
        out.append(f"| {t} | " + " | ".join(f"{accs[d] * 100:.1f}" if d in accs else "-" for d in domains) + " | |")
    for name, (r, secs) in results.items():
        out.append(f"| {name} (after) | " + " | ".join(f"{r['after']['student'][d] * 100:.1f}" for d in domains)
                   + f" | {secs:.0f} |")
    if "mopd" in results:  # the demo's done-when target, stated from the numbers above
        after = results["mopd"][0]["after"]["student"]
        best = {d: max(a[d] for a in teachers.values() if d in a) for d in domains}
        short = [f"{d} {after[d] * 100:.1f} vs {best[d] * 100:.1f}" for d in domains
                 if after[d] < best[d] - 0.02]
        out += ["", "Target (MOPD student >= each teacher - 2 points on every domain): " +
                ("met." if not short else "NOT met (" + "; ".join(short) + ").")]
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
    ap.add_argument("--variants", default="mopd,orm_only,no_orm")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mopd_megatron.config import load_recipe
    from mopd_megatron.trainer.cli import ensure_demo_inputs
    cfg = load_recipe(args.recipe, args.overrides)
    ensure_demo_inputs(cfg)
    import tempfile
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.variants.split(","):
            results[name] = run_variant(name, args.recipe, list(args.overrides), Path(d))
            print(name, results[name][0]["after"], f"{results[name][1]:.0f}s", flush=True)
    engine = cfg.rollout.engine + (", one step off" if cfg.train.async_rollout else "")
    cfg_line = (f"{cfg.train.steps} steps x {cfg.rollout_batch_size} samples, lr {cfg.optimizer.lr}, "
                f"alpha {cfg.loss.alpha}, rollout engine {engine}; greedy accuracy (%) on "
                "held-out prompts; "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"OMP_NUM_THREADS=1, {time.strftime('%Y-%m-%d')}")
    text = table(results, cfg_line)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()
