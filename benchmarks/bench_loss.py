"""Benchmark the fused MOPD loss against the naive and the Megatron cross-entropy paths, and
(``--op reverse_kl``) the fused per-position reverse KL against a naive two-log-softmax path.

--op mopd (default): three ways to get log pi(y_t) from logits [T, V_local] and back-propagate
the MOPD loss:
  naive     fp32 log_softmax + gather (autograd keeps the fp32 [T, V] log-softmax)
  megatron  megatron.core.tensor_parallel.vocab_parallel_cross_entropy (logp = -CE), TP=1
  ours      mopd_megatron.ops.mopd_loss (Triton on GPU, chunked reference on CPU),
            inplace_grad=True
All three feed the same MOPD coefficients (mopd_megatron.ops.mopd_loss helpers), so they do the
same math and differ only in how logp and its gradient are computed.

--op reverse_kl: loss = sum_t c_t KL_t(pi_theta || pi_teacher) from student and teacher logits
[T, V_local] (c_t = mask_t / N), back-propagated to the student logits:
  naive      two fp32 log_softmax, sum_v p (log p - log q) under autograd (teacher no grad)
  ours       mopd_megatron.ops.reverse_kl (full vocabulary), inplace_grad=True
  ours_topk  mopd_megatron.ops.topk_reverse_kl with the teacher's top-64 (ids and log-probs
             prepared untimed, as the teacher's scoring pass would), inplace_grad=True; it is
             another quantity, so its loss is not compared with the naive one
Minimal traffic: forward reads student + teacher, backward reads both and writes the gradient
(5 x T x V x bytes); top-k reads only the student (3 x T x V x bytes).

Each (T, V_local, path) runs in a fresh child process so peak memory is honest: on GPU
torch.cuda.max_memory_allocated over the inputs; on CPU the growth of the process's RSS
high-water mark (ru_maxrss) over the inputs (tracemalloc does not see torch's allocations).
Time: CUDA events on GPU, perf_counter on CPU; median of --repeats after --warmup.
Bandwidth: the path's minimal traffic (read logits in the forward, read logits + write the
gradient in the backward: 3 x T x V x bytes) per second, as a ratio to a same-size
device-to-device copy measured in the same child.

  python benchmarks/bench_loss.py                 # CPU: T=1024, V in {32000, 19008, 152064}
  python benchmarks/bench_loss.py --tokens 4096 16384   # the issue's grid (default on GPU)
  python benchmarks/bench_loss.py --quick         # seconds: smoke test
  python benchmarks/bench_loss.py --op reverse_kl --quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

PATHS = {"mopd": ("naive", "megatron", "ours"), "reverse_kl": ("naive", "ours", "ours_topk")}
TRAFFIC = {"ours_topk": 3}  # x T x V x bytes; --op reverse_kl: 5 otherwise, --op mopd: 3
KL_TOPK = 64
GPU_TOKENS, CPU_TOKENS, QUICK_TOKENS = (4096, 16384), (1024,), (256,)
VOCABS, QUICK_VOCABS = (32000, 152064 // 8, 152064), (32000, 152064 // 8)
EPS_LOW, EPS_HIGH, ALPHA = 0.5, 2.0, 0.1


# --------------------------------------------------------------------------- child process
def _inputs(T, V, dtype, device):
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    # Filled in place: no [T, V] temporaries raise the RSS high-water before the baseline.
    logits = torch.empty(T, V, dtype=dtype, device=device).normal_(0, 2, generator=g)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    per_tok = dict(
        rollout_logprobs=-torch.rand(T, device=device, generator=g) * 10,
        teacher_logprobs=-torch.rand(T, device=device, generator=g) * 10,
        orm_advantages=torch.randn(T, device=device, generator=g),
        loss_mask=(torch.rand(T, device=device, generator=g) > 0.2).long(),
        seq_ids=torch.arange(T, device=device) // 256)
    return logits, targets, per_tok


def _kl_inputs(T, V, dtype, device, with_topk):
    """Student and teacher logits [T, V], the loss coefficients c [T] and (``with_topk``) the
    teacher's top-k ids and log-probs. The top-k is taken in row chunks before the student
    logits exist, so its fp32 temporaries stay below the RSS high-water mark of the inputs and
    cannot hide the step's own allocations; each tensor has its own seed, so every path sees
    the same values."""
    import torch
    gen = lambda seed: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    teacher = torch.empty(T, V, dtype=dtype, device=device).normal_(0, 2, generator=gen(1))
    topk = None
    if with_topk:
        ids, lq = [], []
        for i in range(0, T, 8):
            v, k = torch.log_softmax(teacher[i:i + 8].float(), -1).topk(KL_TOPK, -1)
            ids.append(k)
            lq.append(v)
        topk = (torch.cat(ids), torch.cat(lq))
    student = torch.empty(T, V, dtype=dtype, device=device).normal_(0, 2, generator=gen(0))
    mask = (torch.rand(T, device=device, generator=gen(2)) > 0.2).float()
    coef = mask / mask.sum().clamp(min=1)
    return student, teacher, coef, topk


def _make_kl_step(path, teacher, coef, topk):
    import torch
    if path == "naive":
        def step(x):
            lp = torch.log_softmax(x.float(), dim=-1)
            with torch.no_grad():
                lq = torch.log_softmax(teacher.float(), dim=-1)
            loss = (coef * (lp.exp() * (lp - lq)).sum(-1)).sum()
            return loss, torch.autograd.grad(loss, x)[0]
    elif path == "ours":
        from mopd_megatron.ops import reverse_kl

        def step(x):
            loss = (coef * reverse_kl(x, teacher, inplace_grad=True)).sum()
            return loss, torch.autograd.grad(loss, x)[0]
    elif path == "ours_topk":
        from mopd_megatron.ops import topk_reverse_kl

        def step(x):
            loss = (coef * topk_reverse_kl(x, *topk, inplace_grad=True)).sum()
            return loss, torch.autograd.grad(loss, x)[0]
    else:
        raise ValueError(f"path {path!r} is not one of --op reverse_kl's {PATHS['reverse_kl']}")
    return step


def _loss_from_logp(logp, per_tok):
    """The MOPD loss given logp [T], with ops' own (detached) coefficient helpers."""
    import torch
    from mopd_megatron.ops.mopd_loss import importance_weights, token_normaliser
    mask = per_tok["loss_mask"].bool()
    with torch.no_grad():
        w, _ = importance_weights(logp, per_tok["rollout_logprobs"], mask, "icepop",
                                  EPS_LOW, EPS_HIGH)
        adv = per_tok["teacher_logprobs"] - logp + ALPHA * per_tok["orm_advantages"]
        norm, _, _ = token_normaliser(mask, per_tok["seq_ids"], "seq_mean")
        coef = torch.where(mask, w * adv * norm, 0.0)
    return -(coef * logp).sum()


