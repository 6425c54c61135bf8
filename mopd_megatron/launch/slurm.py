"""Resolve a recipe onto a Slurm allocation: which nodes train, which serve SGLang, how many
ranks, the TP/PP/DP layout and the memory plan. ``slurm/launch.sh`` calls it twice at most:
``--dry-run`` prints the plan for people; ``--emit-shell`` prints ``KEY=value`` lines the script
evaluates (values shell-quoted). Nothing here starts a process.

    python -m mopd_megatron.launch.slurm --recipe recipes/mopd_70b.yaml --nodes 8 \\
        --gpus-per-node 8 --dry-run
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Sequence

from ..config import ConfigError, MOPDConfig, load_recipe
from ..plan.advice import suggest
from ..plan.arch import PlanError
from ..plan.build import describe_build
from ..plan.cli import engine_nodes, format_plan, inputs_from_config
from ..plan.memory import Plan, plan_memory
from ..trainer.eval_plan import eval_plan


@dataclass
class Placement:
    """Where everything runs. ``hosts`` are real names inside an allocation, placeholders
    (node0, node1, ...) in a dry run outside one."""

    hosts: list[str]
    gpus_per_node: int
    ranks_per_node: int
    train_hosts: list[str]
    engine_hosts: list[str]
    tp: int
    pp: int
    dp: int
    engines: str                      # one line describing engine placement
    engine_urls: list[str] = field(default_factory=list)
    engines_per_node: int = 0

    @property
    def world_size(self) -> int:
        return len(self.train_hosts) * self.ranks_per_node


def place(cfg: MOPDConfig, hosts: list[str], gpus_per_node: int, tasks_per_node: int) -> Placement:
    """Split the allocation between training and (dedicated) engines and check the layout."""
    n = len(hosts)
    gpu = gpus_per_node > 0
    ranks_per_node = gpus_per_node if gpu else tasks_per_node
    if ranks_per_node < 1:
        raise PlanError("no ranks per node: give GPUs (MOPD_GPUS_PER_NODE) or tasks "
                        "(--ntasks-per-node / MOPD_TASKS_PER_NODE)")
    ro = cfg.rollout
    n_eng = engine_nodes(cfg, gpus_per_node) if gpu else 0
    if ro.mode == "dedicated" and not gpu:
        raise PlanError("rollout.mode=dedicated needs GPU nodes for its engines "
                        "(MOPD_GPUS_PER_NODE=0 here)")
    if n - n_eng < 1:
        raise PlanError(f"rollout.mode=dedicated needs {n_eng} engine node(s) plus at least one "
                        f"training node; the job has {n} node(s)")
    train, eng = hosts[: n - n_eng], hosts[n - n_eng:]
    world = len(train) * ranks_per_node
    par = cfg.parallel
    if world % (par.tp * par.pp):
        raise PlanError(f"parallel.tp x parallel.pp = {par.tp} x {par.pp} must divide the "
                        f"{world} training ranks ({len(train)} nodes x {ranks_per_node})")
    dp = world // (par.tp * par.pp)
    urls: list[str] = []
    per_node = 0
    engine_kind = getattr(ro, "engine", "sglang")
    if engine_kind != "sglang":
        desc = f"rollout.engine={engine_kind}: no SGLang servers (the trainer samples itself)"
    elif ro.mode == "external":
        desc = f"external servers: {', '.join(ro.external_urls)}"
    elif ro.mode == "colocated":
        from ..rollout.placement import colocated_placement, engines_per_node, format_placement
        per_node = engines_per_node(ro, gpus_per_node)
        where = colocated_placement(ro, len(train), ranks_per_node, gpus_per_node)
        desc = (f"colocated: {per_node} SGLang engine(s) per training node (server_tp_size="
                f"{ro.server_tp_size}), {per_node * len(train)} in all, started by each node's "
                f"local rank 0; mem_fraction_static={ro.mem_fraction_static}"
                + "".join(f"\n           {line} [{h}]"
                          for h, line in zip(train, format_placement(where))))
    else:
        per_node = gpus_per_node // ro.server_tp_size
        for h in eng:
            for i in range(per_node):
                if len(urls) < ro.num_engines:
                    urls.append(f"http://{h}:{ro.base_port + i}")
        desc = (f"dedicated: {len(urls)} SGLang engine(s) (server_tp_size={ro.server_tp_size}) on "
                f"{len(eng)} node(s) [{', '.join(eng)}], started by this script; the trainer gets "
                "their URLs and loads weights over a weight-update group (NCCL)")
    return Placement(hosts, gpus_per_node, ranks_per_node, train, eng, par.tp, par.pp, dp, desc,
                     urls, per_node)


def engine_overrides(p: Placement) -> list[str]:
    """Overrides that hand launcher-started dedicated engines to the trainer (as dedicated
    engines: it connects their weight-update group)."""
    if not p.engine_urls:
        return []
    return ["rollout.external_urls=[" + ",".join(p.engine_urls) + "]"]


# How many times a dedicated-engine task restarts its server before the task fails.
ENGINE_RESTARTS = 3


def engine_command(cfg: MOPDConfig, python: str, device: str = "cuda",
                   host: str = "0.0.0.0") -> str:
    """Per-task command of the dedicated-engine step: task SLURM_LOCALID serves GPUs
    [id*tp, (id+1)*tp) on port base_port + id. The server command and environment are the
    trainer's own (rollout/server.py::ServerSpec), so launched and launcher-started engines
    run alike; ``device`` cpu is the emulation the tests run."""
    from ..rollout.server import DEVICE_PROFILES, ServerSpec
    ro, tp = cfg.rollout, cfg.rollout.server_tp_size
    port = "$((" + str(ro.base_port) + "+SLURM_LOCALID))"
    spec = ServerSpec(model_path=cfg.model.checkpoint or cfg.model.hf_config, port=0, host=host,
                      tp_size=tp, mem_fraction_static=ro.mem_fraction_static, device=device,
                      max_total_tokens=ro.max_total_tokens, cpu_threads=ro.server_cpu_threads,
                      extra_args=tuple(ro.server_args))
    cmd = spec.command()
    cmd[0] = python
    cmd[cmd.index("--port") + 1] = port
    env = dict(DEVICE_PROFILES[device].env)
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = f"$(seq -s, $((SLURM_LOCALID*{tp})) $((SLURM_LOCALID*{tp}+{tp - 1})))"
    elif ro.server_cpu_threads is not None:
        env["OMP_NUM_THREADS"] = str(ro.server_cpu_threads)
    quoted = [c if c == port else shlex.quote(c) for c in cmd]
    server = " ".join([*(f"{k}={v}" for k, v in env.items()), *quoted])
    # The task restarts its own server when it dies (the trainer's driver waits for it to
    # answer, then re-creates the weight-update group and pushes the weights again). Bounded:
    # a server that cannot start must end the step, not spin for the whole allocation.
    return (f"for attempt in $(seq 0 {ENGINE_RESTARTS}); do {server}; "
            f'echo "[engine] server on port {port} exited with $?'
            f' (attempt $attempt of {ENGINE_RESTARTS})" >&2; sleep 2; done; exit 1')


def memory_plan(cfg: MOPDConfig, args: argparse.Namespace) -> Plan | None:
    if args.gpus_per_node <= 0:
        return None
    x = inputs_from_config(cfg, len(args.hosts_list), args.gpus_per_node, args.gpu_mem_gb,
                           args.reserve_gb)
    return plan_memory(x)


def describe(cfg: MOPDConfig, p: Placement, plan: Plan | None, args: argparse.Namespace) -> str:
    lines = [
        f"recipe     {args.recipe}" + (f"  (--set {' --set '.join(args.overrides)})"
                                       if args.overrides else ""),
        f"nodes      {len(p.hosts)}: {len(p.train_hosts)} training"
        + (f" + {len(p.engine_hosts)} engine" if p.engine_hosts else "")
        + f"  [{', '.join(p.hosts)}]",
        f"gpus       {p.gpus_per_node} per node" + ("  (CPU run)" if p.gpus_per_node == 0 else ""),
        f"ranks      {p.world_size} = {len(p.train_hosts)} nodes x {p.ranks_per_node} per node",
        f"layout     TP={p.tp} PP={p.pp} DP={p.dp}",
        f"master     {p.train_hosts[0]}",
        f"engines    {p.engines}",
        f"eval       {eval_plan(cfg).describe()}",  # the plan Trainer.evaluate follows
        describe_build(cfg),
    ]
    if plan is None:
        lines.append("memory     skipped: no GPUs (MOPD_GPUS_PER_NODE=0)")
    else:
        lines.append(format_plan(plan, args.recipe))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mopd_megatron.launch.slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU run")
    ap.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node of a CPU run")
    ap.add_argument("--hosts", default="", help="comma-separated allocation hosts (empty: "
                                                "placeholders node0..)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--reserve-gb", type=float, default=4.0)
    ap.add_argument("--python", default="python", help="interpreter for engine commands")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the resolved plan")
    mode.add_argument("--emit-shell", action="store_true", help="print KEY=value for the script")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h] or [f"node{i}" for i in range(args.nodes)]
    if len(hosts) != args.nodes:
        print(f"launch: {len(hosts)} hosts given for {args.nodes} nodes", file=sys.stderr)
        return 2
    args.hosts_list = hosts
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        p = place(cfg, hosts, args.gpus_per_node, args.tasks_per_node)
        cfg.validate(world_size=p.world_size, check_paths=False, check_imports=False)
        plan = memory_plan(cfg, args)
    except (ConfigError, PlanError, FileNotFoundError, ValueError) as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(cfg, p, plan, args))
    if plan is not None and not plan.fits:
        out = sys.stdout if args.dry_run else sys.stderr
        if not args.dry_run:
            print(format_plan(plan, args.recipe), file=out)
        for line in suggest(plan.inputs, plan):
            print(line, file=out)
        print("launch: refusing to start a run that does not fit", file=sys.stderr)
        return 1
    if args.emit_shell:
        env = {
            "MOPD_TRAIN_HOSTS": ",".join(p.train_hosts),
            "MOPD_TRAIN_NNODES": str(len(p.train_hosts)),
            "MOPD_RANKS_PER_NODE": str(p.ranks_per_node),
            "MOPD_WORLD_SIZE": str(p.world_size),
            "MOPD_ENGINE_HOSTS": ",".join(p.engine_hosts),
            "MOPD_ENGINE_NNODES": str(len(p.engine_hosts)),
            "MOPD_ENGINES_PER_NODE": str(p.engines_per_node if p.engine_urls else 0),
            "MOPD_ENGINE_CMD": engine_command(cfg, args.python) if p.engine_urls else "",
            "MOPD_ENGINE_OVERRIDES": " ".join(engine_overrides(p)),
            "MOPD_LAYOUT": f"TP={p.tp} PP={p.pp} DP={p.dp}",
        }
        for k, v in env.items():
            print(f"{k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
