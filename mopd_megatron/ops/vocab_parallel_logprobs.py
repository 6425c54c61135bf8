"""Log-probabilities of sampled tokens from vocab-parallel logits: Triton kernel, PyTorch
reference and one ``torch.autograd.Function`` in one file.

Math. Token t has logits x_t sharded over the vocabulary: TP rank r holds global ids
[r*Vl, (r+1)*Vl). With m_r = max over shard r, s_r = sum_{v in r} exp(x_v - m_r),
u_r = sum_{v in r} exp(x_v - m_r) (x_v - m_r) and z_r = x_y if the target y lies in shard r
else 0:

    M   = max_r m_r                          S = sum_r exp(m_r - M) s_r
    lse = M + log S                          logp = sum_r z_r - lse
    H   = lse - sum_v p_v x_v                (entropy, p = softmax over the FULL vocabulary)
        = log S - sum_r exp(m_r - M) (u_r + (m_r - M) s_r) / S
    d logp / d x_v = onehot(y)_v - p_v,      p_v = exp(x_v - lse)

Once lse is known every rank's gradient is local, so the backward needs no communication and
never rebuilds the full softmax: it recomputes p from the logits and the saved lse [T].

Forward steps (mirrored in both backends; steps 2-4 are the same code for both):
  1. max, sum-exp (and the entropy partial u) over the local shard: online over vocab blocks in
     the Triton kernel, one fp32 chunk of tokens at a time in the reference.
  2. local target logit z (0 when the target lives on another rank).
  3. combine across the TP group: one MAX all-reduce of m, then one SUM all-reduce of the
     stacked rescaled [s, z(, u)]; skipped on a single rank.
  4. lse = M + log S, logp = z - lse, entropy.
Backward steps:
  5. p = exp(x - lse) from the saved lse.
  6. grad = g * (onehot - p), written into the logits buffer (``inplace_grad``) or into exactly
     one new tensor of the logits' dtype.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.distributed as dist

BACKENDS = ("auto", "triton", "torch")
# Reference path: fp32 elements per chunk buffer (at most 2 live at once). On CPU a cache-sized
# chunk keeps the 4-5 elementwise passes in L2 (measured 1.4x faster than 16 MiB chunks at
# V=152064); on GPU larger chunks amortise the per-chunk kernel launches.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 24}  # 1 MiB / 64 MiB of fp32


# ----------------------------------------------------------------------------- Triton kernels
@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """Build the kernels on first use: triton is imported only when the Triton path runs (and
    after TRITON_INTERPRET has been set by whoever wants the CPU interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def shard_stats_kernel(x_ptr, stride_x, n_cols, m_ptr, s_ptr, u_ptr,
                           WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
        # One program per token row; online max / sum-exp over the local shard (step 1).
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        offs = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = 0.0
        u = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            # A block (or a whole shard: vocabulary padding at TP > 1) of only -inf keeps
            # m_new = -inf; shifting by it would give exp(-inf + inf) = NaN, by 0 gives 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            e = tl.exp(x - m_ref)  # padded lanes: exp(-inf) = 0
            scale = tl.exp(m - m_ref)  # first block: exp(-inf) = 0
            if WANT_ENTROPY:
                # u is kept relative to the running max: re-base it when the max moves.
                shifted = tl.where(e > 0, x - m_ref, 0.0)
                dm = tl.where(s > 0, m - m_new, 0.0)  # s == 0 before the first finite block
                u = scale * (u + dm * s) + tl.sum(e * shifted, 0)
            s = s * scale + tl.sum(e, 0)
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        if WANT_ENTROPY:
            tl.store(u_ptr + row, u)

    @triton.jit
    def grad_kernel(x_ptr, stride_x, out_ptr, stride_out, n_cols, tgt_ptr, vocab_start,
                    lse_ptr, g_ptr, BLOCK_V: tl.constexpr):
        # Steps 5-6 for one token row; out_ptr may equal x_ptr (each element is read before
        # the same program overwrites it).
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        out_row = out_ptr + row * stride_out
        g = tl.load(g_ptr + row)
        lse = tl.load(lse_ptr + row)
        tgt = tl.load(tgt_ptr + row) - vocab_start  # outside [0, n_cols) on other ranks
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            grad = -g * tl.exp(x - lse)
            grad = tl.where(cols == tgt, grad + g, grad)
            tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, shard_stats_kernel, grad_kernel


def _launch_cfg(triton, n_cols: int, block_v: int | None) -> tuple[int, int]:
    block = block_v or min(4096, triton.next_power_of_2(max(n_cols, 16)))
    return block, (8 if block >= 2048 else 4)


def _shard_stats_triton(logits, want_entropy, block_v):
    """Step 1 on the Triton kernel. logits [T, Vl] -> m, s, u [T] fp32."""
    triton, stats_kernel, _ = _triton_kernels()
    T, V = logits.shape
    m = torch.empty(T, dtype=torch.float32, device=logits.device)
    s, u = torch.empty_like(m), torch.empty_like(m)
    block, warps = _launch_cfg(triton, V, block_v)
    stats_kernel[(T,)](logits, logits.stride(0), V, m, s, u,
                       WANT_ENTROPY=want_entropy, BLOCK_V=block, num_warps=warps)
    return m, s, (u if want_entropy else None)


def _grad_triton(logits, targets, lse, g, vocab_start, out, block_v):
    """Steps 5-6 on the Triton kernel; writes every element of ``out``."""
    triton, _, grad_kernel = _triton_kernels()
    T, V = logits.shape
    block, warps = _launch_cfg(triton, V, block_v)
    grad_kernel[(T,)](logits, logits.stride(0), out, out.stride(0), V, targets, vocab_start,
                      lse, g, BLOCK_V=block, num_warps=warps)


# ------------------------------------------------------------------- PyTorch reference steps
def _chunk_rows(logits: torch.Tensor, chunk_tokens: int | None) -> int:
    elems = _CHUNK_ELEMS.get(logits.device.type, _CHUNK_ELEMS["cuda"])
    return max(1, chunk_tokens or elems // max(logits.shape[1], 1))


def _shard_stats_torch(logits, want_entropy, chunk_tokens):
    """Step 1 in fp32 token chunks: never more than two [chunk, Vl] fp32 buffers alive."""
    T, V = logits.shape
    m = torch.empty(T, dtype=torch.float32, device=logits.device)
    s, u = torch.empty_like(m), (torch.empty_like(m) if want_entropy else None)
    step = _chunk_rows(logits, chunk_tokens)
    for i in range(0, T, step):
        x = logits[i:i + step]  # [c, Vl] in the caller's dtype
        m_c = x.amax(dim=1).float()  # [c]
        # A row of only -inf (a shard of pure vocabulary padding at TP > 1) has m = -inf:
        # shift it by 0 instead (exp(-inf) = 0, s = 0), not by -inf (NaN).
        m_ref = torch.where(torch.isneginf(m_c), 0.0, m_c)
        sh = x.to(torch.float32, copy=True).sub_(m_ref[:, None])  # [c, Vl] fp32: x - m
        e = sh.exp() if want_entropy else sh.exp_()  # entropy needs x - m kept as well
        m[i:i + step], s[i:i + step] = m_c, e.sum(dim=1)
        if want_entropy:
            # exp(-inf) * (-inf) would be NaN for -inf logits; those terms are 0.
            u[i:i + step] = torch.where(e > 0, e.mul_(sh), 0.0).sum(dim=1)
    return m, s, u


def _grad_torch(logits, targets, lse, g, vocab_start, out, chunk_tokens):
    """Steps 5-6 in fp32 token chunks; ``out`` may be ``logits`` itself."""
    T, V = logits.shape
    step = _chunk_rows(logits, chunk_tokens)
    for i in range(0, T, step):
        x = logits[i:i + step]
        g_c = g[i:i + step]
        p = x.to(torch.float32, copy=True).sub_(lse[i:i + step, None]).exp_()  # [c, Vl]
        grad = p.mul_(-g_c[:, None])  # -g * p
        local = targets[i:i + step] - vocab_start
        inside = (local >= 0) & (local < V)
        # + g * onehot(y) where y is on this rank (adds 0 to a clamped column elsewhere; no
        # data-dependent shapes, so no host sync on GPU)
        grad.scatter_add_(1, local.clamp(0, V - 1)[:, None],
                          torch.where(inside, g_c, 0.0)[:, None])
        out[i:i + step].copy_(grad)


# ----------------------------------------------------------------------- shared steps 2-4
def tp_rank_and_size(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _local_target_logit(logits, targets, vocab_start):
    """Step 2: x[y] when y is in this rank's shard, else 0. [T] fp32."""
    V = logits.shape[1]
    local = targets - vocab_start
    inside = (local >= 0) & (local < V)
    z = logits.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1).float()
    return torch.where(inside, z, 0.0)


def _combine(m, s, z, u, tp_group):
    """Steps 3-4. [T] partials -> lse, logp, entropy (None unless u given). tp_group None:
    single-rank fast path, no communication."""
    if tp_group is not None:
        M = m.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=tp_group)  # all-reduce 1 of 2
        scale = torch.exp(m - M)  # 0 for a shard whose max is -inf
        parts = [s * scale, z]
        if u is not None:
            # Re-base u from the local max m to the global max M; guard -inf * 0.
            parts.append(torch.where(s > 0, (u + (m - M) * s) * scale, 0.0))
        stacked = torch.stack(parts)  # [2 or 3, T]
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)  # all-reduce 2 of 2
        m, s, z = M, stacked[0], stacked[1]
        u = stacked[2] if u is not None else None
    log_s = torch.log(s)
    lse = m + log_s
    logp = z - lse
    entropy = (log_s - u / s) if u is not None else None
    return lse, logp, entropy


# ------------------------------------------------------------------------ backend plumbing
def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if logits.is_cuda and importlib.util.find_spec("triton") else "torch"
    if backend == "triton" and not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' got CPU logits: run on a GPU, or set TRITON_INTERPRET=1 "
                         "before triton is imported to use the (slow) CPU interpreter")
    return backend


