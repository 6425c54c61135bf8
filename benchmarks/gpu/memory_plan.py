"""memory_plan: the planner's per-GPU terms against what torch.cuda measures.

The configuration is a cluster recipe shrunk to one GPU (its architecture family and
vocabulary, fewer layers and a narrower hidden size, written as a config.json the planner
reads like any model directory). The planner sees it through ``inputs_from_config``, the same
road as ``mopd plan``; the model is built in the trainer's order (build_student's pieces, so
that each term's allocation can be read between them, then the frozen teachers through
TeacherPool.build) and trained with the trainer's MOPD loss.
"""
from __future__ import annotations

import shutil
import tempfile

from .common import (GIB, CheckFailed, Skip, device_used_bytes, fmt_gib, init_megatron,
                     recipe_config, require_cuda, scaled_hf, shape_of, write_hf_config)

DEVICE = "cuda"                   # a development smoke test may set "cpu"
RECIPE = "recipes/qwen3_8b_mopd.yaml"
LAYERS, HIDDEN, FFN, HEADS, HEAD_DIM = 8, 2048, 6144, 16, 128
PROMPT, RESPONSE = 512, 3584          # 4096-token micro-batches
MBS, GBS = 1, 2                       # two micro-batches per optimizer step
RESERVE_GIB = 4.0                     # mopd plan's default --reserve-gb