def _init_megatron():
    """TP=1 parallel state; the project's runtime applies its CPU compatibility layer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    try:
        from mopd_megatron.runtime import init_runtime
    except ImportError:
        init_runtime = None
    if init_runtime is not None:
        init_runtime(tp=1)
        return
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    dist.init_process_group("gloo" if not __import__("torch").cuda.is_available() else "nccl")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


def _make_step(path, targets, per_tok):
    import torch
    if path == "naive":
        def step(x):
            logp = torch.log_softmax(x.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
            loss = _loss_from_logp(logp, per_tok)
            return loss, torch.autograd.grad(loss, x)[0]
    elif path == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def step(x):
            # Megatron works on [s, b, V] and overwrites (fp32) logits in place.
            logp = -vocab_parallel_cross_entropy(x[:, None, :], targets[:, None]).view(-1)
            loss = _loss_from_logp(logp, per_tok)
            return loss, torch.autograd.grad(loss, x)[0]
    else:
        from mopd_megatron.ops import mopd_loss

        def step(x):
            loss, _ = mopd_loss(x, targets, **per_tok, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                alpha=ALPHA, inplace_grad=True)
            return loss, torch.autograd.grad(loss, x)[0]
    return step


def _rss_hwm_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timer(device):
    import torch
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def child(path, T, V, dtype_name, device, warmup, repeats, op="mopd"):
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dtype = getattr(torch, dtype_name)
    if op == "reverse_kl":
        logits, teacher, coef, topk = _kl_inputs(T, V, dtype, device, path == "ours_topk")
        step = _make_kl_step(path, teacher, coef, topk)
        traffic = TRAFFIC.get(path, 5)
    else:
        if path == "megatron":
            _init_megatron()
        logits, targets, per_tok = _inputs(T, V, dtype, device)
        step = _make_step(path, targets, per_tok)
        traffic = 3
    x = logits.requires_grad_(True)
    # 1. peak memory of one forward + backward above the inputs
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_hwm_bytes()
    loss, grad = step(x)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_hwm_bytes() - base
    loss_value = float(loss)
    del loss, grad
    # 2. time: fresh logits before each call (megatron and ours overwrite them), untimed
    timer = _timer(device)
    times = []
    for i in range(warmup + repeats):
        with torch.no_grad():
            x.normal_(0, 2, generator=torch.Generator(device=device).manual_seed(0))
        dt = timer(lambda: step(x))
        if i >= warmup:
            times.append(dt)
    # 3. same-size device-to-device copy in this process
    dst = torch.empty_like(logits)
    copy_times = [timer(lambda: dst.copy_(x.detach())) for _ in range(max(repeats, 3))]
    return dict(path=path, T=T, V=V, time_s=statistics.median(times), peak_bytes=peak,
                loss=loss_value, copy_s=statistics.median(copy_times),
                elt=logits.element_size(), traffic=traffic)


def _run_child(args, path, T, V, device):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", path, str(T), str(V),
           "--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--device", device, "--op", args.op]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(path=path, T=T, V=V, error=err[:120])


# --------------------------------------------------------------------------- parent process
def _machine(device):
    import torch
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"thread(s), no GPU (torch {torch.__version__}; "
            f"time and memory are the PyTorch reference path)")


def _fmt_row(r, base):
    if "error" in r:
        return f"| {r['T']} | {r['V']} | {r['path']} | n/a ({r['error']}) | | | | | |"
    # bytes: fwd read + bwd read + bwd write of every [T, V] operand
    ideal = r.get("traffic", 3) * r["T"] * r["V"] * r["elt"]
    copy_bw = 2 * r["T"] * r["V"] * r["elt"] / r["copy_s"]
    bw = ideal / r["time_s"]
    rel = lambda k: f"{r[k] / base[k]:.2f}x" if base and "error" not in base and base[k] else "-"
    dloss = (f"{abs(r['loss'] - base['loss']) / max(abs(base['loss']), 1e-30):.1e}"
             if base and "error" not in base and r["path"] != "ours_topk" else "-")
    return (f"| {r['T']} | {r['V']} | {r['path']} | {r['time_s'] * 1e3:.1f} | {rel('time_s')} "
            f"| {r['peak_bytes'] / 2**20:.0f} | {rel('peak_bytes')} | {bw / 1e9:.2f} "
            f"| {bw / copy_bw:.2f} | {dloss} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--tokens", type=int, nargs="+", help="T values (default: 4096 16384 on "
                    "GPU, 1024 on CPU, 256 with --quick)")
    ap.add_argument("--vocab", type=int, nargs="+", help="V_local values (default: 32000 "
                    "19008 152064; 32000 19008 with --quick)")
    ap.add_argument("--op", default="mopd", choices=sorted(PATHS),
                    help="mopd: the MOPD loss (default); reverse_kl: the per-position KL")
    ap.add_argument("--paths", nargs="+", choices=sorted(set(sum(PATHS.values(), ()))),
                    help="default: every path of --op")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: smoke test")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        path, T, V, device = args._child[0], int(args._child[1]), int(args._child[2]), args.device
        print("RESULT " + json.dumps(child(path, T, V, args.dtype, device, args.warmup,
                                            args.repeats, args.op)), flush=True)
        return 0

    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                         else "cpu")
    if args.quick:
        args.warmup, args.repeats = 0, 1
    tokens = args.tokens or (QUICK_TOKENS if args.quick else
                             GPU_TOKENS if device == "cuda" else CPU_TOKENS)
    vocabs = args.vocab or (QUICK_VOCABS if args.quick else VOCABS)
    paths = args.paths or list(PATHS[args.op])
    wrong = [p for p in paths if p not in PATHS[args.op]]
    if wrong:
        ap.error(f"--paths {' '.join(wrong)}: not a path of --op {args.op} {PATHS[args.op]}")
    traffic = ("3*T*V*bytes" if args.op == "mopd" else
               "5*T*V*bytes (top-k: 3*T*V*bytes)")
    op = "" if args.op == "mopd" else f"{args.op}; "
    print(f"# {op}{_machine(device)}; logits {args.dtype}; median of {args.repeats} "
          f"after {args.warmup} warm-up; ratios vs naive; bw = {traffic} / time vs a "
          f"same-size copy")
    print("| T | V_local | path | time ms | time vs naive | peak MiB over inputs | "
          "mem vs naive | GB/s | bw / copy | rel. loss diff vs naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T in tokens:
        for V in vocabs:
            base = None
            for path in paths:
                r = _run_child(args, path, T, V, device)
                base = r if path == "naive" else base
                print(_fmt_row(r, base), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
