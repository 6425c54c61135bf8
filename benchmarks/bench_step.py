#!/usr/bin/env python
"""One MOPD step (teacher scoring + student update) on a length-skewed rollout batch, cut into
micro-batches three ways, in the same run, on the same batch and from the same weights.

  fixed     parallel.micro_batch_size rows per micro-batch (Batching(mbs)), each row padded to
            its micro-batch's longest; with PP to the batch's longest (fixed_length, as the
            trainer does when pp > 1)
  budget@B  parallel.max_tokens_per_microbatch = B: first-fit-decreasing groups of at most
            rows x longest row <= B tokens, padded rows
  packed@B  the same budget with parallel.pack_sequences: one row per micro-batch, whole
            sequences back to back (on CPU: a block-diagonal causal mask [T, T], the local
            layer spec has no THD path)
  (one budget and one packed path per --max-tokens value)

The batch has the length skew of Open-MOPD's rollouts: mean response lengths 11,570 tokens
(math), 9,032 (code) and 364 (instruction following), all in one batch, divided by --scale so
that a 2-core CPU runs it; each response length is drawn uniformly in [0.4, 1.6] x its mean,
prompts have 16-64 tokens, the prompts' domains come in random order, equal numbers per domain.
Two frozen teachers score it the way the trainer does (TeacherPool.score: one forward-only
schedule call per teacher): "reasoning" for math and code, "chat" for instruction following.

Per layout (TP=1 on one rank; TP=2 and PP=2 on two gloo ranks; one torch thread per rank) and
per path it reports: the student's and the teachers' micro-batches and padded-token fractions;
the teacher phase (building the rank's micro-batches + TeacherPool.score + filling the teacher
log-probs, as Trainer.teacher_scores) and the student update (mcore.step.train_step: forward,
backward, Adam) in seconds, each the median of --repeats after --warmup, the paths interleaved
repeat by repeat; the speed-up of teacher + student over the fixed path; real (unpadded)
tokens per second of teacher + student; rank 0's CPU time over the step and its kernel share
(on CPU, tensors over glibc's mmap threshold are fresh pages every step: the page faults of
large micro-batches show there); and the global MOPD loss, equal on every path of a layout
(the same work, cut differently). The script, commit, machine and load average are printed
with the table; ``--json`` writes every figure and each repeat's times.

  python benchmarks/bench_step.py                       # TP=1, TP=2, PP=2: ~7 min on 2 cores
  python benchmarks/bench_step.py --layouts tp1 --quick  # seconds: smoke test
  python benchmarks/bench_step.py --max-tokens 2048 --json /tmp/step.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # spawned ranks re-import this file and need mopd_megatron

# Open-MOPD's mean response lengths per domain (tokens), before --scale.
OPEN_MOPD_MEAN_RESPONSE = {"math": 11570, "code": 9032, "if": 364}
TEACHERS = {"reasoning": ["math", "code"], "chat": ["if"]}
LAYOUTS = {"tp1": dict(tp=1, pp=1, world=1), "tp2": dict(tp=2, pp=1, world=2),
           "pp2": dict(tp=1, pp=2, world=2)}


@dataclass(frozen=True)
class Setup:
    """Batch, model and micro-batching of one benchmark run (the CLI's flags)."""

    scale: float = 32.0            # Open-MOPD lengths / scale
    prompts: int = 24              # prompts in the batch (a multiple of 3: equal per domain)
    n: int = 2                     # samples per prompt
    prompt_len: tuple[int, int] = (16, 64)
    vocab: int = 4000
    hidden: int = 128
    ffn: int = 384
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    micro_batch_size: int = 8      # the fixed path (parallel.micro_batch_size)
    # budget and packed (parallel.max_tokens_per_microbatch), each value a path of each kind:
    # 4096 ~ the fixed path's own micro-batch (8 rows x the longest sequence, 623 tokens at the
    # default seed = 4984), so the same activation memory; 1024 ~ 1.6 x the longest sequence
    max_tokens: tuple[int, ...] = (1024, 4096)
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    @property
    def max_positions(self) -> int:
        longest = max(OPEN_MOPD_MEAN_RESPONSE.values()) / self.scale * 1.6
        return 1 << (int(longest) + self.prompt_len[1]).bit_length()


QUICK = dict(scale=128.0, prompts=6, n=2, prompt_len=(8, 24), vocab=1000, hidden=64, ffn=128,
             max_tokens=(512,), micro_batch_size=4, warmup=1, repeats=1)


# --------------------------------------------------------------------------- inputs
def skewed_batch(setup: Setup):
    """The rollout batch: ``prompts`` prompts (domains shuffled) x ``n`` responses, response
    lengths uniform in [0.4, 1.6] x the domain's scaled Open-MOPD mean."""
    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    rng = random.Random(setup.seed)
    # log mu near a random-init model's log pi_theta (about -log V), so that the IcePop band
    # keeps the tokens and the loss and its gradient are not all zeros
    uniform = -math.log(setup.vocab)
    domains = [d for _ in range(setup.prompts // 3) for d in OPEN_MOPD_MEAN_RESPONSE]
    rng.shuffle(domains)
    rows, samples = [], []
    for p, dom in enumerate(domains):
        prompt = [rng.randrange(3, setup.vocab) for _ in range(rng.randint(*setup.prompt_len))]
        rows.append(PromptRow(dom, "x", None, {}, f"bench:{p}", prompt_ids=prompt))
        mean = OPEN_MOPD_MEAN_RESPONSE[dom] / setup.scale
        for k in range(setup.n):
            r = max(1, round(mean * rng.uniform(0.4, 1.6)))
            resp = [rng.randrange(3, setup.vocab) for _ in range(r)]
            logp = [uniform + rng.uniform(-0.3, 0.3) for _ in range(r)]
            samples.append(Sample(p, k, prompt, resp, logp, "stop", "bench"))
    adv = [rng.gauss(0, 1) for _ in samples]
    return RolloutBatch(rows, samples, setup.n, rewards=[0.0] * len(samples), advantages=adv)


def batch_stats(batch) -> dict:
    by_dom: dict[str, list[int]] = {}
    for i, s in enumerate(batch.samples):
        by_dom.setdefault(batch.domain(i), []).append(len(s.token_ids))
    seq = [len(s.prompt_token_ids) + len(s.token_ids) for s in batch.samples]
    return dict(sequences=len(seq), real_tokens=sum(seq), longest=max(seq),
                mean_response={d: round(statistics.mean(v), 1) for d, v in sorted(by_dom.items())},
                sequences_per_domain={d: len(v) for d, v in sorted(by_dom.items())})


def hf_config(setup: Setup) -> dict:
    """A Qwen2-shaped model (GQA, untied output layer)."""
    return dict(architectures=["Qwen2ForCausalLM"], vocab_size=setup.vocab,
                hidden_size=setup.hidden, intermediate_size=setup.ffn,
                num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                num_key_value_heads=setup.kv_heads, max_position_embeddings=setup.max_positions,
                rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1000000.0,
                tie_word_embeddings=False)


def batchings(setup: Setup, pp: int) -> dict:
    """Path name -> Batching: "fixed", then "budget@B" and "packed@B" for each budget B."""
    from mopd_megatron.trainer.microbatches import Batching
    paths = {"fixed": Batching(setup.micro_batch_size, pipeline=pp)}
    for b in setup.max_tokens:
        paths[f"budget@{b}"] = Batching(setup.micro_batch_size, max_tokens=b, pipeline=pp)
        paths[f"packed@{b}"] = Batching(setup.micro_batch_size, max_tokens=b, packed=True,
                                        pipeline=pp)
    return paths


# --------------------------------------------------------------------------- one rank
class _RecordTeacherMicrobatches:
    """Around TeacherPool.score only (which imports forward_backward at call time), in the
    warm-up step: keeps the micro-batches of every teacher schedule call, to count them and
    their padding."""

    def __enter__(self):
        from mopd_megatron.mcore import schedule
        self.module, self.real, self.seen = schedule, schedule.forward_backward, []

        def recording(chunks, mbs, *a, **kw):
            self.seen.append(list(mbs))
            return self.real(chunks, mbs, *a, **kw)
        schedule.forward_backward = recording
        return self

    def __exit__(self, *exc):
        self.module.forward_backward = self.real


def rank_main(rank: int, world: int, port: int, tp: int, pp: int, setup: Setup, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    try:
        import torch
        torch.set_num_threads(1)
        results.put((rank, True, json.dumps(run_layout(tp, pp, setup))))
    except BaseException:  # noqa: BLE001 - the parent prints the traceback
        import traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class StepBench:
    """This rank's student (DDP + Adam), two frozen teachers and the rollout batch; ``step``
    runs one MOPD step's teacher phase and student update under a grouping, from the initial
    weights, and times them."""

    def __init__(self, tp: int, pp: int, setup: Setup):
        import torch

        from mopd_megatron.config import LossConfig, OptimizerConfig, ParallelConfig
        from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
        from mopd_megatron.models.builder import build_model_chunks, packed_attention_format
        from mopd_megatron.models.hf_config import load_hf_config
        from mopd_megatron.runtime import init_runtime
        from mopd_megatron.teachers import Teacher, TeacherPool
        from mopd_megatron.trainer.objective import make_mopd_loss_fn
        self.lay = init_runtime(tp=tp, pp=pp, seed=setup.seed)
        self.batch = skewed_batch(setup)
        self.hf = load_hf_config(hf_config(setup))
        parallel = ParallelConfig(tp=tp, pp=pp, micro_batch_size=setup.micro_batch_size,
                                  global_batch_size=len(self.batch))
        opt = OptimizerConfig(lr=1e-5, distributed_optimizer=False)
        self.ddp = wrap_ddp(build_model_chunks(self.hf, parallel, dtype="fp32"), opt)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, opt, 1000, torch.float32)
        teachers = []
        for name, domains in TEACHERS.items():  # built like TeacherPool.build's
            chunks = build_model_chunks(self.hf, parallel, dtype="fp32", frozen=True)
            for c in chunks:
                c.eval()
                c.requires_grad_(False)
            teachers.append(Teacher(name, domains, chunks, self.hf.vocab_size))
        self.pool = TeacherPool(teachers)
        loss = LossConfig(alpha=0.5)
        self.loss_fn = make_mopd_loss_fn(loss, loss.alpha, 1.0, self.lay.tp_group_or_none)
        self.packed_format = packed_attention_format()
        self.params = [p for c in self.ddp for p in c.module.parameters()]
        self.initial = [p.detach().clone() for p in self.params]

    def step(self, batching, record: bool = False) -> dict:
        """One teacher phase + student update; ``record``: also the teachers' micro-batches
        (the warm-up step)."""
        import contextlib

        import torch
        import torch.distributed as dist

        from mopd_megatron.mcore.step import train_step
        from mopd_megatron.trainer.microbatches import (fill_from_slots, padded_fraction,
                                                        rank_microbatches)
        rec = _RecordTeacherMicrobatches() if record else contextlib.nullcontext()
        lay, batch, vocab = self.lay, self.batch, self.hf.vocab_size
        with torch.no_grad():  # every path and repeat starts from the same weights
            for p, w in zip(self.params, self.initial):
                p.copy_(w)
        dist.barrier()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        # 1. the teacher phase, as Trainer.teacher_scores (fixed rows with PP: the batch's
        # longest, as the trainer passes fixed_length when pp > 1)
        steps, mine, slots = rank_microbatches(
            batch, batching, global_batch_size=len(batch), optimizer_steps=1, dp=lay.dp,
            dp_rank=lay.dp_rank, pad_id=0, fixed_length=lay.pp > 1, device="cpu")
        t_build = time.perf_counter()
        with rec:
            sig = self.pool.score(batch, mine, slots, batching, pad_id=0, vocab_size=vocab,
                                  temperature=1.0, layout=lay, packed_format=self.packed_format)
        if sig is not None:  # the last stage; a TeacherSignal (loss.signal), formerly a tensor
            fill_from_slots(steps[0], "teacher_logp", getattr(sig, "logp", sig))
        dist.barrier()
        t1 = time.perf_counter()
        # 2. the student update, as Trainer.student_update
        res = train_step(self.ddp, self.optimizer, self.scheduler, steps[0], self.loss_fn,
                         vocab_size=vocab, tp_rank=lay.tp_rank, packed_format=self.packed_format)
        dist.barrier()
        t2 = time.perf_counter()
        cpu2 = resource.getrusage(resource.RUSAGE_SELF)  # this rank's CPU time, user / kernel
        stats = torch.zeros(2, dtype=torch.float64)  # the global loss: a same-work check
        if lay.is_last_stage and lay.tp_rank == 0:
            stats[0] = sum(float(m["loss_sum"]) for m in res.metrics)
            stats[1] = sum(float(m["units"]) for m in res.metrics)
        dist.all_reduce(stats)
        pad, total = padded_fraction(steps[0]).tolist()
        out = {}
        if record:
            mbs = [mb for call in rec.seen for mb in call]
            t_pad, t_total = padded_fraction(mbs).tolist()
            out = dict(teacher_calls=len(rec.seen), teacher_mbs=len(mbs),
                       teacher_padded=t_pad / t_total, teacher_tokens=int(t_total))
        return dict(out, build_s=t_build - t0, teacher_s=t1 - t0, student_s=t2 - t1,
                    user_s=cpu2.ru_utime - cpu0.ru_utime, sys_s=cpu2.ru_stime - cpu0.ru_stime,
                    minflt=cpu2.ru_minflt - cpu0.ru_minflt,
                    loss=float(stats[0] / stats[1]), ok=res.ok, student_mbs=len(steps[0]),
                    student_padded=pad / total, student_tokens=int(total))


TIMES = ("build_s", "teacher_s", "student_s", "user_s", "sys_s", "minflt")


SHAPES = ("teacher_calls", "teacher_mbs", "teacher_padded", "teacher_tokens", "student_mbs",
          "student_padded", "student_tokens", "loss")


def run_layout(tp: int, pp: int, setup: Setup) -> dict:
    bench = StepBench(tp, pp, setup)
    paths = batchings(setup, pp)
    out = {}
    for name, batching in paths.items():  # warm-up, and what the micro-batches were
        first = bench.step(batching, record=True)
        out[name] = dict(kind=name.split("@")[0], max_tokens=batching.max_tokens, runs=[],
                         **{k: first[k] for k in SHAPES})
        for _ in range(setup.warmup - 1):
            bench.step(batching)
    for _ in range(setup.repeats):  # paths interleaved: load drifts hit all of them alike
        for name, batching in paths.items():
            out[name]["runs"].append(bench.step(batching))
    for r in out.values():
        r["ok"] = all(x["ok"] for x in r["runs"])
        r["loss_spread"] = max(abs(x["loss"] - r["loss"]) for x in r["runs"])
        r["runs"] = [{k: x[k] for k in TIMES} for x in r["runs"]]
        r.update({k: statistics.median(x[k] for x in r["runs"]) for k in TIMES})
    return dict(rank=bench.lay.rank, paths=out, packed_format=bench.packed_format)


# --------------------------------------------------------------------------- parent
def spawn(layout: dict, setup: Setup, timeout: float) -> list[dict]:
    """Run ``run_layout`` on ``layout['world']`` fresh processes; each rank's result."""
    import queue

    import torch.multiprocessing as mp

    from mopd_megatron.runtime import free_port
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, layout["world"], port, layout["tp"],
                                                 layout["pp"], setup, results))
             for r in range(layout["world"])]
    for p in procs:
        p.start()
    out, error = {}, None
    try:
        for _ in procs:
            try:
                rank, ok, val = results.get(timeout=timeout)
            except queue.Empty:
                error = f"no result within {timeout:.0f} s"
                break
            if not ok:
                error = f"rank {rank} failed:\n{val}"
                break
            out[rank] = json.loads(val)
    finally:
        for p in procs:  # only the processes started here
            p.join(timeout=5 if error is None else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if error:
        raise RuntimeError(error)
    return [out[r] for r in sorted(out)]


def machine() -> dict:
    import torch

    from mopd_megatron.runtime import MCORE_VERSION
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return dict(script="benchmarks/bench_step.py", commit=commit, cpu=cpu, cores=os.cpu_count(),
                threads_per_rank=1, torch=torch.__version__,
                megatron_core=".".join(map(str, MCORE_VERSION)))


def table(results: dict, batch: dict) -> list[str]:
    """Markdown rows. CPU s: rank 0's own CPU time over the step (user + kernel), which other
    jobs on the machine disturb less than the wall time; kernel: its system share."""
    lines = ["| layout | path | micro-batches student / teachers | padded % student / teachers "
             "| teacher s | student s | teacher + student s | speed-up vs fixed | "
             "real tokens/s | rank-0 CPU s (kernel) | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lname, paths in results.items():
        base = paths["fixed"]["teacher_s"] + paths["fixed"]["student_s"]
        for name, r in paths.items():
            both = r["teacher_s"] + r["student_s"]
            lines.append(
                f"| {lname} | {name} | {r['student_mbs']} / {r['teacher_mbs']} | "
                f"{100 * r['student_padded']:.1f} / {100 * r['teacher_padded']:.1f} | "
                f"{r['teacher_s']:.2f} | {r['student_s']:.2f} | {both:.2f} | "
                f"{base / both:.2f}x | {batch['real_tokens'] / both:,.0f} | "
                f"{r['user_s'] + r['sys_s']:.2f} ({r['sys_s']:.2f}) | {r['loss']:.7g} |")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    d = Setup()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--layouts", default="tp1,tp2,pp2",
                    help=f"comma-separated of {', '.join(LAYOUTS)} (default all)")
    ap.add_argument("--quick", action="store_true",
                    help="a small batch and model, one warm-up, one repeat: smoke test")
    ap.add_argument("--scale", type=float,
                    help=f"Open-MOPD lengths divided by (default {d.scale:g})")
    ap.add_argument("--prompts", type=int, help=f"prompts, a multiple of 3 (default {d.prompts})")
    ap.add_argument("--n", type=int, help=f"samples per prompt (default {d.n})")
    ap.add_argument("--micro-batch-size", type=int,
                    help=f"the fixed path's rows per micro-batch (default {d.micro_batch_size})")
    ap.add_argument("--max-tokens", type=int, nargs="+",
                    help="token budgets: a budget and a packed path for each (default "
                         f"{' '.join(map(str, d.max_tokens))})")
    ap.add_argument("--hidden", type=int, help=f"hidden size (default {d.hidden}; ffn 3x)")
    ap.add_argument("--layers", type=int, help=f"layers (default {d.layers})")
    ap.add_argument("--vocab", type=int, help=f"vocabulary (default {d.vocab})")
    ap.add_argument("--warmup", type=int, help=f"untimed steps per path, >= 1: the first also "
                    f"records the teachers' micro-batches (default {d.warmup})")
    ap.add_argument("--repeats", type=int, help=f"timed steps per path (default {d.repeats})")
    ap.add_argument("--seed", type=int, help="batch and weights seed (default 0)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    ap.add_argument("--json", help="write every figure (and each repeat's times) here")
    return ap.parse_args(argv)


def setup_from(args) -> Setup:
    setup = replace(Setup(), **QUICK) if args.quick else Setup()
    given = {k: getattr(args, k) for k in ("scale", "prompts", "n", "micro_batch_size",
                                           "max_tokens", "hidden", "layers", "vocab", "warmup",
                                           "repeats", "seed") if getattr(args, k) is not None}
    if "max_tokens" in given:
        given["max_tokens"] = tuple(given["max_tokens"])
    if "hidden" in given:
        given["ffn"] = 3 * given["hidden"]
    setup = replace(setup, **given)
    if setup.prompts % 3 or setup.prompts < 3:
        raise SystemExit("bench_step: --prompts must be a positive multiple of 3")
    if (setup.prompts * setup.n) % setup.micro_batch_size:
        raise SystemExit(f"bench_step: {setup.prompts * setup.n} sequences do not split into "
                         f"micro-batches of {setup.micro_batch_size}")
    if setup.warmup < 1 or setup.repeats < 1:
        raise SystemExit("bench_step: --warmup and --repeats must be >= 1")
    return setup


def main(argv=None) -> int:
    args = parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        print(f"bench_step: unknown --layouts {bad} ({', '.join(LAYOUTS)})", file=sys.stderr)
        return 2
    setup = setup_from(args)
    batch = batch_stats(skewed_batch(setup))
    info = machine()
    results, raw, load = {}, {}, {}
    for name in layouts:
        print(f"[bench_step] {name}: {LAYOUTS[name]['world']} rank(s)...", file=sys.stderr,
              flush=True)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        ranks = spawn(LAYOUTS[name], setup, args.timeout)
        raw[name] = ranks
        results[name] = ranks[0]["paths"]
        load[name] = (load0, os.getloadavg()[0])  # other jobs on the machine skew the times
        print(f"[bench_step] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    header = (f"# {info['script']}, commit {info['commit']}; CPU: {info['cpu']}, "
              f"{info['cores']} cores, 1 torch thread per rank; torch {info['torch']}, "
              f"megatron-core {info['megatron_core']}; packed attention: "
              f"{raw[layouts[0]][0]['packed_format']}")
    desc = (f"# batch: {batch['sequences']} sequences ({setup.prompts} prompts x {setup.n}), "
            f"{batch['real_tokens']} real tokens, longest {batch['longest']}; mean response "
            f"{batch['mean_response']} (Open-MOPD / {setup.scale:g}); model hidden "
            f"{setup.hidden}, {setup.layers} layers, vocab {setup.vocab}, fp32; fixed: "
            f"micro_batch_size {setup.micro_batch_size}; budget/packed@B: max_tokens B; "
            f"median of {setup.repeats} after {setup.warmup} warm-up")
    loads = "; ".join(f"{k} {a:.1f} -> {b:.1f}" for k, (a, b) in load.items())
    print(header)
    print(desc)
    print(f"# 1-minute load average before -> after each layout: {loads}")
    print("\n".join(table(results, batch)))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(**info, setup=asdict(setup), batch=batch,
                                                   layouts=results, load_average=load, ranks=raw),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