def _microbatches(torch, n, b, s, prompt, vocab, device):
    """Packed like trainer/microbatches.py::pack_microbatches: the response predicted from position
    prompt-1 on, one sequence id per row, ``index`` naming the rollout-batch rows."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for m in range(n):
        tokens = torch.randint(0, vocab, (b, s), device=device, generator=g)
        mask = torch.zeros(b, s, device=device)
        mask[:, prompt - 1:s - 1] = 1.0
        idx = list(range(m * b, (m + 1) * b))
        out.append(dict(
            tokens=tokens, position_ids=torch.arange(s, device=device).expand(b, s),
            targets=torch.roll(tokens, -1, 1), loss_mask=mask,
            rollout_logp=torch.full((b, s), -12.0, device=device),
            orm_adv=torch.randn(b, s, device=device, generator=g),
            teacher_logp=torch.zeros(b, s, device=device),
            seq_ids=torch.tensor(idx, device=device)[:, None].expand(b, s).contiguous(),
            index=idx))
    return out


def run(rec, opts) -> None:
    torch = require_cuda()
    from mopd_megatron.runtime import have_transformer_engine
    if not have_transformer_engine():
        # The local spec's unfused attention stores [heads, s, s] scores: measuring it against
        # a planner that models TE's fused attention would only show that difference.
        raise Skip("the planner models Transformer Engine's fused attention, and TE does not "
                   "import here")
    layout = init_megatron()
    torch.cuda.synchronize()
    used0, reserved0 = device_used_bytes(), torch.cuda.memory_reserved()
    context = used0 - reserved0  # CUDA context, NCCL communicator, cuBLAS handles

    base = recipe_config(RECIPE)
    orig, source = scaled_hf(base)
    kv = max(1, HEADS * orig.num_query_groups // orig.num_attention_heads)
    hf, _ = scaled_hf(base, num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_attention_heads=HEADS, num_key_value_heads=kv, head_dim=HEAD_DIM)
    hf_dir = write_hf_config(hf, tempfile.mkdtemp(prefix="gpu_suite_plan."))
    try:
        _measure(torch, rec, layout, base, hf, source, hf_dir, context)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


def _measure(torch, rec, layout, base, hf, source, hf_dir, context) -> None:
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    from mopd_megatron.mcore.step import train_step
    from mopd_megatron.models.builder import DTYPES
    from mopd_megatron.plan.cli import inputs_from_config
    from mopd_megatron.plan.memory import plan_memory
    from mopd_megatron.runtime import have_transformer_engine
    from mopd_megatron.teachers import TeacherPool
    from mopd_megatron.trainer.builders import build_chunks, total_optimizer_steps
    from mopd_megatron.trainer.objective import make_mopd_loss_fn

    overrides = [f"model.hf_config={hf_dir}", "model.checkpoint=null",
                 f"data.max_prompt_len={PROMPT}", f"rollout.max_new_tokens={RESPONSE}",
                 f"parallel.micro_batch_size={MBS}", f"parallel.global_batch_size={GBS}",
                 # the rollout batch must fill the optimizer steps (recipe validation)
                 "optimizer.steps_per_rollout=1", "train.prompts_per_step=1",
                 f"rollout.n_samples_per_prompt={GBS}",
                 *(f"teachers[{i}].hf_config={hf_dir}" for i in range(len(base.teachers)))]
    cfg = recipe_config(RECIPE, overrides)
    cfg.validate(world_size=1, check_paths=False, check_imports=False)
    card_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    x = inputs_from_config(cfg, 1, 1, gpu_mem_gib=card_gib, reserve_gib=RESERVE_GIB)
    plan = plan_memory(x)
    planned = [dict(name=t.name, phase=t.phase, bytes=t.bytes, note=t.note) for t in plan.terms]
    rec.update(dict(recipe=RECIPE, shape=shape_of(hf), architecture_from=source,
                    use_te=have_transformer_engine(), seq_len=x.seq_len,
                    micro_batch_size=MBS, global_batch_size=GBS, card_gib=card_gib,
                    planned_terms=planned, planned_peak_phase=plan.peak_phase,
                    planned_peak_all_phases=plan.peak,
                    context_bytes=context, overrides=overrides))

    alloc = torch.cuda.memory_allocated
    measured = {}
    a0 = alloc()
    _, chunks = build_chunks(hf, cfg)
    a1 = alloc()
    ddp = wrap_ddp(chunks, cfg.optimizer)
    a2 = alloc()
    optimizer, scheduler = build_optimizer(ddp, cfg.optimizer, total_optimizer_steps(cfg),
                                           DTYPES[cfg.model.dtype])
    a3 = alloc()
    pool = TeacherPool.build(cfg.teachers, lambda d: build_chunks(d, cfg, frozen=True),
                             lambda chunks, t, i: None)  # random weights: same bytes
    a4 = alloc()
    measured.update({"student weights": a1 - a0, "grads (fp32 main)": a2 - a1,
                     "teachers (resident)": a4 - a3})
    rec.set("measured", measured)

    mbs = _microbatches(torch, GBS // MBS, MBS, x.seq_len, PROMPT, hf.vocab_size, DEVICE)
    loss_fn = make_mopd_loss_fn(cfg.loss, cfg.loss.alpha, cfg.rollout.temperature,
                                layout.tp_group_or_none)
    step = dict(vocab_size=hf.vocab_size, tp_rank=layout.tp_rank)
    train_step(ddp, optimizer, scheduler, mbs, loss_fn, **step)  # Adam state appears here
    torch.cuda.synchronize()
    a5 = alloc()
    measured["optimizer state"] = (a3 - a2) + (a5 - a4)
    rec.set("measured", measured)

    torch.cuda.reset_peak_memory_stats()
    before = alloc()
    r = train_step(ddp, optimizer, scheduler, mbs, loss_fn, **step)
    torch.cuda.synchronize()
    measured["train phase (activations + logits)"] = torch.cuda.max_memory_allocated() - before
    train_peak_reserved = torch.cuda.max_memory_reserved()
    rec.update(dict(measured=measured, step_ok=r.ok))

    domain = cfg.teachers[0].domains[0]
    torch.cuda.reset_peak_memory_stats()
    before = alloc()
    pool.score(mbs[:1], [domain] * (GBS), hf.vocab_size, MBS, False,
               temperature=cfg.rollout.temperature, layout=layout)
    torch.cuda.synchronize()
    measured["score phase (teacher forward + logits)"] = torch.cuda.max_memory_allocated() - before
    measured["persistent (allocated after the steps)"] = alloc()
    used_end = device_used_bytes()
    measured["overhead: context + allocator cache at the end"] = used_end - alloc()
    peak_device = context + train_peak_reserved
    measured["train-phase peak on the device (context + max reserved)"] = peak_device
    rec.set("measured", measured)

    def planned_sum(pred) -> float:
        return sum(t.bytes for t in plan.terms if pred(t))
    rows = [
        ("student weights", planned_sum(lambda t: t.name == "student weights")),
        ("grads (fp32 main)", planned_sum(lambda t: t.name.startswith("grads"))),
        ("optimizer state", planned_sum(lambda t: t.name == "optimizer state")),
        ("teachers (resident)", planned_sum(lambda t: t.name.endswith("(resident)"))),
        ("train phase (activations + logits)", plan.phase_total("train")),
        ("score phase (teacher forward + logits)", plan.phase_total("score")),
        ("overhead: context + allocator cache at the end", RESERVE_GIB * GIB),
        ("train-phase peak on the device (context + max reserved)",
         plan.persistent + plan.phase_total("train")),
    ]
    compare = [dict(term=k, planned=p, measured=measured.get(k),
                    ratio=(measured[k] / p) if p and measured.get(k) is not None else None)
               for k, p in rows]
    rec.set("compare", compare)
    planned_peak = plan.persistent + plan.phase_total("train")
    if peak_device > planned_peak:
        raise CheckFailed(f"measured train-phase peak {peak_device / GIB:.2f} GiB exceeds the "
                          f"planned {planned_peak / GIB:.2f} GiB (reserve {RESERVE_GIB} GiB "
                          "included): the planner under-estimates")


def summary(f: dict) -> list[str]:
    rows = f.get("compare") or []
    out = []
    if f.get("shape"):
        s = f["shape"]
        out.append(f"{f.get('recipe')} at tp=pp=1: {s['architecture']} {s['num_layers']} layers, "
                   f"hidden {s['hidden_size']}, FFN {s['ffn_hidden_size']}, heads "
                   f"{s['num_attention_heads']}/{s['num_query_groups']}, vocab {s['vocab_size']}; "
                   f"micro-batch {f.get('micro_batch_size')} x {f.get('seq_len')} tokens, "
                   f"{f.get('global_batch_size')} per step; TE layer spec: {f.get('use_te')}; "
                   f"CUDA context + NCCL before any tensor {fmt_gib(f.get('context_bytes'))} GiB.")
    if rows:
        out += ["", "| term | planned GiB | measured GiB | measured / planned |", "|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
            out.append(f"| {r['term']} | {fmt_gib(r['planned'])} | {fmt_gib(r['measured'])} | "
                       f"{ratio} |")
    return out
