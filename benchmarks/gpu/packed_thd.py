"""packed_thd: a packed row (parallel.pack_sequences) in Transformer Engine's THD format gives
every sequence the log-probs and gradients it gets unpacked.

The CPU tests prove the local spec's block-diagonal mask (tests/test_microbatches.py); on a GPU
the trainer packs through PackedSeqParams instead (mcore/schedule.py::packed_attention, "thd"),
which only TE runs. Here both go through the trainer's own pieces: rows built by
trainer/microbatches.py::build_microbatches (packed and padded), the model called as
mcore/schedule.py calls it, log-probs of the targets at the response positions, and the
gradient of their sum with respect to every parameter.
"""
from __future__ import annotations

from .common import CheckFailed, init_megatron, recipe_config, release_cuda, require, \
    require_cuda, scaled_hf, shape_of

RECIPE = "recipes/qwen3_8b_mopd.yaml"
LAYERS, HIDDEN, FFN, HEADS, HEAD_DIM = 2, 512, 1408, 8, 64
# Response lengths in the Open-MOPD proportions (math, code, instruction following), /32.
RESPONSES = (361, 282, 11, 300, 9, 12)
PROMPT = 24
INIT_STD = 0.05
# fp32 leaves room for TF32 GEMMs and THD vs padded attention kernels (different blockings);
# bf16 for bf16 rounding, bounded by rollout.parity_tolerance's default 0.05 nats.
TOL = {"fp32": dict(logp=1e-3, grad=1e-2), "bf16": dict(logp=0.05, grad=0.1)}


def _batch(vocab: int):
    import random

    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    rng = random.Random(0)
    rows, samples = [], []
    for p, n in enumerate(RESPONSES):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT)]
        rows.append(PromptRow("d", "x", None, {}, f"mem:{p}", prompt_ids=prompt))
        samples.append(Sample(p, 0, prompt, [rng.randrange(3, vocab) for _ in range(n)],
                              [0.0] * n, "stop", "v"))
    return RolloutBatch(rows, samples, 1)


def logp_and_grads(torch, chunks, mb: dict, packed_format: str, vocab: int):
    """Per-slot target log-probs of one micro-batch and d(sum)/d(params), as the schedule
    would call the model."""
    from mopd_megatron.mcore.schedule import packed_attention
    model = chunks[0]
    model.zero_grad(set_to_none=True)
    logits = model(mb["tokens"], mb["position_ids"], **packed_attention(mb, packed_format))
    lp = torch.log_softmax(logits.float()[..., :vocab], -1)
    lp = lp.gather(-1, mb["targets"][..., None]).squeeze(-1).reshape(-1)[mb["resp_pos"]]
    out = torch.zeros(int(mb["resp_slot"].max()) + 1, device=lp.device)
    out[mb["resp_slot"]] = lp
    out.sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach(), grads


def compare(torch, *, use_te: bool, device: str, dtype: str, vocab_size: int | None = None) -> dict:
    """Packed (THD with TE, the mask otherwise) vs padded rows, same weights and sequences."""
    from mopd_megatron.models.builder import build_model_chunks, packed_attention_format
    from mopd_megatron.trainer.microbatches import ResponseSlots, build_microbatches
    cfg = recipe_config(RECIPE)
    orig, _ = scaled_hf(cfg)
    kv = max(1, HEADS * orig.num_query_groups // orig.num_attention_heads)
    hf, _ = scaled_hf(cfg, num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_attention_heads=HEADS, num_key_value_heads=kv, head_dim=HEAD_DIM,
                      max_position_embeddings=4096,
                      **({"vocab_size": vocab_size} if vocab_size else {}))
    torch.manual_seed(0)
    chunks = build_model_chunks(hf, cfg.parallel, dtype=dtype, use_te=use_te,
                                init_method_std=INIT_STD)
    batch = _batch(hf.vocab_size)
    idx = list(range(len(batch)))
    slots = ResponseSlots(batch, idx)
    (packed,) = build_microbatches(batch, [idx], 0, slots=slots, packed=True, device=device)
    padded = build_microbatches(batch, [[i] for i in idx], 0, slots=slots, device=device)
    fmt = packed_attention_format(use_te)
    lp_packed, g_packed = logp_and_grads(torch, chunks, packed, fmt, hf.vocab_size)
    lp_padded = torch.zeros_like(lp_packed)
    g_padded: dict = {}
    for mb in padded:  # one sequence per row: attention_mask None, the plain causal path
        lp, g = logp_and_grads(torch, chunks, mb, fmt, hf.vocab_size)
        lp_padded[mb["resp_slot"]] = lp[mb["resp_slot"]]
        for k, v in g.items():
            g_padded[k] = g_padded.get(k, 0) + v
    scale = max(float(v.abs().max()) for v in g_padded.values())
    grad_err = max(float((g_packed[k] - g_padded[k]).abs().max()) for k in g_padded) / scale
    out = dict(format=fmt, tokens=int(packed["tokens"].numel()), sequences=len(idx),
               logp_max_abs=float((lp_packed - lp_padded).abs().max()),
               grad_max_rel=grad_err, shape=shape_of(hf))
    del chunks
    return out


def run(rec, opts) -> None:
    torch = require_cuda()
    require("transformer_engine.pytorch", "the THD attention of packed rows")
    init_megatron()
    bad, cases = [], {}
    for dtype in ("fp32", "bf16"):
        out = compare(torch, use_te=True, device="cuda", dtype=dtype)
        out["tolerance"] = TOL[dtype]
        cases[dtype] = out
        rec.set("cases", cases)
        t = TOL[dtype]
        if out["format"] != "thd":
            bad.append(f"{dtype}: packed rows went through {out['format']!r}, not THD")
        if not (out["logp_max_abs"] <= t["logp"] and out["grad_max_rel"] <= t["grad"]):
            bad.append(f"{dtype}: max |dlogp| {out['logp_max_abs']:.2e} (tol {t['logp']}), "
                       f"grad rel {out['grad_max_rel']:.2e} (tol {t['grad']})")
        release_cuda()
    if bad:
        raise CheckFailed("packed THD vs unpacked: " + "; ".join(bad))


def summary(f: dict) -> list[str]:
    cases = f.get("cases") or {}
    if not cases:
        return []
    out = ["Packed row (THD) vs one padded row per sequence, same weights; responses "
           f"{list(RESPONSES)} after {PROMPT}-token prompts:", "",
           "| dtype | format | tokens | max abs dlogp | grad max rel. error | tolerance |",
           "|---|---|---|---|---|---|"]
    for k, c in cases.items():
        out.append(f"| {k} | {c['format']} | {c['tokens']} | {c['logp_max_abs']:.2e} | "
                   f"{c['grad_max_rel']:.2e} | {c['tolerance']} |")
    return out
