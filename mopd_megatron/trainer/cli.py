"""``mopd train``: argument parsing, --dry-run plan, the run, and the accuracy report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "default_recipe", "build_parser"]


def default_recipe() -> str:
    """The embedded demo recipe: shipped next to the package (installed as package data) or in
    the source checkout's recipes/."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "recipes" / "tiny_cpu.yaml", here.parent / "recipes" / "tiny_cpu.yaml"):
        if cand.is_file():
            return str(cand)
    return "recipes/tiny_cpu.yaml"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mopd train", description="Multi-teacher on-policy "
                                 "distillation (MOPD) with Megatron: rollout -> rewards -> "
                                 "teacher scores -> student update -> weight sync.")
    ap.add_argument("--recipe", default=None, help="recipe YAML (default: the embedded CPU demo, "
                                                    "recipes/tiny_cpu.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C",
                    help="override a recipe field (repeatable), e.g. --set train.steps=10")
    ap.add_argument("--dry-run", action="store_true", help="validate, print the resolved config "
                    "and the plan, and exit without building models or writing files")
    return ap


def plan(cfg, world_size: int) -> str:
    p, o = cfg.parallel, cfg.optimizer
    dp = p.data_parallel_size(world_size)
    lines = [
        f"world size {world_size}: tp {p.tp} x pp {p.pp} x dp {dp}" + (f" (vpp {p.vpp})" if p.vpp else ""),
        f"{cfg.train.steps} steps x {cfg.train.prompts_per_step} prompts x "
        f"{cfg.rollout.n_samples_per_prompt} samples = {cfg.rollout_batch_size} sequences per rollout",
        f"{o.steps_per_rollout} optimizer step(s) per rollout x {o.epochs_per_rollout} epoch(s), "
        f"global batch {p.global_batch_size}, "
        f"{p.global_batch_size // (p.micro_batch_size * dp)} micro-batch(es) of {p.micro_batch_size} per rank",
        f"rollout: {cfg.rollout.engine} ({cfg.rollout.mode}), async={cfg.train.async_rollout}",
        "teachers: " + ", ".join(f"{t.name} <- {t.domains} ({t.format}: {t.checkpoint})" for t in cfg.teachers),
        f"loss: alpha {cfg.reward.alpha}, {cfg.loss.is_variant} [{cfg.loss.eps_low}, {cfg.loss.eps_high}], "
        f"{cfg.loss.aggregation}",
        f"checkpoints: {cfg.checkpoint.dir} every {cfg.checkpoint.save_interval}, resume={cfg.checkpoint.resume}",
    ]
    return "\n".join(lines)


DEMO_STUDENT = ".cache/tiny_cpu/student/hf"  # the embedded recipe's model.hf_config


def _ensure_demo_inputs(cfg) -> None:
    """The embedded demo builds its tiny teachers/student on first use (cached in .cache/);
    only when the run points at the demo's own inputs.

    Every rank of a multi-process run (torchrun, Slurm) gets here before any process group
    exists: the tool runs as a single-process child (rank variables removed) under an exclusive
    file lock, so the first rank builds and the others find the cache complete.
    """
    if cfg.model.hf_config != DEMO_STUDENT:
        return
    import fcntl
    import subprocess
    root = Path(default_recipe()).resolve().parent.parent
    tool = root / "tools" / "build_demo_teachers.py"
    if not tool.is_file():
        return
    out = Path(DEMO_STUDENT).parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    with open(out.parent / f".{out.name}.build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        subprocess.run([sys.executable, str(tool), "--out", str(out)], env=env, check=True)


def format_report(report: dict) -> str:
    rows = []
    for when in ("before", "after"):
        for who, accs in report.get(when, {}).items():
            rows.append(f"  {when:6s} {who:22s} " + "  ".join(f"{d} {a * 100:5.1f}%" for d, a in accs.items()))
    return "greedy accuracy on held-out prompts:\n" + "\n".join(rows) if rows else ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..config import ConfigError, load_recipe
    from ..data import DataError
    from ..runtime import launch_env
    recipe = args.recipe or default_recipe()
    world = launch_env().world_size
    try:
        cfg = load_recipe(recipe, args.overrides)
        if args.dry_run:
            cfg.validate(world_size=world, check_paths=False)
            print(cfg.dump_yaml())
            print(plan(cfg, world))
            return 0
        _ensure_demo_inputs(cfg)
        _single_process_port()
        from ..train import Trainer
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        print(f"mopd train: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}",
              file=sys.stderr)
        return 2
    try:
        report = trainer.train()
    finally:
        trainer.close()
    if launch_env().rank == 0:
        print(format_report(report), flush=True)
    return 0


def _single_process_port() -> None:
    """Without torchrun, torch.distributed still needs a port; take a free one (29500 may be
    someone else's on a shared machine)."""
    if "RANK" in os.environ or "MASTER_PORT" in os.environ:
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
