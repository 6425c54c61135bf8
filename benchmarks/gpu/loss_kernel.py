"""loss_kernel: the fused MOPD loss (Triton) on the GPU: numerics first, then bandwidth.

The timing reuses benchmarks/bench_loss.py's per-path child (same inputs, same MOPD
coefficients, CUDA events, peak memory over the inputs), called in this process one path at a
time, so the table here and bench_loss.py's agree on what they measure.
"""
from __future__ import annotations

from .common import (CheckFailed, fmt_gib, hbm_peak_tbps, load_file, release_cuda, require,
                     require_cuda)

DEVICE = "cuda"                   # a development smoke test may set "cpu"
TOKENS = 16384
VOCABS = (152064, 152064 // 8)        # V_local of a Qwen-sized vocabulary at TP=1 and TP=8
PATHS = ("ours", "naive", "megatron")
WARMUP, REPEATS = 2, 5
# Small-shape numerics: V not a multiple of the kernel's vocab block, several blocks per row.
NUM_T, NUM_V = 1000, 19009
EPS_LOW, EPS_HIGH, ALPHA = 0.5, 2.0, 0.1


def _numerics(torch, rec) -> None:
    """Triton vs the op's PyTorch reference backend (loss, gradient) and vs a float64
    log_softmax (log-probs); tolerances of tests/test_ops_reference.py."""
    from mopd_megatron.ops import mopd_loss, token_logprobs
    tol = {torch.float32: dict(logp=2e-5, loss=1e-5, grad=1e-5),
           torch.bfloat16: dict(logp=2e-5, loss=1e-5, grad=8e-3)}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    T, V = NUM_T, NUM_V
    base = 3.0 * torch.randn(T, V, device=DEVICE, generator=g)
    targets = torch.randint(0, V, (T,), device=DEVICE, generator=g)
    # Rollout log-probs near the student's own keep most IS ratios inside the IcePop band:
    # with unrelated values every token is rejected and the loss is trivially 0.
    ref32 = torch.log_softmax(base.double(), -1).gather(1, targets[:, None]).squeeze(1).float()
    per_tok = dict(rollout_logprobs=ref32 + 0.3 * torch.randn(T, device=DEVICE, generator=g),
                   teacher_logprobs=ref32 + torch.randn(T, device=DEVICE, generator=g),
                   orm_advantages=torch.randn(T, device=DEVICE, generator=g),
                   loss_mask=(torch.rand(T, device=DEVICE, generator=g) > 0.2).long(),
                   seq_ids=torch.arange(T, device=DEVICE) // 100)
    out, bad = {}, []
    for dtype in (torch.float32, torch.bfloat16):
        name, t = str(dtype).removeprefix("torch."), tol[dtype]
        logits = base.to(dtype)
        ref = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
        lp = token_logprobs(logits, targets, backend="triton")
        d_lp = (lp.double() - ref).abs().max().item()
        res = {}
        for backend in ("triton", "torch"):
            x = logits.clone().requires_grad_(True)
            loss, m = mopd_loss(x, targets, **per_tok, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                alpha=ALPHA, backend=backend)
            (grad,) = torch.autograd.grad(loss, x)
            res[backend] = (loss.double().item(), grad.double())
            masked = float(m["is_masked_frac"])
        (l_tr, g_tr), (l_ref, g_ref) = res["triton"], res["torch"]
        d_loss = abs(l_tr - l_ref) / max(abs(l_ref), 1e-30)
        gmax = g_ref.abs().max().item()
        d_grad = (g_tr - g_ref).abs().max().item() / max(gmax, 1e-30)
        out[name] = dict(logp_max_abs_vs_float64=d_lp, loss_rel_vs_torch_backend=d_loss,
                         loss=l_tr, is_masked_frac=masked,
                         grad_max_abs_over_max_grad_vs_torch_backend=d_grad,
                         tolerances=dict(logp=t["logp"], loss=t["loss"], grad=t["grad"]))
        # logp tolerance is relative to |logp| as well (assert_close's rtol), like the tests.
        lp_tol = t["logp"] * (1 + ref.abs().max().item())
        if d_lp > lp_tol:
            bad.append(f"{name}: max |logp - float64| {d_lp:.2e} > {lp_tol:.2e}")
        if d_loss > t["loss"]:
            bad.append(f"{name}: loss rel. diff vs the torch backend {d_loss:.2e} > {t['loss']:.0e}")
        # bf16 gradients round at 2^-8 in both backends; twice the tests' tolerance allows
        # the two roundings to fall on opposite sides.
        g_tol = t["grad"] * (2 if dtype == torch.bfloat16 else 1)
        if d_grad > g_tol:
            bad.append(f"{name}: grad max diff / max |grad| {d_grad:.2e} > {g_tol:.0e}")
    rec.set("numerics", dict(T=T, V=V, **out))
    if bad:
        raise CheckFailed("Triton kernel numerics: " + "; ".join(bad))


def run(rec, opts) -> None:
    torch = require_cuda()
    require("triton", "the Triton kernel")
    import importlib.util
    child = load_file("mopd_bench_loss", "benchmarks/bench_loss.py").child
    name = torch.cuda.get_device_name()
    peak = hbm_peak_tbps(name)
    rec.update(dict(device=name, hbm_peak_TBps=peak if peak else "unknown", T=TOKENS,
                    dtype="bfloat16", warmup=WARMUP, repeats=REPEATS))
    _numerics(torch, rec)
    paths = [p for p in PATHS
             if p != "megatron" or importlib.util.find_spec("megatron") is not None]
    rows = []
    for V in VOCABS:
        for path in paths:
            try:
                r = child(path, TOKENS, V, "bfloat16", DEVICE, WARMUP, REPEATS)
            except Exception as e:  # noqa: BLE001 - e.g. the naive path out of memory
                rows.append(dict(path=path, T=TOKENS, V=V, error=f"{type(e).__name__}: {e}"[:300]))
                rec.set("timing", rows)
                release_cuda()
                continue
            nbytes = 3 * TOKENS * V * r["elt"]
            gbps = nbytes / r["time_s"] / 1e9
            rows.append(dict(
                path=path, T=TOKENS, V=V, time_ms=r["time_s"] * 1e3, bytes=nbytes, GBps=gbps,
                frac_of_hbm_peak=(gbps / (peak * 1e3)) if peak else None,
                x_hbm_floor_time=(r["time_s"] / (nbytes / (peak * 1e12))) if peak else None,
                copy_GBps=2 * TOKENS * V * r["elt"] / r["copy_s"] / 1e9,
                peak_mem_over_inputs_bytes=r["peak_bytes"], loss=r["loss"]))
            rec.set("timing", rows)
            release_cuda()
    ours = [r for r in rows if r["path"] == "ours"]
    if not ours or any("error" in r for r in ours):
        raise CheckFailed("the fused op did not complete: "
                          + "; ".join(r.get("error", "") for r in ours))
    for r in ours:  # same inputs, same math: the loss must agree with the naive path's
        naive = next((n for n in rows if n["path"] == "naive" and n["V"] == r["V"]
                      and "error" not in n), None)
        if naive is not None:
            rel = abs(r["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-30)
            r["loss_rel_vs_naive"] = rel
            if rel > 1e-4:
                raise CheckFailed(f"V={r['V']}: fused loss differs from the naive path by {rel:.1e}")
    rec.set("timing", rows)


def summary(f: dict) -> list[str]:
    out = []
    num = f.get("numerics")
    if num:
        for dt in ("float32", "bfloat16"):
            if dt in num:
                n = num[dt]
                out.append(f"- numerics {dt} (T={num['T']}, V={num['V']}): max |logp - float64| "
                           f"{n['logp_max_abs_vs_float64']:.1e}; loss vs the PyTorch backend "
                           f"{n['loss_rel_vs_torch_backend']:.1e} (rel.); grad vs it "
                           f"{n['grad_max_abs_over_max_grad_vs_torch_backend']:.1e} of max |grad|")
    rows = f.get("timing") or []
    if rows:
        peak = f.get("hbm_peak_TBps")
        out += ["", f"bf16 logits, T = {f.get('T')}, median of {f.get('repeats')} after "
                f"{f.get('warmup')} warm-up (CUDA events); bytes = 3 x T x V x 2; HBM peak "
                f"{peak} TB/s:", "",
                "| V_local | path | time ms | GB/s | of HBM peak | x HBM floor | copy GB/s | "
                "peak GiB over inputs |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['V']} | {r['path']} | n/a: {r['error'][:80]} | | | | | |")
                continue
            frac = f"{r['frac_of_hbm_peak']:.0%}" if r.get("frac_of_hbm_peak") else "unknown"
            floor = f"{r['x_hbm_floor_time']:.2f}" if r.get("x_hbm_floor_time") else "unknown"
            out.append(f"| {r['V']} | {r['path']} | {r['time_ms']:.2f} | {r['GBps']:.0f} | "
                       f"{frac} | {floor} | {r['copy_GBps']:.0f} | "
                       f"{fmt_gib(r['peak_mem_over_inputs_bytes'])} |")
    return out
