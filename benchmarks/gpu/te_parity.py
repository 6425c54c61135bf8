"""te_parity: the Transformer Engine layer spec and the local spec compute the same model.

The trainer builds TE layers on GPUs (build_model_chunks, use_te=None -> TE when it runs) and
the CPU tests only ever see the local spec: this is where the two meet on the same weights.
"""
from __future__ import annotations

from .common import (CheckFailed, copy_parameters, init_megatron, recipe_config, release_cuda,
                     require, require_cuda, scaled_hf, shape_of)

DEVICE = "cuda"                   # a development smoke test may set "cpu"
RECIPES = ("recipes/qwen3_8b_mopd.yaml", "recipes/mopd_70b.yaml")
LAYERS, HIDDEN, FFN, HEADS, HEAD_DIM = 2, 1024, 2816, 8, 128
BATCH, SEQ = 2, 256
# Wider than HF's usual 0.02 so that the output distribution is not near-uniform (where any
# two models agree on log-probs); the recipe's own architecture fields are kept.
INIT_STD = 0.05
# Stated tolerances: relative Frobenius error of the logits and mean |delta log p(target)|.
# fp32 leaves room for TF32 GEMMs in TE and different attention kernels (TE's fused vs the
# local unfused softmax); bf16 allows bf16 rounding through the stack and is bounded by the
# nats the trainer tolerates between engine and trainer (rollout.parity_tolerance default).
TOL = {"fp32": dict(rel=2e-3, logp=1e-3), "bf16": dict(rel=3e-2, logp=0.05)}


def _compare(torch, te_logits, local_logits, targets) -> dict:
    a, b = te_logits.float(), local_logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    lp_a = torch.log_softmax(a, -1).gather(-1, targets[..., None]).squeeze(-1)
    lp_b = torch.log_softmax(b, -1).gather(-1, targets[..., None]).squeeze(-1)
    return dict(logits_rel_fro=rel, logits_max_abs=(a - b).abs().max().item(),
                logits_std=b.std().item(),
                logp_mean_abs=(lp_a - lp_b).abs().mean().item(),
                logp_max_abs=(lp_a - lp_b).abs().max().item(),
                argmax_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item())


def run(rec, opts) -> None:
    torch = require_cuda()
    require("transformer_engine.pytorch", "the TE layer spec")
    from mopd_megatron.models.builder import build_model_chunks
    init_megatron()
    results, bad = {}, []
    for recipe in RECIPES:
        cfg = recipe_config(recipe)
        orig, source = scaled_hf(cfg)
        kv = max(1, HEADS * orig.num_query_groups // orig.num_attention_heads)
        hf, _ = scaled_hf(cfg, num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                          intermediate_size=FFN, num_attention_heads=HEADS,
                          num_key_value_heads=kv, head_dim=HEAD_DIM)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        tokens = torch.randint(0, hf.vocab_size, (BATCH, SEQ), device=DEVICE, generator=g)
        targets = torch.roll(tokens, -1, 1)
        pos = torch.arange(SEQ, device=DEVICE).expand(BATCH, SEQ)
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            te = build_model_chunks(hf, cfg.parallel, dtype=dtype, use_te=True,
                                    init_method_std=INIT_STD)
            local = build_model_chunks(hf, cfg.parallel, dtype=dtype, use_te=False,
                                       init_method_std=INIT_STD)
            n = copy_parameters(te, local)
            with torch.no_grad():
                te[0].eval()
                local[0].eval()
                out = _compare(torch, te[0](tokens, pos, attention_mask=None),
                               local[0](tokens, pos, attention_mask=None), targets)
            out.update(parameters=n, tolerance=TOL[dtype])
            key = f"{recipe.rsplit('/', 1)[-1].removesuffix('.yaml')}/{dtype}"
            results[key] = out
            rec.set("cases", results)
            t = TOL[dtype]
            if not (out["logits_rel_fro"] <= t["rel"] and out["logp_mean_abs"] <= t["logp"]):
                bad.append(f"{key}: logits rel {out['logits_rel_fro']:.2e} (tol {t['rel']:.0e}), "
                           f"mean |dlogp| {out['logp_mean_abs']:.2e} (tol {t['logp']:.0e})")
            del te, local
            release_cuda()
        rec.set(f"shape/{recipe.rsplit('/', 1)[-1]}", dict(shape_of(hf), source=source))
    rec.update(dict(batch=BATCH, seq=SEQ, init_method_std=INIT_STD))
    if bad:
        raise CheckFailed("TE vs local spec: " + "; ".join(bad))


def summary(f: dict) -> list[str]:
    cases = f.get("cases") or {}
    if not cases:
        return []
    shapes = [v for k, v in f.items() if k.startswith("shape/")]
    size = (f"{shapes[0]['num_layers']} layers, hidden {shapes[0]['hidden_size']}" if shapes
            else "scaled down")
    out = [f"Same weights, tokens [{f.get('batch')}, {f.get('seq')}], init std "
           f"{f.get('init_method_std')}; the recipes' architectures at {size}:", "",
           "| recipe / dtype | logits rel. error | max abs | logits std | mean abs dlogp | "
           "max abs dlogp | argmax agree | tolerance (rel, dlogp) |",
           "|---|---|---|---|---|---|---|---|"]
    for k, c in cases.items():
        t = c.get("tolerance", {})
        out.append(f"| {k} | {c['logits_rel_fro']:.2e} | {c['logits_max_abs']:.2e} | "
                   f"{c['logits_std']:.2f} | {c['logp_mean_abs']:.2e} | {c['logp_max_abs']:.2e} | "
                   f"{c['argmax_agree']:.1%} | {t.get('rel')}, {t.get('logp')} |")
    return out
