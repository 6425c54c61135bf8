"""What to change when a plan does not fit: try single recipe changes and report those that fit.

Each candidate is one concrete ``--set`` (or planner flag) applied to the plan inputs and
re-planned, so every suggestion comes with the peak it would give, not a rule of thumb.
"""
from __future__ import annotations

from .arch import PlanError
from .memory import GIB, Plan, PlanInputs, plan_memory, with_changes

# Term name prefix -> the knobs that shrink it (for the "biggest terms" line).
WHY = {
    "student weights": "raise parallel.tp / parallel.pp",
    "grads": "raise parallel.tp / parallel.pp",
    "optimizer": "more data-parallel ranks (nodes) or raise parallel.tp / parallel.pp",
    "teacher": "offload teachers (teachers[i].offload=true) or FP8 teacher params",
    "activations": "parallel.recompute=full, a smaller parallel.micro_batch_size, or sequence parallel",
    "logits": "the fused log-prob path, a smaller micro-batch, or a larger parallel.tp",
    "SGLang": "lower rollout.mem_fraction_static or use rollout.mode=dedicated",
    "FP8 weight": "raise parallel.tp / parallel.pp",
}


def _candidates(x: PlanInputs) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    tp = x.tp * 2
    while tp <= x.gpus_per_node:
        out.append((f"--set parallel.tp={tp}", {"tp": tp}))
        tp *= 2
    pp = x.pp * 2
    while pp <= x.student.hf.num_layers and x.tp * pp <= x.train_gpus:
        out.append((f"--set parallel.pp={pp}", {"pp": pp, "vpp": None}))
        pp *= 2
    if x.recompute != "full":
        out.append((f"--set parallel.recompute=full", {"recompute": "full"}))
    if x.micro_batch_size > 1:
        out.append((f"--set parallel.micro_batch_size={x.micro_batch_size // 2}",
                    {"micro_batch_size": x.micro_batch_size // 2}))
    if x.tp > 1 and not x.sequence_parallel:
        out.append((f"--set parallel.sequence_parallel=true", {"sequence_parallel": True}))
    if x.logits_path == "naive":
        out.append(("the fused log-prob path (--logits fused)", {"logits_path": "fused"}))
    resident = [i for i, t in enumerate(x.teachers) if not t.offload]
    if resident:
        label = " ".join(f"--set teachers[{i}].offload=true" for i in resident)
        out.append((label, {"teachers": tuple(t.__class__(t.name, t.arch, True, t.params)
                                              for t in x.teachers)}))
    if any(t.params != "fp8" for t in x.teachers):
        out.append(("FP8 teacher params (--teacher-params fp8; needs Transformer Engine)",
                    {"teachers": tuple(t.__class__(t.name, t.arch, t.offload, "fp8")
                                       for t in x.teachers)}))
    if x.rollout_mode == "colocated":
        for frac in (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2):
            if frac < x.sglang_mem_fraction:
                out.append((f"--set rollout.mem_fraction_static={frac}", {"sglang_mem_fraction": frac}))
    out.append((f"twice the nodes ({x.train_gpus * 2} training GPUs)",
                {"train_gpus": x.train_gpus * 2}))
    return out


def suggest(x: PlanInputs, plan: Plan, limit: int = 6) -> list[str]:
    """Lines explaining what to cut. Deterministic: candidates are tried in a fixed order."""
    lines = []
    big = plan.biggest(2)
    lines.append("biggest terms: " + "; ".join(
        f"{t.name} {t.bytes / GIB:.1f} GiB ({_why(t.name)})" for t in big))
    tried: list[tuple[float, str, Plan]] = []
    for label, changes in _candidates(x):
        try:
            p = plan_memory(with_changes(x, **changes))
        except PlanError:
            continue
        tried.append((p.peak, label, p))
    fitting = [(peak, label) for peak, label, p in tried if p.fits]
    if fitting:
        lines.append("each of these alone makes it fit:")
        for peak, label in fitting[:limit]:
            room = x.gpu_mem_gib - peak / GIB
            lines.append(f"  {label}  -> peak {peak / GIB:.1f} GiB, headroom {room:.1f} GiB")
    else:
        lines.append("no single change fits; combine the ones that cut the most:")
        for peak, label, _ in sorted(tried, key=lambda r: r[0])[:limit]:
            lines.append(f"  {label}  -> peak {peak / GIB:.1f} GiB")
    return lines


def _why(name: str) -> str:
    for key, why in WHY.items():
        if name.startswith(key):
            return why
    return "see the table"
