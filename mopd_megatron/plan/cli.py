"""``mopd plan``: per-GPU memory of a recipe on a cluster layout; refuses what does not fit.

    mopd plan --recipe recipes/mopd_70b.yaml --nodes 8 --gpus-per-node 8 [--gpu-mem-gb 80]

Exit status: 0 fits, 1 does not fit (the biggest terms and changes that fit are printed),
2 the recipe or layout is invalid.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..config import ConfigError, MOPDConfig, load_recipe
from .advice import suggest
from .arch import PlanError, ceil_div, resolve_arch
from .memory import GIB, Plan, PlanInputs, TeacherSpec, plan_memory, sglang_split


def engine_nodes(cfg: MOPDConfig, gpus_per_node: int) -> int:
    """Nodes given to dedicated SGLang engines (0 unless rollout.mode=dedicated)."""
    if cfg.rollout.mode != "dedicated":
        return 0
    return ceil_div(cfg.rollout.num_engines * cfg.rollout.server_tp_size, gpus_per_node)


def inputs_from_config(cfg: MOPDConfig, nodes: int, gpus_per_node: int, gpu_mem_gib: float = 80.0,
                       reserve_gib: float = 4.0, logits_path: str = "fused",
                       teacher_params: str = "bf16") -> PlanInputs:
    """The planner's view of a recipe on ``nodes`` x ``gpus_per_node`` GPUs."""
    train_nodes = nodes - engine_nodes(cfg, gpus_per_node)
    if train_nodes < 1:
        raise PlanError(f"rollout.mode=dedicated needs {engine_nodes(cfg, gpus_per_node)} engine "
                        f"node(s) (rollout.num_engines x server_tp_size GPUs) plus at least one "
                        f"training node; the job has {nodes}")
    student = resolve_arch(cfg.model.hf_config, "student")
    teachers = tuple(TeacherSpec(t.name, resolve_arch(t.hf_config, f"teacher {t.name}"),
                                 t.offload, teacher_params) for t in cfg.teachers)
    par = cfg.parallel
    return PlanInputs(
        student=student, teachers=teachers, train_gpus=train_nodes * gpus_per_node,
        tp=par.tp, pp=par.pp, vpp=par.vpp, micro_batch_size=par.micro_batch_size,
        global_batch_size=par.global_batch_size,
        max_tokens_per_microbatch=par.max_tokens_per_microbatch,
        seq_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
        sequence_parallel=par.sequence_parallel, recompute=par.recompute, dtype=cfg.model.dtype,
        fp8=cfg.model.fp8.enabled, distributed_optimizer=cfg.optimizer.distributed_optimizer,
        logits_path=logits_path, rollout_mode=cfg.rollout.mode,
        sglang_mem_fraction=cfg.rollout.mem_fraction_static, sglang_tp=cfg.rollout.server_tp_size,
        gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib, reserve_gib=reserve_gib)


def _g(b: float) -> str:
    return f"{b / GIB:8.2f}"


