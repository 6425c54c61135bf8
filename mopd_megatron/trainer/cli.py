"""``mopd train``: argument parsing, --dry-run plan, the run, and the accuracy report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "default_recipe", "build_parser", "ensure_demo_inputs"]


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
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config, the plan "
                    "and the Megatron build, then run every start-up check and report all "
                    "failures; builds no model and writes nothing")
    ap.add_argument("--nodes", type=int, default=None, help="--dry-run: nodes of the cluster "
                    "run to plan for (default: this launch's world)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="--dry-run: GPUs per node "
                    "of the cluster run, one rank each (with --nodes)")
    ap.add_argument("--ranks-per-node", type=int, default=None, help="--dry-run: ranks per node "
                    "of a CPU run (with --nodes; default: --gpus-per-node)")
    return ap


def plan(cfg, world_size: int) -> str:
    from .eval_plan import eval_plan
    p, o = cfg.parallel, cfg.optimizer
    dp = p.data_parallel_size(world_size)
    if world_size % (p.tp * p.pp):
        return (f"world size {world_size} does not hold tp {p.tp} x pp {p.pp}: plan a cluster run "
                "with --nodes N --gpus-per-node G")
    lines = [
        f"world size {world_size}: tp {p.tp} x pp {p.pp} x dp {dp}" + (f" (vpp {p.vpp})" if p.vpp else ""),
        f"{cfg.train.steps} steps x {cfg.train.prompts_per_step} prompts x "
        f"{cfg.rollout.n_samples_per_prompt} samples = {cfg.rollout_batch_size} sequences per rollout",
        f"{o.steps_per_rollout} optimizer step(s) per rollout x {o.epochs_per_rollout} epoch(s), "
        f"global batch {p.global_batch_size}, "
        + (f"micro-batches of <= {p.max_tokens_per_microbatch} tokens per rank"
           f"{', packed' if p.pack_sequences else ''} (sequences dealt to DP ranks by tokens)"
           if p.max_tokens_per_microbatch is not None else
           f"{p.global_batch_size // (p.micro_batch_size * dp)} micro-batch(es) of "
           f"{p.micro_batch_size} per rank"),
        f"rollout: {cfg.rollout.engine} ({cfg.rollout.mode}), async={cfg.train.async_rollout}",
        "teachers: " + ", ".join(f"{t.name} <- {t.domains} ({t.format}: {t.checkpoint})" for t in cfg.teachers),
        f"loss: alpha {cfg.loss.alpha}, {cfg.loss.is_variant} [{cfg.loss.eps_low}, {cfg.loss.eps_high}], "
        f"{cfg.loss.aggregation}",
        f"checkpoints: {cfg.checkpoint.dir} every {cfg.checkpoint.save_interval}, resume={cfg.checkpoint.resume}",
        f"eval: {eval_plan(cfg).describe()}",  # the plan Trainer.evaluate follows
    ]
    return "\n".join(lines)


def ensure_demo_inputs(cfg) -> None:
    """``data.build_demo_inputs``: build the embedded demo's inputs (tokenizer, prompts,
    teachers, student) where the recipe's paths point, with tools/build_demo_teachers.py, which
    keeps a current build and replaces any other.

    Every rank of a multi-process run (torchrun, Slurm) gets here before any process group
    exists: the tool runs as a single-process child (rank variables removed) under an exclusive
    file lock, so the first rank builds and the others find the cache complete.
    """
    if not cfg.data.build_demo_inputs:
        return
    from ..config import ConfigError
    student = Path(cfg.model.hf_config or "")
    if student.parts[-2:] != ("student", "hf"):
        # The tool replaces its whole output directory: never one the recipe did not lay out
        # as the demo's.
        locate = getattr(cfg, "_locate", None)
        raise ConfigError("data.build_demo_inputs", True, "the demo's inputs are built as "
                          f"<dir>/student/hf and beside it, but model.hf_config is "
                          f"{cfg.model.hf_config!r}").located(
            locate("data.build_demo_inputs") if locate else None)
    import fcntl
    import subprocess
    root = Path(default_recipe()).resolve().parent.parent
    tool = root / "tools" / "build_demo_teachers.py"
    if not tool.is_file():
        return
    out = student.parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..rollout.server import server_environment  # the launcher's rank variables removed
    env = server_environment(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    with open(out.parent / f".{out.name}.build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        subprocess.run([sys.executable, str(tool), "--out", str(out)], env=env, check=True)


def dry_run(cfg, world: int, shape: tuple[int, int, int] | None = None) -> int:
    """Print what the run would be, then every start-up check's failure (none: exit 0).
    ``shape``: (nodes, ranks per node, GPUs per node) of the run planned for; None: this one."""
    from ..plan.build import describe_build
    from .builders import PreflightFailed, gpus_per_node, preflight
    print(cfg.dump_yaml())
    print(plan(cfg, world))
    if cfg.rollout.engine == "sglang" and cfg.rollout.mode == "colocated":
        from ..rollout.placement import colocated_placement, format_placement
        nodes, per_node, gpus = shape or (1, world, gpus_per_node())
        print("\n".join("placement " + line for line in
                        format_placement(colocated_placement(cfg.rollout, nodes, per_node, gpus))))
    failures: list[str] = []
    try:
        print(describe_build(cfg))
    except Exception as e:  # noqa: BLE001 - Megatron refuses the layout: a finding, not a crash
        failures.append(f"the student's Megatron build: {type(e).__name__}: {e}")
    try:
        inputs = preflight(cfg, world, collect=True)
        inputs.rewards.close()
    except PreflightFailed as e:
        failures += [str(f) for f in e.failures]
    if failures:
        print(f"preflight: {len(failures)} problem(s); a run would stop at the first:")
        print("\n".join(f"  - {f}" for f in failures))
        return 2
    print("preflight: every start-up check passed")
    return 0


def format_report(report: dict) -> str:
    rows = []
    for when in ("before", "after"):
        for who, accs in report.get(when, {}).items():
            rows.append(f"  {when:6s} {who:22s} " + "  ".join(f"{d} {a * 100:5.1f}%" for d, a in accs.items()))
    return "greedy accuracy on held-out prompts:\n" + "\n".join(rows) if rows else ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .preemption import StopSignals
    stop = None if args.dry_run else StopSignals()  # before the slow imports and builds
    from ..config import ConfigError, load_recipe
    from ..data import DataError
    from ..runtime import launch_env
    recipe = args.recipe or default_recipe()
    world = launch_env().world_size
    per_node = args.ranks_per_node if args.ranks_per_node is not None else args.gpus_per_node
    if (args.nodes is None) != (per_node is None) or not args.dry_run and args.nodes:
        print("mopd train: --nodes goes with --gpus-per-node or --ranks-per-node, and only "
              "with --dry-run", file=sys.stderr)
        return 2
    shape = None
    if args.nodes is not None:
        world = args.nodes * per_node
        shape = (args.nodes, per_node, args.gpus_per_node or 0)
    try:
        cfg = load_recipe(recipe, args.overrides)
        if args.dry_run:
            return dry_run(cfg, world, shape)
        ensure_demo_inputs(cfg)
        _single_process_port()
        from ..train import Trainer
        trainer = Trainer(cfg, stop=stop)
    except (ConfigError, DataError) as e:
        print(f"mopd train: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}",
              file=sys.stderr)
        return 2
    from .preemption import Preempted
    try:
        report = trainer.train()
    except Preempted as e:
        # Every rank saved (or had nothing to save) and exits with the same code: 75 asks
        # slurm/launch.sh to requeue the job.
        return e.exit_code
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
    from ..runtime import free_port
    os.environ["MASTER_PORT"] = str(free_port("127.0.0.1"))


if __name__ == "__main__":
    sys.exit(main())
