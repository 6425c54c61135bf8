"""Per-GPU memory of an MOPD run, term by term, for the heaviest pipeline stage.

All sizes in bytes; GiB = 2**30. Notation: h hidden, a heads, g KV groups, d head dim, f FFN
width, V vocab, L layers, t = TP, p = PP, v = VPP, T = tokens per micro-batch
(micro_batch_size x (data.max_prompt_len + rollout.max_new_tokens): padded worst case),
P_s = parameters on one GPU of stage s (arch.ArchSpec.stage_params).

Persistent (all phases):
  weights       P_s x (2 bf16/fp16 | 4 fp32)   (+ P_s x 1 FP8 weight copies when model.fp8)
  grads         P_s x 4                        Megatron's fp32 main-grad buffer, not sharded
  optimizer     P_s x 12 / DP                  fp32 master + Adam m, v; distributed optimizer
                                               (8 for an fp32 model: no master copy; / 1 without
                                               optimizer.distributed_optimizer)
  teachers      sum of resident teachers' P_s x (2 bf16 | 1 FP8 params)
  reserve       CUDA context, NCCL buffers, allocator fragmentation (an assumption, --reserve-gb)
Phase terms (phases run one after another; the peak is persistent + the largest phase):
  train:   activations  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
                        Transformer Models", eq. 1-2) adapted to SwiGLU, GQA, RMSNorm, no dropout
                        and fused (flash) attention, which stores no a x s^2 score matrix:
                          per layer per token = 8h x (1/t with sequence parallel, else 1)
                                                 [2 norm inputs + 2 norm outputs, bf16]
                                              + (4ad + 4gd + 6f) / t
                                                 [q, k, v, attn out; gate, up, swiglu out; bf16]
                          recompute=selective: Megatron's default recomputes core attention,
                            whose inputs q, k, v stay stored; with fused attention it saves ~0
                          recompute=full: 2h (/t with SP) per layer per token, plus one layer's
                            full set while it is recomputed
                        x T x L/p layers x in-flight micro-batches min(p - s, m) (1F1B), x
                        (1 + (p-1)/(p v)) with the interleaved schedule
           logits       last stage; fused path: T x V/t x 2 (bf16, once) + T x 16 (fp32 lse,
                        target logit, loss, weight); naive path: + 2 fp32 copies (T x V/t x 8:
                        .float() and the saved log_softmax)
  score:   offloaded teacher  the largest offloaded teacher's P_s, loaded for its pass
           teacher logits     T x V/t x 2 + T x 16 on the last stage
  rollout: SGLang       colocated only: rollout.mem_fraction_static x card memory (its weights
                        at server TP + KV cache); released while the trainer runs (engines
                        release/resume their memory between phases)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .arch import ArchSpec, PlanError, check_layout

GIB = 2 ** 30
PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    arch: ArchSpec
    offload: bool = False
    params: str = "bf16"  # bf16 | fp8


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on (built from a recipe by plan.cli.inputs_from_config)."""

    student: ArchSpec
    teachers: tuple[TeacherSpec, ...]
    train_gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    micro_batch_size: int = 1
    global_batch_size: int = 1
    max_tokens_per_microbatch: int | None = None   # parallel.max_tokens_per_microbatch
    seq_len: int = 2048
    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: str = "bf16"
    fp8: bool = False
    distributed_optimizer: bool = True
    logits_path: str = "fused"
    rollout_mode: str = "colocated"
    sglang_mem_fraction: float = 0.5
    sglang_tp: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 4.0

    @property
    def dp(self) -> int:
        return self.train_gpus // (self.tp * self.pp)

    @property
    def tokens(self) -> int:
        """Tokens of the largest micro-batch: the budget, or one longest sequence when that is
        longer (it gets a micro-batch of its own)."""
        if self.max_tokens_per_microbatch is not None:
            return max(self.max_tokens_per_microbatch, self.seq_len)
        return self.micro_batch_size * self.seq_len

    @property
    def micro_batches(self) -> int:
        if self.max_tokens_per_microbatch is not None:  # worst case: every sequence full length
            return max(1, -(-self.global_batch_size * self.seq_len // (self.dp * self.tokens)))
        return max(1, self.global_batch_size // (self.micro_batch_size * self.dp))


@dataclass(frozen=True)
class Term:
    name: str
    phase: str          # "all" (persistent), "train", "score" or "rollout"
    bytes: float
    note: str = ""


@dataclass
class Plan:
    inputs: PlanInputs
    stage: int                      # the heaviest pipeline stage
    terms: list[Term]
    peak_phase: str
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # beyond the sum: e.g. SGLang cannot load

    def phase_total(self, phase: str) -> float:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def persistent(self) -> float:
        return self.phase_total("all")

    @property
    def peak(self) -> float:
        return self.persistent + self.phase_total(self.peak_phase)

    @property
    def capacity(self) -> float:
        return self.inputs.gpu_mem_gib * GIB

    @property
    def headroom(self) -> float:
        return self.capacity - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0 and not self.errors

    def biggest(self, n: int = 2) -> list[Term]:
        """The largest terms that make up the peak (persistent + the peak phase)."""
        live = [t for t in self.terms if t.phase in ("all", self.peak_phase) and t.name != "reserve"]
        return sorted(live, key=lambda t: -t.bytes)[:n]


def activation_bytes_per_layer_token(arch: ArchSpec, tp: int, sp: bool) -> float:
    """Stored activations of one layer for one token, bf16, no recompute (see module doc)."""
    c = arch.hf
    h, a, g, d, f = (c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels,
                     c.ffn_hidden_size)
    replicated = 8 * h / (tp if sp else 1)
    split = (4 * a * d + 4 * g * d + 6 * f) / tp
    return replicated + split


def _activations(x: PlanInputs, stage: int) -> float:
    arch, layers = x.student, x.student.hf.num_layers // x.pp
    full_set = activation_bytes_per_layer_token(arch, x.tp, x.sequence_parallel)
    if x.recompute == "full":
        per_layer = 2 * arch.hf.hidden_size / (x.tp if x.sequence_parallel else 1)
        working = full_set * x.tokens                    # one layer being recomputed
    else:                                                # none; selective ~ none (module doc)
        per_layer, working = full_set, 0.0
    inflight = min(x.pp - stage, x.micro_batches)
    interleave = 1 + (x.pp - 1) / (x.pp * x.vpp) if x.vpp else 1.0
    return per_layer * x.tokens * layers * inflight * interleave + working


def _logits(x: PlanInputs, vocab: int, naive: bool) -> float:
    per_elem = 2 + (8 if naive else 0)
    return x.tokens * (vocab / x.tp) * per_elem + x.tokens * 16


def stage_terms(x: PlanInputs, s: int) -> list[Term]:
    P = x.student.stage_params(s, x.tp, x.pp)
    last = s == x.pp - 1
    wb = PARAM_BYTES[x.dtype]
    terms = [Term("student weights", "all", P * wb, f"{P / 1e9:.2f}B params x {wb} B ({x.dtype})")]
    if x.fp8:
        fp8_params = (x.student.hf.num_layers // x.pp) * x.student.layer_sharded() / x.tp
        terms.append(Term("FP8 weight copies", "all", fp8_params, "1 B per linear weight (TE cast)"))
    terms.append(Term("grads (fp32 main)", "all", P * 4, "P x 4 B, Megatron grad buffer"))
    opt_b = 8 if x.dtype == "fp32" else 12
    shard = x.dp if x.distributed_optimizer else 1
    terms.append(Term("optimizer state", "all", P * opt_b / shard,
                      f"P x {opt_b} B / DP={shard}" + ("" if x.distributed_optimizer
                                                       else " (not distributed)")))
    for t in x.teachers:
        tb = PARAM_BYTES[t.params]
        Pt = t.arch.stage_params(s, x.tp, x.pp)
        if t.offload:
            continue
        terms.append(Term(f"teacher {t.name} (resident)", "all", Pt * tb,
                          f"{Pt / 1e9:.2f}B params x {tb} B ({t.params})"))
    offloaded = [(t.arch.stage_params(s, x.tp, x.pp) * PARAM_BYTES[t.params], t)
                 for t in x.teachers if t.offload]
    if offloaded:
        b, t = max(offloaded, key=lambda bt: bt[0])
        terms.append(Term(f"teacher {t.name} (offloaded, loaded)", "score", b,
                          "largest offloaded teacher, one on the GPU at a time"))
    terms.append(Term("reserve", "all", x.reserve_gib * GIB, "CUDA ctx, NCCL, fragmentation"))
    acts = _activations(x, s)
    inflight = min(x.pp - s, x.micro_batches)
    terms.append(Term("activations", "train", acts,
                      f"T={x.tokens} tok, {x.student.hf.num_layers // x.pp} layers x {inflight} in flight,"
                      f" recompute={x.recompute}"))
    if last:
        naive = x.logits_path == "naive"
        vocab = x.student.hf.vocab_size
        terms.append(Term(f"logits ({x.logits_path})", "train", _logits(x, vocab, naive),
                          f"[T, V/t] = [{x.tokens}, {vocab // x.tp}]"))
        if x.teachers:
            v = max(t.arch.hf.vocab_size for t in x.teachers)
            terms.append(Term("teacher logits", "score", _logits(x, v, False),
                              "forward only, one micro-batch"))
    if x.rollout_mode == "colocated":
        terms.append(Term("SGLang weights + KV", "rollout", x.sglang_mem_fraction * x.gpu_mem_gib * GIB,
                          f"mem_fraction_static={x.sglang_mem_fraction} x {x.gpu_mem_gib} GiB"))
    return terms


def sglang_split(x: PlanInputs) -> tuple[float, float, float]:
    """(weights, KV cache bytes, KV tokens) of one SGLang GPU at rollout.server_tp_size."""
    total = x.sglang_mem_fraction * x.gpu_mem_gib * GIB
    weights = x.student.total_params() * 2 / x.sglang_tp
    kv = total - weights
    per_tok = x.student.kv_bytes_per_token() / x.sglang_tp
    return weights, kv, max(kv, 0) / per_tok


def plan_memory(x: PlanInputs) -> Plan:
    """The estimate for the heaviest stage. Raises PlanError for an impossible layout."""
    if x.train_gpus < x.tp * x.pp or x.train_gpus % (x.tp * x.pp):
        raise PlanError(f"parallel.tp x parallel.pp = {x.tp} x {x.pp} must divide the "
                        f"{x.train_gpus} training GPUs")
    check_layout(x.student, x.tp, x.pp, x.vpp, "student")
    for t in x.teachers:
        check_layout(t.arch, x.tp, x.pp, x.vpp, f"teacher {t.name}")
    best: Plan | None = None
    for s in range(x.pp):
        terms = stage_terms(x, s)
        phases = {t.phase for t in terms} - {"all"}
        tot = {p: sum(t.bytes for t in terms if t.phase == p) for p in phases}
        phase = max(sorted(tot), key=lambda p: tot[p]) if tot else "train"
        plan = Plan(x, s, terms, phase)
        if best is None or plan.peak > best.peak:
            best = plan
    assert best is not None
    if x.rollout_mode in ("colocated", "dedicated"):
        w, kv, toks = sglang_split(x)
        where = "each training GPU" if x.rollout_mode == "colocated" else "each engine GPU"
        if kv <= 0:
            best.errors.append(f"SGLang: its weights ({w / GIB:.1f} GiB at server_tp_size="
                              f"{x.sglang_tp}) exceed mem_fraction_static x card on {where}; "
                              "raise rollout.server_tp_size or rollout.mem_fraction_static")
        else:
            best.notes.append(f"SGLang on {where}: weights {w / GIB:.1f} GiB, KV cache "
                              f"{kv / GIB:.1f} GiB = {toks:,.0f} tokens per engine")
    return best


def with_changes(x: PlanInputs, **changes) -> PlanInputs:
    return dataclasses.replace(x, **changes)
