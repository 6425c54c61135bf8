"""fp8_step: FP8 training steps against BF16 ones, built the way the trainer builds them.

The TransformerConfig comes from the recipe's model.fp8 section through
models/builder.py::transformer_config (inside build_model_chunks), so what is checked is the
mapping the trainer uses (fp8 format and recipe, first/last layers in BF16), not a hand-made
TE model. The model keeps the recipe's hidden size, FFN width and heads (the GEMM shapes FP8
speeds up) with fewer layers and a smaller vocabulary (the BF16 output layer would otherwise
dominate the step and hide the FP8 layers).

benchmarks/gpu_check_fp8.py runs this check on its own (exit 0 / 1 / 77).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

from .common import (CheckFailed, Skip, cpu_state, init_megatron, load_state, recipe_config,
                     release_cuda, require, scaled_hf, shape_of)

DEVICE = "cuda"                   # a development smoke test may set "cpu"
RECIPE = "recipes/qwen3_8b_mopd.yaml"
LAYERS, VOCAB = 6, 32768
SEQ, MICRO_BATCHES = 4096, 2
STEPS, TIMED_FROM = 10, 3          # step times: median of steps TIMED_FROM.. (after warm-up)
LR = 3e-4
# The same tolerances as gpu_check_fp8.py had: same weights and batch at step 0, then drift.
RTOL_FIRST, RTOL_LAST = 0.02, 0.10
OPTIONAL = ("blockwise",)          # needs a recent TE; its failure is recorded, not fatal


@dataclasses.dataclass
class Options:
    recipe: str = RECIPE
    fp8_recipes: tuple[str, ...] | None = None   # None: the recipe's, tensorwise, blockwise
    fp8_format: str | None = None                # None: the recipe's model.fp8.format
    steps: int = STEPS
    rtol_first: float = RTOL_FIRST
    rtol_last: float = RTOL_LAST


def _copy_task(torch, n, s, vocab):
    """Each row repeats its first half: the second half is learnable, so the loss must fall."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    out = []
    for _ in range(n):
        half = torch.randint(0, vocab, (1, s // 2), device=DEVICE, generator=g)
        tokens = torch.cat([half, half], 1)
        mask = torch.zeros(1, s, device=DEVICE)
        mask[:, s // 2 - 1:s - 1] = 1.0
        out.append(dict(tokens=tokens, position_ids=torch.arange(s, device=DEVICE)[None],
                        labels=torch.roll(tokens, -1, 1), loss_mask=mask))
    return out


def _train(torch, hf, cfg, fp8, init, mbs, steps):
    """(per-step losses, per-step seconds) of `steps` optimizer steps from `init`."""
    from mopd_megatron.models.builder import DTYPES, build_model_chunks
    from mopd_megatron.mcore.cross_entropy import masked_token_ce
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    from mopd_megatron.mcore.step import train_step
    chunks = build_model_chunks(hf, cfg.parallel, dtype=cfg.model.dtype, fp8=fp8, use_te=True)
    state = cpu_state(chunks) if init is None else init
    load_state(chunks, state)
    ddp = wrap_ddp(chunks, cfg.optimizer)
    opt, sched = build_optimizer(ddp, cfg.optimizer, steps, DTYPES[cfg.model.dtype])
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = train_step(ddp, opt, sched, mbs, masked_token_ce, vocab_size=hf.vocab_size, tp_rank=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tot = sum(float(m["loss_sum"]) for m in r.metrics)
        n = sum(float(m["tokens"]) for m in r.metrics)
        losses.append(tot / max(n, 1.0))
    del ddp, opt, sched, chunks
    release_cuda()
    return losses, times, state


def run(rec, opts: Options | None = None) -> None:
    opts = opts if isinstance(opts, Options) else Options()
    from mopd_megatron.models.fp8 import fp8_unavailable_reason
    reason = fp8_unavailable_reason()
    if reason:
        raise Skip(reason)
    require("megatron.core", "the Megatron model")
    import torch
    init_megatron()
    cfg = recipe_config(opts.recipe, [
        f"optimizer.lr={LR}", f"optimizer.min_lr={LR}", "optimizer.warmup_steps=0",
        "optimizer.schedule=constant", "parallel.micro_batch_size=1",
        f"parallel.global_batch_size={MICRO_BATCHES}"])
    hf, source = scaled_hf(cfg, num_hidden_layers=LAYERS, vocab_size=VOCAB)
    base = cfg.model.fp8
    if opts.fp8_format:
        base = dataclasses.replace(base, format=opts.fp8_format)
    names = opts.fp8_recipes or tuple(dict.fromkeys((base.recipe, "tensorwise", *OPTIONAL)))
    rec.update(dict(recipe=opts.recipe, shape=shape_of(hf), architecture_from=source,
                    seq=SEQ, micro_batches=MICRO_BATCHES, steps=opts.steps, lr=LR,
                    timed_from_step=TIMED_FROM, fp8_section=dataclasses.asdict(base),
                    device=torch.cuda.get_device_name()))
    mbs = _copy_task(torch, MICRO_BATCHES, SEQ, hf.vocab_size)

    torch.manual_seed(cfg.train.seed)
    ref_losses, ref_times, init = _train(torch, hf, cfg, None, None, mbs, opts.steps)
    timed = min(TIMED_FROM, opts.steps - 1)
    variants = {"bf16": dict(losses=ref_losses, step_s=statistics.median(ref_times[timed:]),
                             step_times=ref_times)}
    rec.set("variants", variants)
    bad = []
    for name in names:
        # Delayed scaling cannot keep the first/last layers in BF16 (FP8Config refuses it).
        fp8 = dataclasses.replace(base, enabled=True, recipe=name,
                                  first_last_layers_bf16=base.first_last_layers_bf16
                                  and name != "delayed")
        try:
            losses, times, _ = _train(torch, hf, cfg, fp8, init, mbs, opts.steps)
        except Exception as e:  # noqa: BLE001 - recorded per variant
            variants[name] = dict(error=f"{type(e).__name__}: {e}"[:400])
            rec.set("variants", variants)
            release_cuda()
            if name not in OPTIONAL or opts.fp8_recipes:
                bad.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        step_s = statistics.median(times[timed:])
        first = abs(losses[0] - ref_losses[0]) / ref_losses[0]
        last = abs(losses[-1] - ref_losses[-1]) / ref_losses[-1]
        learned = losses[-1] < 0.9 * losses[0]
        variants[name] = dict(losses=losses, step_s=step_s, step_times=times,
                              speedup_vs_bf16=variants["bf16"]["step_s"] / step_s,
                              rel_loss_diff_first=first, rel_loss_diff_last=last,
                              first_last_layers_bf16=fp8.first_last_layers_bf16,
                              loss_decreased=learned)
        rec.set("variants", variants)
        if not (first <= opts.rtol_first and last <= opts.rtol_last and learned):
            bad.append(f"{name}: loss rel. diff step 0 {first:.2%} (tol {opts.rtol_first:.0%}), "
                       f"last {last:.2%} (tol {opts.rtol_last:.0%}), decreased {learned}")
    if not ref_losses[-1] < 0.9 * ref_losses[0]:
        bad.append(f"bf16 loss did not decrease ({ref_losses[0]:.3f} -> {ref_losses[-1]:.3f})")
    if bad:
        raise CheckFailed("FP8 vs BF16: " + "; ".join(bad))


def summary(f: dict) -> list[str]:
    v = f.get("variants") or {}
    if not v:
        return []
    s = f.get("shape", {})
    out = [f"{f.get('recipe')}'s model.fp8 ({f.get('fp8_section', {}).get('format')}, "
           f"first/last layers BF16: {f.get('fp8_section', {}).get('first_last_layers_bf16')}) on "
           f"its architecture at {s.get('num_layers')} layers, hidden {s.get('hidden_size')}, FFN "
           f"{s.get('ffn_hidden_size')}, vocab {s.get('vocab_size')}; {f.get('micro_batches')} "
           f"micro-batches x {f.get('seq')} tokens per step, Adam lr {f.get('lr')}, "
           f"{f.get('steps')} steps; step time = median from step {f.get('timed_from_step')}:", "",
           "| variant | step s | vs bf16 | loss step 0 | loss last | rel. diff step 0 | "
           "rel. diff last |", "|---|---|---|---|---|---|---|"]
    for k, r in v.items():
        if "error" in r:
            out.append(f"| {k} | n/a: {r['error'][:100]} | | | | | |")
            continue
        sp = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "1.00x"
        d0 = f"{r['rel_loss_diff_first']:.2%}" if "rel_loss_diff_first" in r else "-"
        d1 = f"{r['rel_loss_diff_last']:.2%}" if "rel_loss_diff_last" in r else "-"
        out.append(f"| {k} | {r['step_s']:.3f} | {sp} | {r['losses'][0]:.4f} | "
                   f"{r['losses'][-1]:.4f} | {d0} | {d1} |")
    return out