def format_plan(plan: Plan, title: str = "") -> str:
    x = plan.inputs
    s, c = x.student, x.student.hf
    out = [f"memory plan{(': ' + title) if title else ''}",
           f"  student   {s.source}: {s.total_params() / 1e9:.2f}B params, L={c.num_layers} "
           f"h={c.hidden_size} f={c.ffn_hidden_size} a={c.num_attention_heads} "
           f"g={c.num_query_groups} V={c.vocab_size}, {x.dtype}{' + FP8' if x.fp8 else ''}"]
    for t in x.teachers:
        out.append(f"  teacher   {t.name}: {t.arch.source}, {t.arch.total_params() / 1e9:.2f}B params, "
                   f"{t.params}, {'offloaded' if t.offload else 'resident'}")
    out.append(f"  layout    {x.train_gpus} training GPUs: TP={x.tp} PP={x.pp} DP={x.dp}"
               f"{f' VPP={x.vpp}' if x.vpp else ''}{' SP' if x.sequence_parallel else ''}; "
               + (f"micro-batches of <= {x.tokens} tokens (token budget), up to "
                  if x.max_tokens_per_microbatch is not None else
                  f"micro-batch {x.micro_batch_size} x {x.seq_len} tokens, ")
               + f"{x.micro_batches} micro-batches per step; recompute={x.recompute}")
    out.append(f"  card      {x.gpu_mem_gib:.1f} GiB; heaviest pipeline stage {plan.stage + 1} of "
               f"{x.pp}; peak in phase '{plan.peak_phase}' (phases run one at a time; colocated "
               "engines release their memory while the student trains)")
    out.append("")
    out.append(f"  {'term':38s} {'phase':8s} {'GiB':>8s}  note")
    for t in plan.terms:
        out.append(f"  {t.name:38s} {t.phase:8s} {_g(t.bytes)}  {t.note}")
    out.append("  " + "-" * 72)
    out.append(f"  {'persistent (phase all)':38s} {'':8s} {_g(plan.persistent)}")
    for ph in ("train", "score", "rollout"):
        if any(t.phase == ph for t in plan.terms):
            mark = "  <- peak" if ph == plan.peak_phase else ""
            out.append(f"  {'+ phase ' + ph:38s} {'':8s} {_g(plan.phase_total(ph))}{mark}")
    out.append(f"  {'peak':38s} {'':8s} {_g(plan.peak)}")
    out.append(f"  {'card':38s} {'':8s} {_g(plan.capacity)}")
    pct = 100 * plan.headroom / plan.capacity
    out.append(f"  {'headroom':38s} {'':8s} {_g(plan.headroom)}  ({pct:.1f}% of the card)")
    for n in plan.notes:
        out.append(f"  note: {n}")
    for e in plan.errors:
        out.append(f"  error: {e}")
    out.append(f"FITS: peak {plan.peak / GIB:.1f} of {x.gpu_mem_gib:.1f} GiB" if plan.fits else
               f"DOES NOT FIT: peak {plan.peak / GIB:.1f} GiB > {x.gpu_mem_gib:.1f} GiB card"
               if plan.headroom < 0 else "DOES NOT FIT: see the error above")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mopd plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C",
                   help="override a recipe field (repeatable)")
    p.add_argument("--nodes", type=int, default=int(os.environ.get("SLURM_JOB_NUM_NODES", 1)),
                   help="nodes in the job, dedicated engine nodes included (default: "
                        "$SLURM_JOB_NUM_NODES or 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0,
                   help="memory of one GPU in GiB (default 80; an 80 GB H100 shows PyTorch ~79 GiB)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="assumed CUDA context + NCCL buffers + allocator fragmentation, GiB (default 4)")
    p.add_argument("--logits", choices=("fused", "naive"), default="fused",
                   help="log-prob path: fused vocab-parallel op (default) or naive fp32 log_softmax")
    p.add_argument("--teacher-params", choices=("bf16", "fp8"), default="bf16",
                   help="teacher parameter storage (fp8 needs Transformer Engine on Hopper)")
    return p


def plan_recipe(args: argparse.Namespace) -> tuple[PlanInputs, Plan]:
    """Load, validate and plan (raises ConfigError / PlanError)."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise PlanError(f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be "
                        ">= 1 (the planner sizes GPU memory)")
    cfg = load_recipe(args.recipe, args.overrides)
    train_gpus = (args.nodes - engine_nodes(cfg, args.gpus_per_node)) * args.gpus_per_node
    cfg.validate(world_size=max(train_gpus, 1), check_paths=False, check_imports=False)
    x = inputs_from_config(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.reserve_gb,
                           args.logits, args.teacher_params)
    return x, plan_memory(x)


def plan_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        x, plan = plan_recipe(args)
    except (ConfigError, PlanError, FileNotFoundError, ValueError) as e:
        print(f"mopd plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.recipe))
    if not plan.fits:
        for line in suggest(x, plan):
            print(line)
        return 1
    return 0


__all__ = ["plan_main", "plan_recipe", "format_plan", "inputs_from_config", "engine_nodes",
           "build_parser", "sglang_split"]

if __name__ == "__main__":
    sys.exit(plan_main())