def check_inputs(logits: torch.Tensor, targets: torch.Tensor, v_global: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [T, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits: dtype {logits.dtype} not supported (fp32/bf16/fp16)")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape [{logits.shape[0]}] to match logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets: expected int64 global vocab ids, got {targets.dtype}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())  # one host sync; catches silent garbage
        if lo < 0 or hi >= v_global:
            raise ValueError(f"targets: ids must lie in [0, {v_global}) (V_local "
                             f"{logits.shape[1]} x TP size), got min {lo} max {hi}")


def forward_stats(logits, targets, tp_group, backend, want_entropy, chunk_tokens=None,
                  block_v=None):
    """Steps 1-4 without autograd. Returns lse, logp, entropy-or-None, all [T] fp32."""
    rank, size = tp_rank_and_size(tp_group)
    V = logits.shape[1]
    check_inputs(logits, targets, V * size)
    backend = resolve_backend(backend, logits)
    vocab_start = rank * V
    if backend == "triton" and logits.shape[0] > 0:
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        m, s, u = _shard_stats_triton(logits, want_entropy, block_v)  # 1.
    else:
        m, s, u = _shard_stats_torch(logits, want_entropy, chunk_tokens)  # 1.
    z = _local_target_logit(logits, targets, vocab_start)  # 2.
    return _combine(m, s, z, u, tp_group if size > 1 else None)  # 3-4.


def _new_grad_buffer(like: torch.Tensor) -> torch.Tensor:
    # Uninitialised on purpose: both backends write every element (tests poison it with NaN).
    return torch.empty_like(like)


class VocabParallelLogprobs(torch.autograd.Function):
    """logits [T, Vl] -> (logp [T] fp32, entropy [T] fp32 or empty). Only logp is
    differentiable; entropy is a metric."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, backend, inplace_grad, want_entropy,
                chunk_tokens, block_v):
        lse, logp, entropy = forward_stats(logits, targets, tp_group, backend, want_entropy,
                                           chunk_tokens, block_v)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start = tp_rank_and_size(tp_group)[0] * logits.shape[1]
        ctx.backend = resolve_backend(backend, logits)
        ctx.inplace_grad, ctx.chunk_tokens, ctx.block_v = inplace_grad, chunk_tokens, block_v
        if entropy is None:
            entropy = logp.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 8
        g = grad_logp.float().contiguous()  # [T]; a .sum() upstream hands an expanded view
        # The only full-size allocation of the backward (none at all with inplace_grad).
        out = logits if ctx.inplace_grad else _new_grad_buffer(logits)
        if ctx.backend == "triton" and logits.shape[0] > 0:
            x = logits if logits.stride(1) == 1 else logits.contiguous()
            if out.stride(1) != 1:
                out = x if ctx.inplace_grad else _new_grad_buffer(x)
            _grad_triton(x, targets, lse, g, ctx.vocab_start, out, ctx.block_v)  # 5-6.
        else:
            _grad_torch(logits, targets, lse, g, ctx.vocab_start, out, ctx.chunk_tokens)  # 5-6.
        return out, None, None, None, None, None, None, None
