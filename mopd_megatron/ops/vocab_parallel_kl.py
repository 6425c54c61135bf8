"""Per-position reverse KL(pi_theta || pi_dom) from vocab-parallel student and teacher logits:
Triton kernels, PyTorch reference and two ``torch.autograd.Function`` in one file.

Math (full_vocab). Token t has student logits x and teacher logits y, both sharded over the
vocabulary in the same way (TP rank r holds global ids [r*Vl, (r+1)*Vl)). With temperature
tau, a = x / tau, b = y / tau, p = softmax(a), q = softmax(b) over the REAL vocabulary (ids
>= vocab_size are padding and take no part), and per shard r, relative to the shard maxima:

    m_r = max a,  s_r = sum exp(a - m_r),  w_r = sum exp(a - m_r) (a - b)
    n_r = max b,  o_r = sum exp(b - n_r)
    lse_a = log sum_r exp(m_r) s_r          lse_b = log sum_r exp(n_r) o_r
    E     = sum_r exp(m_r) w_r / sum_r exp(m_r) s_r  = E_p[a - b]
    KL    = sum_v p_v (log p_v - log q_v) = E - (lse_a - lse_b)
    dKL/dx_v = p_v (log p_v - log q_v - KL) / tau = p_v (a_v - b_v - E) / tau

so the backward needs lse_a and E per token (two [T] vectors), no communication, and neither
log-sum-exp of the teacher. The teacher is frozen: it gets no gradient.

Math (topk). The teacher sends, per token, its top-k ids K (global, distinct) and their
log-probs l_i = log q_i at the same temperature. The KL is taken over k + 1 buckets: the k
tokens and one tail bucket holding everything else,

    P = sum_{i in K} p_i,   r = 1 - P            (student mass outside K)
    Q = sum_{i in K} q_i,   R = 1 - Q            (teacher tail mass)
    KL_k = sum_{i in K} p_i (log p_i - l_i) + r (log max(r, f) - log max(R, f))

with f = ``tail_floor`` (1e-6 by default): a sum of k fp32 probabilities cannot resolve a tail
below about that, so R is floored there (a tail rounded to 0 would give an infinite KL), and
so is r inside its log, so that k = |vocab| (r = R = 0 up to rounding) gives the full KL
(to fp32 rounding: the tail term then vanishes). With bucket log-ratios d_i = log p_i - l_i (i in K) and d_tail = log max(r, f) -
log max(R, f) for every other token, and c the derivative of KL_k w.r.t. a bucket's mass minus
1 (c = d, except c_tail = d_tail - 1 when r < f), the gradient is again local:

    dKL_k/dx_v = p_v (c_{bucket(v)} - C) / tau,   C = sum_{i in K} p_i c_i + r c_tail (= KL_k
                                                  when r >= f)

written as a dense pass with c_tail for every token plus a fix-up of the k entries of K that
live on this rank.

Forward steps (mirrored in both backends; steps 2-4 are shared code):
  1. per-shard statistics over the local vocab: the student's max and sum-exp (full_vocab:
     also the teacher's, and w = sum exp(a - m)(a - b)); online over vocab blocks in the
     Triton kernel, one fp32 chunk of token rows at a time in the reference.
  2. topk only: the student's tempered logits at the teacher's top-k ids in this shard
     (0 for ids on other ranks) [T, k].
  3. combine across the TP group: exactly two all-reduces, MAX of the maxima ([2, T] full,
     [T] topk), then SUM of the rescaled sums stacked with w ([3, T]) or with the top-k
     logits ([T, 1 + k]); none on a single rank.
  4. lse, KL and the per-token backward coefficients.
Backward steps:
  5. p = exp(a - lse_a) recomputed from the student logits (and b re-read for full_vocab).
  6. grad = g / tau * p * (a - b - E)  [full] or g / tau * p * (c_tail - C) [topk], written
     once into one new tensor of the logits' dtype (or into the logits, ``inplace_grad``);
     topk then sets its k entries to g / tau * p_i (c_i - C) (Triton: a second small kernel
     overwrites them; reference: p_i (c_i - c_tail) is added in fp32 before the one write).

Memory: never a [T, Vl] fp32 copy. Triton: [T] statistics, [T, k] for topk. Reference: a few
fp32 chunks of at most 2^18 elements (2^24 on GPU). Held between the teacher's scoring and the
student's backward: full_vocab with a teacher tensor, the teacher's logit shard [T, Vl] in its
own dtype (the backward re-reads it); with a teacher callable (e.g. ``lm_head_logits``: the
teacher's final hidden states [T, hidden] and its LM-head shard [Vl, hidden]) only what the
callable closes over, at the price of computing each chunk of teacher logits twice (forward
and backward); topk: the ids and log-probs, O(T x k). The callable is asked for token rows,
not vocab columns, so one [chunk, Vl] block of teacher logits exists at a time (chunk =
``chunk_tokens``, else 2^18 / Vl rows on CPU, 2^24 / Vl on GPU); streaming vocab columns would
need the LM-head matmul fused into the kernels, which this op does not do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.distributed as dist

from .vocab_parallel_logprobs import _CHUNK_ELEMS, _launch_cfg, resolve_backend, tp_rank_and_size

DEFAULT_TAIL_FLOOR = 1e-6
# teacher(start, stop) -> teacher logits of token rows [start, stop): [stop - start, Vl]
TeacherRows = Callable[[int, int], torch.Tensor]
Teacher = Union[torch.Tensor, TeacherRows]


# ----------------------------------------------------------------------------- Triton kernels
@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """Built on first use: triton is imported only when the Triton path runs (after
    TRITON_INTERPRET has been set by whoever wants the CPU interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kl_stats_kernel(a_ptr, stride_a, b_ptr, stride_b, n_real, inv_temp,
                        ma_ptr, sa_ptr, mb_ptr, sb_ptr, w_ptr,
                        HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        # Step 1 for one token row, online over vocab blocks. Only the n_real real columns
        # are read: padding is never loaded (it acts as -inf in both distributions).
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        offs = tl.arange(0, BLOCK_V)
        m_a = float("-inf")
        s_a = 0.0
        m_b = float("-inf")
        s_b = 0.0
        w = 0.0
        for start in range(0, n_real, BLOCK_V):
            cols = start + offs
            real = cols < n_real
            a = tl.load(a_row + cols, mask=real, other=float("-inf")).to(tl.float32) * inv_temp
            ma_new = tl.maximum(m_a, tl.max(a, 0))
            # A block of only -inf keeps the max at -inf: shift by 0 then, not by -inf (NaN).
            ma_ref = tl.where(ma_new == float("-inf"), 0.0, ma_new)
            ea = tl.exp(a - ma_ref)  # [BLOCK_V]; 0 on -inf lanes
            scale_a = tl.exp(m_a - ma_ref)  # first block: exp(-inf) = 0
            s_a = s_a * scale_a + tl.sum(ea, 0)
            if HAS_TEACHER:
                b = tl.load(b_row + cols, mask=real, other=float("-inf")).to(tl.float32) * inv_temp
                # Lanes with p = 0 add nothing (and -inf - -inf would be NaN).
                w = w * scale_a + tl.sum(tl.where(ea > 0, ea * (a - b), 0.0), 0)
                mb_new = tl.maximum(m_b, tl.max(b, 0))
                mb_ref = tl.where(mb_new == float("-inf"), 0.0, mb_new)
                s_b = s_b * tl.exp(m_b - mb_ref) + tl.sum(tl.exp(b - mb_ref), 0)
                m_b = mb_new
            m_a = ma_new
        tl.store(ma_ptr + row, m_a)
        tl.store(sa_ptr + row, s_a)
        if HAS_TEACHER:
            tl.store(mb_ptr + row, m_b)
            tl.store(sb_ptr + row, s_b)
            tl.store(w_ptr + row, w)

    @triton.jit
    def kl_grad_kernel(a_ptr, stride_a, b_ptr, stride_b, out_ptr, stride_out, n_cols, n_real,
                       inv_temp, lse_ptr, c_ptr, g_ptr,
                       HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        # Steps 5-6 for one token row; out_ptr may equal a_ptr (each element is read before
        # the same program overwrites it). g is the upstream gradient times 1/tau.
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        out_row = out_ptr + row * stride_out
        g = tl.load(g_ptr + row)
        lse = tl.load(lse_ptr + row)
        c = tl.load(c_ptr + row)  # full: E = E_p[a - b]; topk: c_tail - C
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            real = cols < n_real
            a = tl.load(a_row + cols, mask=real, other=float("-inf")).to(tl.float32) * inv_temp
            p = tl.exp(a - lse)  # 0 on padding
            if HAS_TEACHER:
                b = tl.load(b_row + cols, mask=real, other=float("-inf")).to(tl.float32) * inv_temp
                d = a - b - c
            else:
                d = c
            # Exactly 0 where p = 0 (padding, -inf logits) or g = 0 (masked tokens), even when
            # the other factor is inf or NaN.
            grad = tl.where(g != 0, tl.where(p > 0, g * p * d, 0.0), 0.0)
            tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=cols < n_cols)

    @triton.jit
    def topk_fixup_kernel(out_ptr, stride_out, idx_ptr, stride_idx, val_ptr, stride_val, k,
                          vocab_start, n_cols, BLOCK_K: tl.constexpr):
        # Step 6 (topk): out[row, id - vocab_start] = val for the ids that live on this rank.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        for start in range(0, k, BLOCK_K):
            j = start + offs
            inb = j < k
            local = tl.load(idx_ptr + row * stride_idx + j, mask=inb, other=-1) - vocab_start
            val = tl.load(val_ptr + row * stride_val + j, mask=inb, other=0.0)
            inside = inb & (local >= 0) & (local < n_cols)
            tl.store(out_ptr + row * stride_out + local, val.to(out_ptr.dtype.element_ty),
                     mask=inside)

    return triton, kl_stats_kernel, kl_grad_kernel, topk_fixup_kernel


def _stats_triton(x, y, n_real, inv_temp, out, block_v):
    """Step 1 on the Triton kernel for rows x [c, Vl] (y [c, Vl] or None) into the [c] views
    of ``out`` (m_a, s_a, m_b, s_b, w)."""
    triton, stats_kernel, _, _ = _triton_kernels()
    block, warps = _launch_cfg(triton, x.shape[1], block_v)
    b = x if y is None else y
    stats_kernel[(x.shape[0],)](x, x.stride(0), b, b.stride(0), n_real, inv_temp, *out,
                                HAS_TEACHER=y is not None, BLOCK_V=block, num_warps=warps)


def _grad_triton(x, y, out, n_real, inv_temp, lse, c, g, block_v):
    """Steps 5-6 (dense part) on the Triton kernel; writes every element of ``out``."""
    triton, _, grad_kernel, _ = _triton_kernels()
    block, warps = _launch_cfg(triton, x.shape[1], block_v)
    b = x if y is None else y
    grad_kernel[(x.shape[0],)](x, x.stride(0), b, b.stride(0), out, out.stride(0), x.shape[1],
                               n_real, inv_temp, lse, c, g, HAS_TEACHER=y is not None,
                               BLOCK_V=block, num_warps=warps)


def _fixup_triton(out, ids, vals, vocab_start):
    """Step 6 (topk): exact values at the top-k entries on this rank."""
    triton, _, _, fixup_kernel = _triton_kernels()
    k = ids.shape[1]
    block = min(1024, triton.next_power_of_2(max(k, 16)))
    fixup_kernel[(out.shape[0],)](out, out.stride(0), ids, ids.stride(0), vals, vals.stride(0),
                                  k, vocab_start, out.shape[1], BLOCK_K=block)


# ------------------------------------------------------------------- PyTorch reference steps
def _tempered(x, n_real, inv_temp):
    """[c, Vl] fp32 copy of x / tau with the padding columns at -inf (one chunk)."""
    a = x.to(torch.float32, copy=True)
    if inv_temp != 1.0:
        a.mul_(inv_temp)
    if n_real < a.shape[1]:
        a[:, n_real:] = float("-inf")
    return a


def _max_sumexp(a):
    """m [c] and e = exp(a - m) [c, Vl] (a new buffer); rows of only -inf shift by 0."""
    m = a.amax(dim=1)
    m_ref = torch.where(torch.isneginf(m), 0.0, m)
    return m, (a - m_ref[:, None]).exp_()


def _stats_torch(x, y, n_real, inv_temp, out):
    """Step 1 for rows x [c, Vl] (y [c, Vl] or None) in fp32; at most 4 chunk buffers live."""
    a = _tempered(x, n_real, inv_temp)
    m_a, e = _max_sumexp(a)
    out[0].copy_(m_a)
    out[1].copy_(e.sum(dim=1))
    if y is None:
        return
    b = _tempered(y, n_real, inv_temp)
    m_b, e_b = _max_sumexp(b)  # the same code as the student's: teacher == student is exact
    out[2].copy_(m_b)
    out[3].copy_(e_b.sum(dim=1))
    del e_b
    d = a.sub_(b).masked_fill_(e == 0, 0.0)  # a - b; 0 where p = 0 (-inf - -inf is NaN)
    out[4].copy_(e.mul_(d).sum(dim=1))


def _grad_torch(x, y, out, n_real, inv_temp, lse, c, g, ids=None, delta=None, vocab_start=0):
    """Steps 5-6 for rows x [c, Vl] in fp32, one write into ``out`` (which may be x)."""
    a = _tempered(x, n_real, inv_temp)
    p = a.sub(lse[:, None]).exp_()  # [c, Vl]
    if y is not None:
        d = a.sub_(_tempered(y, n_real, inv_temp)).sub_(c[:, None])  # a - b - E
        grad = p.mul_(d.masked_fill_(p == 0, 0.0))
    else:
        grad = p.mul_(c[:, None])  # c_tail - C for every token ...
        V = x.shape[1]
        local = ids - vocab_start
        inside = (local >= 0) & (local < V)
        # ... + p_i (c_i - c_tail) at the top-k ids on this rank (0 added at a clamped column
        # elsewhere: no data-dependent shapes, no host sync)
        grad.scatter_add_(1, local.clamp(0, V - 1), torch.where(inside, delta, 0.0))
    grad.mul_(g[:, None]).masked_fill_((g == 0)[:, None], 0.0)  # masked rows: exactly 0
    out.copy_(grad)


# ----------------------------------------------------------------------- shared steps 2-4
def _all_reduce(t, op, group):
    dist.all_reduce(t, op=op, group=group)


def _rescale(m, M):
    """exp(m - M) with 0 (not NaN) for shards or rows whose max is -inf."""
    return torch.exp(m - torch.where(torch.isneginf(M), 0.0, M))


def _combine_full(st, group):
    """Steps 3-4 (full_vocab). st [5, T] = (m_a, s_a, m_b, s_b, w) of this shard ->
    lse_a, E, KL [T]."""
    m, s, w = st[[0, 2]], st[[1, 3]], st[4]  # [2, T], [2, T], [T]
    if group is not None:
        M = m.clone()
        _all_reduce(M, dist.ReduceOp.MAX, group)  # all-reduce 1 of 2: [2, T]
        scale = _rescale(m, M)
        parts = torch.cat([s * scale, (w * scale[0])[None]])  # [3, T]
        _all_reduce(parts, dist.ReduceOp.SUM, group)  # all-reduce 2 of 2: [3, T]
        m, s, w = M, parts[:2], parts[2]
    lse = m + torch.log(s)  # [2, T]: student, teacher
    E = w / s[0]
    return lse[0], E, E - (lse[0] - lse[1])


def _combine_topk(m, s, a_k, group):
    """Steps 3-4 (topk), communication part: local m, s [T] and top-k logits a_k [T, k]
    (0 off this shard) -> global lse [T], a_k [T, k]."""
    if group is not None:
        M = m.clone()
        _all_reduce(M, dist.ReduceOp.MAX, group)  # all-reduce 1 of 2: [T]
        parts = torch.cat([(s * _rescale(m, M))[:, None], a_k], 1)  # [T, 1 + k]
        _all_reduce(parts, dist.ReduceOp.SUM, group)  # all-reduce 2 of 2: [T, 1 + k]
        m, s, a_k = M, parts[:, 0], parts[:, 1:]
    return m + torch.log(s), a_k


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, as -expm1: accurate for masses near 1."""
    return -torch.expm1(x.clamp(max=0.0))


def _topk_terms(lse, a_k, lq_k, tail_floor):
    """Step 4 (topk), in float64 on [T, k] (cheap next to the vocab pass): the tail masses
    1 - sum exp(.) cancel, and a teacher tail R near the floor would lose most of its digits
    in fp32. -> KL, c_tail - C [T] fp32; p_i (c_i - C), p_i (c_i - c_tail) [T, k] fp32."""
    lse, a_k, lq_k = lse.double(), a_k.double(), lq_k.double()
    lp_k = a_k - lse[:, None]  # [T, k] log pi_theta at the teacher's top-k
    p_k = lp_k.exp()
    r = _log1mexp(torch.logsumexp(lp_k, 1))  # [T] student tail mass 1 - P
    R = _log1mexp(torch.logsumexp(lq_k, 1))  # [T] teacher tail mass 1 - Q
    d_tail = r.clamp(min=tail_floor).log() - R.clamp(min=tail_floor).log()
    c_k = lp_k - lq_k  # [T, k] d_i = c_i
    head = torch.where(p_k > 0, p_k * c_k, 0.0)
    kl = head.sum(1) + r * d_tail
    c_tail = d_tail - (r < tail_floor).double()  # r log f is linear in r: derivative 1 lower
    C = head.sum(1) + r * c_tail
    fix = torch.where(p_k > 0, p_k * (c_k - C[:, None]), 0.0)
    delta = torch.where(p_k > 0, p_k * (c_k - c_tail[:, None]), 0.0)
    return kl.float(), (c_tail - C).float(), fix.float(), delta.float()


def _local_topk_logits(x, ids, vocab_start, inv_temp):
    """Step 2: x[t, id] / tau for the top-k ids in this shard, 0 elsewhere. [T, k] fp32."""
    V = x.shape[1]
    local = ids - vocab_start
    inside = (local >= 0) & (local < V)
    a_k = x.gather(1, local.clamp(0, V - 1)).float()
    if inv_temp != 1.0:
        a_k = a_k * inv_temp
    return torch.where(inside, a_k, 0.0)


# ------------------------------------------------------------------------ checks and plumbing
def _check_common(x, mask, temperature, vocab_size, v_global, tail_floor=None):
    if x.dim() != 2:
        raise ValueError(f"student_logits: expected [T, V_local], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"student_logits: dtype {x.dtype} not supported (fp32/bf16/fp16)")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature={temperature}: must be finite and > 0")
    if vocab_size is not None and not 0 < vocab_size <= v_global:
        raise ValueError(f"vocab_size={vocab_size}: must lie in (0, {v_global}] (V_local "
                         f"{x.shape[1]} x TP size)")
    if mask is not None and mask.shape != x.shape[:1]:
        raise ValueError(f"mask: expected shape [{x.shape[0]}], got {tuple(mask.shape)}")
    if tail_floor is not None and not 0 < tail_floor < 1:
        raise ValueError(f"tail_floor={tail_floor}: must lie in (0, 1)")


def _check_teacher_chunk(y, x_rows, where):
    if not isinstance(y, torch.Tensor) or y.shape != x_rows.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{where}: expected teacher logits of shape {tuple(x_rows.shape)} "
                         f"(the student's rows and vocab shard), got {shape}")
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{where}: dtype {y.dtype} not supported (fp32/bf16/fp16)")


def _check_topk(x, ids, lq, mask, vocab_size):
    T = x.shape[0]
    if ids.dim() != 2 or ids.shape[0] != T or ids.shape[1] < 1:
        raise ValueError(f"topk_ids: expected [{T}, k >= 1], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids: expected integer global vocab ids, got {ids.dtype}")
    if lq.shape != ids.shape or not lq.is_floating_point():
        raise ValueError(f"topk_logprobs: expected float [{T}, {ids.shape[1]}] like topk_ids, "
                         f"got {lq.dtype} {tuple(lq.shape)}")
    if T == 0:
        return
    live = torch.ones(T, dtype=torch.bool, device=x.device) if mask is None else mask
    srt = ids.sort(1).values
    dup = ((srt[:, 1:] == srt[:, :-1]).any(1) & live).any()
    lo = torch.where(live, ids.amin(1), 0).amin()
    hi = torch.where(live, ids.amax(1), 0).amax()
    lo, hi, dup = torch.stack([lo, hi, dup.long()]).tolist()  # one host sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"topk_ids: ids must lie in [0, {vocab_size}) (the real vocabulary), "
                         f"got min {lo} max {hi}")
    if dup:
        raise ValueError("topk_ids: a token row repeats an id (the top-k must be distinct)")


@dataclass(frozen=True)
class _Cfg:
    tp_group: object
    inv_temp: float
    vocab_start: int
    n_real: int  # real (non-padding) columns of this shard
    backend: str
    inplace_grad: bool
    rows: int  # token rows per chunk (reference path, or the teacher callable)
    block_v: int | None


def _make_cfg(x, tp_group, temperature, vocab_size, backend, inplace_grad, chunk_tokens,
              block_v):
    rank, size = tp_rank_and_size(tp_group)
    V = x.shape[1]
    vocab_size = V * size if vocab_size is None else vocab_size
    n_real = max(0, min(V, vocab_size - rank * V))
    elems = _CHUNK_ELEMS.get(x.device.type, _CHUNK_ELEMS["cuda"])
    rows = max(1, chunk_tokens or elems // max(V, 1))
    return _Cfg(tp_group if size > 1 else None, 1.0 / temperature, rank * V, n_real,
                resolve_backend(backend, x), inplace_grad, rows, block_v), vocab_size


def _row_chunks(T, cfg, teacher_is_tensor):
    """Token-row ranges: one launch on Triton with a teacher tensor (or none), chunks of
    ``cfg.rows`` otherwise (the reference path, or a teacher callable)."""
    step = T if cfg.backend == "triton" and teacher_is_tensor else cfg.rows
    return [(i, min(i + max(step, 1), T)) for i in range(0, T, max(step, 1))]


def _teacher_rows(teacher, x, i, j):
    if isinstance(teacher, torch.Tensor):
        return teacher[i:j]
    with torch.no_grad():
        y = teacher(i, j)
    _check_teacher_chunk(y, x[i:j], f"teacher({i}, {j})")
    return y


def _contig(t):
    return t if t.stride(1) == 1 else t.contiguous()


def _new_grad_buffer(like: torch.Tensor) -> torch.Tensor:
    # Uninitialised on purpose: both backends write every element (tests poison it with NaN).
    return torch.empty_like(like)


def _grad_out(x, cfg):
    """The buffer the gradient is written into: the logits themselves, or one new tensor."""
    out = x if cfg.inplace_grad else _new_grad_buffer(x)
    if cfg.backend == "triton" and out.stride(1) != 1:
        out = _new_grad_buffer(_contig(x))
    return out


def _upstream(grad_kl, mask, inv_temp):
    g = grad_kl.float().contiguous() * inv_temp  # [T]; a .sum() upstream hands an expanded view
    return g if mask is None else torch.where(mask, g, 0.0)


# ---------------------------------------------------------------------- autograd functions
class FullVocabReverseKL(torch.autograd.Function):
    """student logits [T, Vl], teacher (tensor [T, Vl] or rows callable) -> KL [T] fp32."""

    @staticmethod
    def forward(ctx, x, teacher_tensor, teacher_fn, mask, cfg):
        teacher = teacher_fn if teacher_fn is not None else teacher_tensor
        T = x.shape[0]
        st = torch.empty(5, T, dtype=torch.float32, device=x.device)
        for i, j in _row_chunks(T, cfg, teacher_fn is None):  # 1.
            x_c = x[i:j]
            y_c = _teacher_rows(teacher, x, i, j)
            if cfg.backend == "triton":
                _stats_triton(_contig(x_c), _contig(y_c), cfg.n_real, cfg.inv_temp,
                              st[:, i:j], cfg.block_v)
            else:
                _stats_torch(x_c, y_c, cfg.n_real, cfg.inv_temp, st[:, i:j])
        lse, E, kl = _combine_full(st, cfg.tp_group)  # 3-4.
        if mask is not None:
            kl = torch.where(mask, kl, 0.0)
        ctx.save_for_backward(x, teacher_tensor, mask, lse, E)
        ctx.teacher_fn, ctx.cfg = teacher_fn, cfg
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        x, teacher_tensor, mask, lse, E = ctx.saved_tensors
        cfg = ctx.cfg
        teacher = ctx.teacher_fn if ctx.teacher_fn is not None else teacher_tensor
        g = _upstream(grad_kl, mask, cfg.inv_temp)
        out = _grad_out(x, cfg)  # the only full-size allocation (none with inplace_grad)
        for i, j in _row_chunks(x.shape[0], cfg, ctx.teacher_fn is None):  # 5-6.
            y_c = _teacher_rows(teacher, x, i, j)  # a callable recomputes its chunk
            if cfg.backend == "triton":
                _grad_triton(_contig(x[i:j]), _contig(y_c), out[i:j], cfg.n_real, cfg.inv_temp,
                             lse[i:j], E[i:j], g[i:j], cfg.block_v)
            else:
                _grad_torch(x[i:j], y_c, out[i:j], cfg.n_real, cfg.inv_temp, lse[i:j], E[i:j],
                            g[i:j])
        return out, None, None, None, None


class TopkReverseKL(torch.autograd.Function):
    """student logits [T, Vl], teacher top-k ids / log-probs [T, k] -> KL_k [T] fp32."""

    @staticmethod
    def forward(ctx, x, ids, lq, mask, cfg, tail_floor):
        T = x.shape[0]
        st = torch.empty(5, T, dtype=torch.float32, device=x.device)  # rows 2-4 unused
        for i, j in _row_chunks(T, cfg, True):  # 1.
            if cfg.backend == "triton":
                _stats_triton(_contig(x[i:j]), None, cfg.n_real, cfg.inv_temp, st[:, i:j],
                              cfg.block_v)
            else:
                _stats_torch(x[i:j], None, cfg.n_real, cfg.inv_temp, st[:, i:j])
        a_k = _local_topk_logits(x, ids, cfg.vocab_start, cfg.inv_temp)  # 2.
        lse, a_k = _combine_topk(st[0], st[1], a_k, cfg.tp_group)  # 3.
        kl, c_row, fix, delta = _topk_terms(lse, a_k, lq, tail_floor)  # 4.
        if mask is not None:
            kl = torch.where(mask, kl, 0.0)
        ctx.save_for_backward(x, ids, mask, lse, c_row, fix if cfg.backend == "triton" else delta)
        ctx.cfg = cfg
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        x, ids, mask, lse, c_row, coef_k = ctx.saved_tensors
        cfg = ctx.cfg
        g = _upstream(grad_kl, mask, cfg.inv_temp)
        out = _grad_out(x, cfg)
        if cfg.backend == "triton":
            xc = _contig(x)
            _grad_triton(xc, None, out, cfg.n_real, cfg.inv_temp, lse, c_row, g,
                         cfg.block_v)  # 5-6.
            if x.shape[0] > 0:
                vals = torch.where(g[:, None] != 0, g[:, None] * coef_k, 0.0)  # [T, k]
                _fixup_triton(out, ids, vals, cfg.vocab_start)  # 6. exact top-k entries
        else:
            for i, j in _row_chunks(x.shape[0], cfg, True):  # 5-6.
                _grad_torch(x[i:j], None, out[i:j], cfg.n_real, cfg.inv_temp, lse[i:j],
                            c_row[i:j], g[i:j], ids[i:j], coef_k[i:j], cfg.vocab_start)
        return out, None, None, None, None, None


# ------------------------------------------------------------------------------ public API
def reverse_kl(student_logits: torch.Tensor, teacher: Teacher, tp_group=None, *,
               temperature: float = 1.0, vocab_size: int | None = None,
               mask: torch.Tensor | None = None, backend: str = "auto",
               inplace_grad: bool = False, chunk_tokens: int | None = None,
               block_v: int | None = None) -> torch.Tensor:
    """Exact per-position KL(pi_theta || pi_dom) over the vocabulary: [T] fp32,
    differentiable w.r.t. ``student_logits`` only (the teacher is frozen).

    student_logits [T, V_local] (fp32/bf16/fp16) hold global ids [rank*V_local,
    (rank+1)*V_local) of ``tp_group``. ``teacher``: the teacher's logits over the same rows and
    vocab shard, either a tensor [T, V_local] or a callable ``teacher(start, stop)`` returning
    the rows [start, stop) (called chunk by chunk, under no_grad, twice: forward and backward;
    it must return the same values both times), e.g. ``lm_head_logits(hidden, weight)``.
    pi = softmax(logits / temperature) over the ids < ``vocab_size`` (default: all columns;
    larger ids are vocabulary padding and ignored whatever their values). ``mask`` [T] bool:
    False rows get KL 0 and a gradient of exactly 0 (their logits may be anything). Tokens
    with an upstream gradient of 0 also get exactly 0. Weighting is the caller's: e.g.
    ``(coef * reverse_kl(...)).sum()`` with a detached coef [T].
    Two all-reduces over ``tp_group`` in the forward, none in the backward. ``backend``:
    "auto" (Triton on CUDA, reference elsewhere), "triton", "torch". ``inplace_grad`` lets the
    backward overwrite ``student_logits`` with the gradient.
    """
    teacher_fn = None if isinstance(teacher, torch.Tensor) else teacher
    if teacher_fn is not None and not callable(teacher_fn):
        raise ValueError(f"teacher: expected a tensor [T, V_local] or a callable "
                         f"(start, stop) -> rows, got {type(teacher).__name__}")
    _, size = tp_rank_and_size(tp_group)
    x = student_logits
    _check_common(x, mask, temperature, vocab_size, x.shape[1] * size if x.dim() == 2 else 0)
    if teacher_fn is None:
        _check_teacher_chunk(teacher, x, "teacher")
    cfg, _ = _make_cfg(x, tp_group, temperature, vocab_size, backend, inplace_grad,
                       chunk_tokens, block_v)
    mask = None if mask is None else mask.bool()
    return FullVocabReverseKL.apply(x, teacher if teacher_fn is None else None, teacher_fn,
                                    mask, cfg)


def topk_reverse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                    topk_logprobs: torch.Tensor, tp_group=None, *, temperature: float = 1.0,
                    vocab_size: int | None = None, mask: torch.Tensor | None = None,
                    tail_floor: float = DEFAULT_TAIL_FLOOR, backend: str = "auto",
                    inplace_grad: bool = False, chunk_tokens: int | None = None,
                    block_v: int | None = None) -> torch.Tensor:
    """Reverse KL over the teacher's top-k tokens plus one tail bucket: [T] fp32,
    differentiable w.r.t. ``student_logits`` only.

    KL_k = sum_{i in K} p_i (log p_i - l_i) + r (log max(r, f) - log max(R, f)), with p the
    student's softmax(logits / temperature) over the ids < ``vocab_size``, K = ``topk_ids``
    [T, k] (global ids, distinct per row; any order), l = ``topk_logprobs`` [T, k] the
    teacher's log-probs of them at the same temperature, r = 1 - sum_K p_i the student's mass
    outside K, R = 1 - sum_K exp(l_i) the teacher's tail mass and f = ``tail_floor``. k = the
    whole vocabulary gives the full KL. Rows with ``mask`` False: KL 0, gradient exactly 0,
    ids and log-probs may be anything. Every TP rank passes the same ids and log-probs; each
    gathers the student logits of the ids in its shard. Two all-reduces in the forward
    ([T] MAX, [T, 1 + k] SUM), none in the backward. Other options as ``reverse_kl``.
    """
    _, size = tp_rank_and_size(tp_group)
    x = student_logits
    _check_common(x, mask, temperature, vocab_size, x.shape[1] * size if x.dim() == 2 else 0,
                  tail_floor)
    cfg, v_real = _make_cfg(x, tp_group, temperature, vocab_size, backend, inplace_grad,
                            chunk_tokens, block_v)
    mask = None if mask is None else mask.bool()
    _check_topk(x, topk_ids, topk_logprobs, mask, v_real)
    ids = topk_ids.long()
    lq = topk_logprobs
    if mask is not None:  # garbage on masked rows stays out of the arithmetic
        ids = torch.where(mask[:, None], ids, 0)
        lq = torch.where(mask[:, None], lq, -1.0)
    return TopkReverseKL.apply(x, ids.contiguous(), lq, mask, cfg, tail_floor)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> TeacherRows:
    """A ``teacher`` callable for ``reverse_kl``: rows [start, stop) of hidden @ weight.T.

    hidden [T, H]: the teacher's final (normed) hidden states, the LM head's input; weight
    [V_local, H]: this rank's shard of its LM head. Only these are held between the teacher's
    forward and the student's loss, O(T x H); each [chunk, V_local] block of teacher logits is
    computed when the op reaches it, in the forward and again in the backward.
    """
    def rows(start: int, stop: int) -> torch.Tensor:
        return hidden[start:stop] @ weight.t()
    return rows
