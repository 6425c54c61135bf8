"""reverse_kl / topk_reverse_kl (mopd_megatron/ops/vocab_parallel_kl.py) against float64 references
written here (plain log_softmax over the full real vocabulary, autograd for the gradient):
forward and backward, fp32 and bf16, temperature, vocabulary padding, masks, the teacher
callable, TP=2 on two gloo processes equal to TP=1, and the Triton kernels under
TRITON_INTERPRET=1 in a child process (this file run as a script).

Tolerances: the KL is computed in fp32 from the (bf16-rounded) inputs, so it matches the
float64 KL of the same inputs to KL_TOL absolute + relative in both dtypes; the gradient is
stored in the logits' dtype: 1e-5 x max|grad| in fp32, 8e-3 x max|grad| in bf16 (2^-8 rounding
of the largest element).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
KL_TOL = 2e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
FLOOR = 1e-6


# ------------------------------------------------------------------ float64 references
def ref_kl(student, teacher, temperature=1.0, vocab_size=None):
    """KL(softmax(x/tau) || softmax(y/tau)) over the first vocab_size columns, float64 [T].
    Differentiable w.r.t. ``student`` when it is a float64 leaf."""
    V = vocab_size or student.shape[1]
    lp = torch.log_softmax(student[:, :V].double() / temperature, -1)
    lq = torch.log_softmax(teacher[:, :V].double() / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ref_topk_kl(student, ids, lq, temperature=1.0, vocab_size=None, floor=FLOOR):
    """The top-k + tail-bucket KL of the op's docstring, float64 [T]."""
    V = vocab_size or student.shape[1]
    lp = torch.log_softmax(student[:, :V].double() / temperature, -1)
    lp_k = lp.gather(1, ids)
    lq = lq.double()
    r = (1 - lp_k.exp().sum(1)).clamp(min=0)
    R = (1 - lq.exp().sum(1)).clamp(min=0)
    tail = r * (r.clamp(min=floor).log() - R.clamp(min=floor).log())
    return (lp_k.exp() * (lp_k - lq)).sum(1) + tail


def ref_grad(fn, student, grad_out, *args, **kw):
    x = student.detach().double().requires_grad_(True)
    kl = fn(x, *args, **kw)
    (kl * grad_out.double()).sum().backward()
    return kl.detach(), x.grad


def make_inputs(T, V, dtype=torch.float32, seed=0, shift=3.0):
    """Student logits, a related teacher (offset by ``shift``: the op must cancel it) and an
    upstream gradient with a few zeros."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(T, V, generator=g)
    y = 0.6 * x + 1.5 * torch.randn(T, V, generator=g) + shift
    grad_out = torch.randn(T, generator=g)
    return x.to(dtype), y.to(dtype), grad_out


def teacher_topk(y, k, temperature=1.0, vocab_size=None, seed=0):
    """The teacher's top-k ids (shuffled: the op must not assume an order) and fp32 log-probs."""
    V = vocab_size or y.shape[1]
    lq = torch.log_softmax(y[:, :V].double() / temperature, -1)
    vals, ids = lq.topk(k, -1)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    return ids[:, perm].contiguous(), vals[:, perm].float()


def assert_kl(got, ref):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, atol=KL_TOL, rtol=KL_TOL)


def assert_grad(got, ref, dtype):
    atol = GRAD_TOL[dtype] * max(ref.abs().max().item(), 1e-30)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)


def run_full(x, y, grad_out, **kw):
    from mopd_megatron.ops import reverse_kl
    leaf = x.clone().requires_grad_(True)
    kl = reverse_kl(leaf, y, **kw)
    (kl * grad_out).sum().backward()
    return kl.detach(), leaf.grad


def run_topk(x, ids, lq, grad_out, **kw):
    from mopd_megatron.ops import topk_reverse_kl
    leaf = x.clone().requires_grad_(True)
    kl = topk_reverse_kl(leaf, ids, lq, **kw)
    (kl * grad_out).sum().backward()
    return kl.detach(), leaf.grad


# ------------------------------------------------------------- single rank, reference path
# (T, V, vocab_size, chunk_tokens): odd shapes, padding columns, T not a multiple of the chunk.
SHAPES = [(37, 101, 96, 8), (5, 7, None, 2), (1, 3, None, None), (64, 300, 257, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("T,V,vocab,chunk", SHAPES)
def test_full_vocab_matches_float64(T, V, vocab, chunk, temperature, dtype):
    x, y, go = make_inputs(T, V, dtype, seed=T + V)
    kl, grad = run_full(x, y, go, temperature=temperature, vocab_size=vocab, backend="torch",
                        chunk_tokens=chunk)
    rkl, rgrad = ref_grad(ref_kl, x, go, y, temperature, vocab)
    assert_kl(kl, rkl)
    assert (rkl > 0.1).all()  # a real signal, not a vacuous match
    assert_grad(grad, rgrad, dtype)  # padding columns: 0 in both


def test_gradient_closed_form_and_temperature_factor():
    """dKL/dx = g p (log p - log q - KL) / tau: the reference's autograd agrees with the
    closed form including 1/tau, and the op's gradient with both."""
    tau = 0.6
    x, y, go = make_inputs(19, 23, seed=1)
    rkl, rgrad = ref_grad(ref_kl, x, go, y, tau)
    lp = torch.log_softmax(x.double() / tau, -1)
    lq = torch.log_softmax(y.double() / tau, -1)
    closed = go.double()[:, None] * lp.exp() * (lp - lq - rkl[:, None]) / tau
    assert torch.allclose(rgrad, closed, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(rgrad, closed * tau, atol=1e-3)  # the factor matters here
    _, grad = run_full(x, y, go, temperature=tau, backend="torch")
    assert_grad(grad, closed, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_equal_to_student_gives_exactly_zero(dtype):
    x, _, go = make_inputs(29, 50, dtype, seed=2)
    for kw in (dict(), dict(temperature=0.7, vocab_size=45, chunk_tokens=4)):
        kl, grad = run_full(x, x.clone(), go, backend="torch", **kw)
        assert (kl == 0).all() and (grad == 0).all(), kw


def test_masked_and_zero_grad_tokens_get_exactly_zero_gradient():
    x, y, go = make_inputs(24, 31, seed=3)
    mask = torch.ones(24, dtype=torch.bool)
    mask[[0, 5, 6, 23]] = False
    x[5], y[6] = float("nan"), float("inf")  # garbage on masked rows must not leak
    x[0, 3], y[23] = float("-inf"), float("-inf")
    y[10, 4] = float("-inf")  # the teacher rules out a token the student likes: KL = inf
    go[10] = 0.0  # ... but with no upstream gradient the row still gets exactly 0
    go[11] = 0.0
    kl, grad = run_full(x, y, go, mask=mask, backend="torch", chunk_tokens=5)
    assert (kl[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert (grad[10] == 0).all() and (grad[11] == 0).all() and kl[10] == float("inf")
    keep = mask.clone()
    keep[10] = False
    rkl, rgrad = ref_grad(ref_kl, x[keep], go[keep], y[keep])
    assert_kl(kl[keep], rkl)
    assert_grad(grad[keep], rgrad, torch.float32)
    assert (grad[keep].abs().sum(1) > 0).sum() == keep.sum() - 1  # all but go = 0 (row 11)


def test_padded_vocab_excluded():
    """Padding columns poisoned with huge values (vocab_size given), or set to -inf as the
    trainer's mask_padded_vocab_ does (vocab_size left out): same KL, zero gradient there."""
    from mopd_megatron.models.builder import mask_padded_vocab_
    T, V, real = 21, 40, 33
    x, y, go = make_inputs(T, V, seed=4)
    x[:, real:], y[:, real:] = 1e4, -1e4
    y[::2, real:] = 3e4
    rkl, rgrad = ref_grad(ref_kl, x, go, y, 0.8, real)
    kl, grad = run_full(x, y, go, temperature=0.8, vocab_size=real, backend="torch",
                        chunk_tokens=4)
    assert_kl(kl, rkl)
    assert (grad[:, real:] == 0).all()
    assert_grad(grad, rgrad, torch.float32)
    xm, ym = mask_padded_vocab_(x.clone(), real, 0), mask_padded_vocab_(y.clone(), real, 0)
    kl2, grad2 = run_full(xm, ym, go, temperature=0.8, backend="torch")
    torch.testing.assert_close(kl2, kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad2, grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("mode", ["full_vocab", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poisoned_grad_buffer_and_inplace(mode, dtype, monkeypatch):
    from mopd_megatron.ops import reverse_kl, topk_reverse_kl
    from mopd_megatron.ops import vocab_parallel_kl as vpk
    x, y, go = make_inputs(33, 57, dtype, seed=5)
    ids, lq = teacher_topk(y, 9, vocab_size=50)
    kw = dict(vocab_size=50, backend="torch", chunk_tokens=7, temperature=1.3)
    if mode == "full_vocab":
        op = lambda logits, **k: reverse_kl(logits, y, **k)  # noqa: E731
        _, rgrad = ref_grad(ref_kl, x, go, y, 1.3, 50)
    else:
        op = lambda logits, **k: topk_reverse_kl(logits, ids, lq, **k)  # noqa: E731
        _, rgrad = ref_grad(ref_topk_kl, x, go, ids, lq, 1.3, 50)
    # An out-of-place buffer prefilled with NaN: every element must be written.
    monkeypatch.setattr(vpk, "_new_grad_buffer", lambda t: torch.full_like(t, float("nan")))
    leaf = x.clone().requires_grad_(True)
    (op(leaf, **kw) * go).sum().backward()
    assert_grad(leaf.grad, rgrad, dtype)
    # In place: the gradient lands in the logits buffer itself.
    leaf = x.clone().requires_grad_(True)
    buf = leaf * 1
    (op(buf, **kw, inplace_grad=True) * go).sum().backward()
    assert_grad(buf.detach(), rgrad, dtype)
    assert_grad(leaf.grad, rgrad, dtype)


def test_teacher_callable_from_hidden_states():
    """The teacher given as hidden states and an LM-head shard: same KL and gradient as the
    materialised logits, never more than chunk_tokens rows of teacher logits at once, and
    called again in the backward (recomputed, not stored)."""
    from mopd_megatron.ops import lm_head_logits
    g = torch.Generator().manual_seed(6)
    T, H, V = 45, 16, 70
    hidden, weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) / 2
    x = 2 * torch.randn(T, V, generator=g)
    go = torch.randn(T, generator=g)
    rows = lm_head_logits(hidden, weight)
    calls = []

    def teacher(i, j):
        calls.append(j - i)
        return rows(i, j)

    kl, grad = run_full(x, teacher, go, backend="torch", chunk_tokens=8, vocab_size=66)
    assert max(calls) <= 8 and sum(calls) == 2 * T  # forward and backward
    y = hidden @ weight.t()
    rkl, rgrad = ref_grad(ref_kl, x, go, y, 1.0, 66)
    assert_kl(kl, rkl)
    assert_grad(grad, rgrad, torch.float32)
    kl_t, grad_t = run_full(x, y, go, backend="torch", chunk_tokens=8, vocab_size=66)
    torch.testing.assert_close(kl, kl_t, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"teacher\(0, 8\): expected teacher logits of shape"):
        run_full(x, lambda i, j: rows(i, j)[:, :-1], go, backend="torch", chunk_tokens=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("T,V,vocab,k,chunk", [(37, 101, 96, 10, 8), (6, 12, None, 1, 4),
                                               (50, 64, 60, 59, None)])
def test_topk_matches_float64(T, V, vocab, k, chunk, temperature, dtype):
    x, y, go = make_inputs(T, V, dtype, seed=T + k)
    ids, lq = teacher_topk(y, k, temperature, vocab, seed=k)
    kl, grad = run_topk(x, ids, lq, go, temperature=temperature, vocab_size=vocab,
                        backend="torch", chunk_tokens=chunk)
    rkl, rgrad = ref_grad(ref_topk_kl, x, go, ids, lq, temperature, vocab)
    assert_kl(kl, rkl)
    assert rkl.mean() > 0.05  # a real signal, not a vacuous match
    assert_grad(grad, rgrad, dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_topk_with_k_equal_to_the_vocabulary_is_the_full_kl(temperature):
    T, V, real = 30, 48, 45
    x, y, go = make_inputs(T, V, seed=7)
    ids, lq = teacher_topk(y, real, temperature, real)
    kw = dict(temperature=temperature, vocab_size=real, backend="torch", chunk_tokens=7)
    kl_k, grad_k = run_topk(x, ids, lq, go, **kw)
    kl, grad = run_full(x, y, go, **kw)
    torch.testing.assert_close(kl_k, kl, atol=KL_TOL, rtol=KL_TOL)
    torch.testing.assert_close(grad_k, grad, rtol=0, atol=1e-5 * grad.abs().max().item())
    assert (grad_k[:, real:] == 0).all()


def test_topk_tail_floor_edges():
    """A teacher whose top-k carry all its mass (R = 0) gives a finite KL (R floored); a
    student with almost no mass outside K (r < floor) takes the linear branch; both match
    the reference, gradient included."""
    T, V, k = 12, 20, 5
    x, y, go = make_inputs(T, V, seed=8)
    ids, _ = teacher_topk(y, k)
    lq = torch.log_softmax(y.gather(1, ids).double(), -1).float()  # sums to 1: R = 0
    x[:6].scatter_(1, ids[:6], 40.0)  # rows 0-5: r ~ e^-35 < floor
    kl, grad = run_topk(x, ids, lq, go, backend="torch")
    rkl, rgrad = ref_grad(ref_topk_kl, x, go, ids, lq)
    assert kl.isfinite().all() and (rkl[6:] > 1.0).all()
    assert_kl(kl, rkl)
    assert_grad(grad, rgrad, torch.float32)


def test_topk_masked_rows_may_hold_garbage():
    x, y, go = make_inputs(16, 25, seed=9)
    ids, lq = teacher_topk(y, 4)
    mask = torch.ones(16, dtype=torch.bool)
    mask[[1, 7]] = False
    ids[1] = -1  # padding ids, duplicates, NaN log-probs: all ignored on masked rows
    ids[7] = ids[7, 0]
    lq[7] = float("nan")
    x[7] = float("nan")
    kl, grad = run_topk(x, ids, lq, go, mask=mask, backend="torch", chunk_tokens=3)
    assert (kl[~mask] == 0).all() and (grad[~mask] == 0).all()
    rkl, rgrad = ref_grad(ref_topk_kl, x[mask], go[mask], ids[mask], lq[mask])
    assert_kl(kl[mask], rkl)
    assert_grad(grad[mask], rgrad, torch.float32)


def test_single_rank_does_no_communication(monkeypatch):
    import torch.distributed as dist
    from mopd_megatron.ops import reverse_kl, topk_reverse_kl
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    x, y, go = make_inputs(10, 12, seed=10)
    ids, lq = teacher_topk(y, 3)
    leaf = x.clone().requires_grad_(True)
    ((reverse_kl(leaf, y, backend="torch") + topk_reverse_kl(leaf, ids, lq, backend="torch"))
     * go).sum().backward()
    assert calls == []


def test_clear_errors():
    from mopd_megatron.ops import reverse_kl, topk_reverse_kl
    x, y, _ = make_inputs(8, 10, seed=11)
    ids, lq = teacher_topk(y, 3)
    cases = [
        (lambda: reverse_kl(x, y[:, :9]), r"teacher: expected teacher logits of shape \(8, 10\)"),
        (lambda: reverse_kl(x, y.long()), r"teacher: dtype torch.int64"),
        (lambda: reverse_kl(x, 3), r"teacher: expected a tensor"),
        (lambda: reverse_kl(x, y, temperature=0.0), r"temperature=0.0"),
        (lambda: reverse_kl(x, y, vocab_size=11), r"vocab_size=11"),
        (lambda: reverse_kl(x, y, mask=torch.ones(7, dtype=torch.bool)), r"mask: expected"),
        (lambda: reverse_kl(x[0], y), r"student_logits: expected \[T, V_local\]"),
        (lambda: topk_reverse_kl(x, ids[:, [0, 0, 1]], lq), r"repeats an id"),
        (lambda: topk_reverse_kl(x, ids + 10, lq), r"ids must lie in \[0, 10\)"),
        (lambda: topk_reverse_kl(x, ids, lq, vocab_size=int(ids.max())),
         rf"ids must lie in \[0, {int(ids.max())}\)"),
        (lambda: topk_reverse_kl(x, ids, lq[:, :2]), r"topk_logprobs: expected float \[8, 3\]"),
        (lambda: topk_reverse_kl(x, ids.float(), lq), r"topk_ids: expected integer"),
        (lambda: topk_reverse_kl(x, ids, lq, tail_floor=0.0), r"tail_floor=0.0"),
        (lambda: reverse_kl(x, y, backend="cuda"), r"backend='cuda'"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# --------------------------------------------------------------------- TP=2 (gloo processes)
def _tp_rank(rank, world, cases, backend):
    """Every TP case on one pair of processes: each returns this rank's KL, its gradient slice
    and the shapes of the all-reduces of the forward and of the backward."""
    import torch.distributed as dist
    from dist_helpers import count_all_reduces
    from mopd_megatron.ops import lm_head_logits, reverse_kl, topk_reverse_kl
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    calls = count_all_reduces(dist)
    out = {}
    for name, c in cases.items():
        vl = c["x"].shape[1] // world
        sl = slice(rank * vl, (rank + 1) * vl)
        leaf = c["x"][:, sl].clone().requires_grad_(True)
        kw = dict(c["kw"], backend=backend)
        del calls[:]
        if "ids" in c:
            kl = topk_reverse_kl(leaf, c["ids"], c["lq"], group, **kw)
        elif "hidden" in c:
            kl = reverse_kl(leaf, lm_head_logits(c["hidden"], c["weight"][sl]), group, **kw)
        else:
            kl = reverse_kl(leaf, c["y"][:, sl].clone(), group, **kw)
        fwd = list(calls)
        (kl * c["go"]).sum().backward()
        out[name] = dict(kl=kl.detach(), grad=leaf.grad, fwd=fwd, bwd=calls[len(fwd):])
    return out


def tp_cases():
    T = 23
    x, y, go = make_inputs(T, 2 * 37, seed=12)  # odd V_local
    mask = torch.ones(T, dtype=torch.bool)
    mask[[2, 9]] = False
    ids, lq = teacher_topk(y, 9, 0.9, 70)
    # ids on both shards: the top-9 of these logits straddle the split at 37
    assert (ids < 37).any() and (ids >= 37).any()
    g = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(T, 8, generator=g), torch.randn(2 * 37, 8, generator=g)
    xs, ys, gos = make_inputs(T, 2 * 16, seed=14)
    return {
        # rank 1 holds 4 padding columns
        "full": dict(x=x, y=y, go=go, kw=dict(temperature=0.9, vocab_size=70, mask=mask,
                                              chunk_tokens=5)),
        "equal": dict(x=x, y=x.clone(), go=go, kw=dict(temperature=0.9, vocab_size=70)),
        "topk": dict(x=x, ids=ids, lq=lq, go=go, kw=dict(temperature=0.9, vocab_size=70,
                                                           mask=mask, chunk_tokens=5)),
        "callable": dict(x=x, hidden=hidden, weight=weight, go=go, kw=dict(chunk_tokens=6)),
        # rank 1 holds nothing but padding
        "pad_shard": dict(x=xs, y=ys, go=gos, kw=dict(vocab_size=13)),
    }


def _tp1(name, c):
    """TP=1 on the reference path in this process."""
    kw = dict(c["kw"], backend="torch")
    if "ids" in c:
        return run_topk(c["x"], c["ids"], c["lq"], c["go"], **kw)
    if "hidden" in c:
        return run_full(c["x"], c["hidden"] @ c["weight"].t(), c["go"], **kw)
    return run_full(c["x"], c["y"], c["go"], **kw)


def test_tp2_matches_tp1_and_reference(backend="torch"):
    """Also called by the Triton child below with backend="triton" under the interpreter."""
    from dist_helpers import run_ranks
    cases = tp_cases()
    outs = run_ranks(_tp_rank, 2, cases, backend, timeout=240)
    for name, c in cases.items():
        kl1, grad1 = _tp1(name, c)
        V = c["x"].shape[1]
        vocab = c["kw"].get("vocab_size") or V
        mask = c["kw"].get("mask", torch.ones(len(c["go"]), dtype=torch.bool))
        tau = c["kw"].get("temperature", 1.0)
        go = torch.where(mask, c["go"], 0.0)
        if "ids" in c:
            rkl, rgrad = ref_grad(ref_topk_kl, c["x"], go, c["ids"], c["lq"], tau, vocab)
        else:
            y = c["y"] if "y" in c else c["hidden"] @ c["weight"].t()
            rkl, rgrad = ref_grad(ref_kl, c["x"], go, y, tau, vocab)
        rkl = torch.where(mask, rkl, 0.0)
        gtol = 1e-5 * max(rgrad.abs().max().item(), 1e-6)  # "equal": the reference is ~1e-17
        for rank, o in enumerate(outs):
            r = o[name]
            sl = slice(rank * V // 2, (rank + 1) * V // 2)
            assert_kl(r["kl"], rkl)
            torch.testing.assert_close(r["kl"], kl1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r["grad"], grad1[:, sl], rtol=0, atol=gtol)
            torch.testing.assert_close(r["grad"].double(), rgrad[:, sl], rtol=0, atol=gtol)
            # Exactly two batched all-reduces in the forward, none in the backward.
            T = len(c["go"])
            want = [(T,), (T, 1 + c["ids"].shape[1])] if "ids" in c else [(2, T), (3, T)]
            assert r["fwd"] == want and r["bwd"] == [], (name, r["fwd"], r["bwd"])
            if name == "equal":
                assert (r["kl"] == 0).all() and (r["grad"] == 0).all()
            if "mask" in c["kw"]:
                assert (r["grad"][~mask] == 0).all()
        assert (outs[1]["pad_shard"]["grad"] == 0).all()


# ------------------------------------------------------- Triton, in a child (interpreter)
def test_triton_kernels_under_interpreter():
    """~8 s on 2 cores (the interpreter on small shapes plus the 2-rank TP cases): not slow."""
    pytest.importorskip("triton")
    from interp_helpers import run_in_interpreter
    run_in_interpreter(__file__)


def _case_full_and_topk():
    """Triton vs float64 and vs the reference backend: several vocab blocks with a ragged
    tail, padding columns, temperature, fp32 and bf16, a poisoned gradient buffer."""
    from mopd_megatron.ops import vocab_parallel_kl as rk
    real = rk._new_grad_buffer
    rk._new_grad_buffer = lambda t: torch.full_like(t, float("nan"))
    try:
        for T, V, vocab, block, k in [(13, 45, 41, 16, 6), (4, 7, None, 16, 7)]:
            for dtype in (torch.float32, torch.bfloat16):
                x, y, go = make_inputs(T, V, dtype, seed=T + V)
                go[1] = 0.0
                kw = dict(temperature=0.7, vocab_size=vocab, block_v=block)
                kl, grad = run_full(x, y, go, backend="triton", **kw)
                rkl, rgrad = ref_grad(ref_kl, x, go, y, 0.7, vocab)
                assert_kl(kl, rkl)
                assert_grad(grad, rgrad, dtype)
                assert (grad[1] == 0).all()
                kl_t, _ = run_full(x, y, go, backend="torch", **kw)
                torch.testing.assert_close(kl, kl_t, atol=2e-6, rtol=2e-6)
                ids, lq = teacher_topk(y, k, 0.7, vocab)
                kl, grad = run_topk(x, ids, lq, go, backend="triton", **kw)
                rkl, rgrad = ref_grad(ref_topk_kl, x, go, ids, lq, 0.7, vocab)
                assert_kl(kl, rkl)
                assert_grad(grad, rgrad, dtype)
    finally:
        rk._new_grad_buffer = real


def _case_exact_zero_mask_inplace_callable():
    from mopd_megatron.ops import lm_head_logits, reverse_kl, topk_reverse_kl
    x, y, go = make_inputs(11, 40, seed=15)
    kl, grad = run_full(x, x.clone(), go, backend="triton", temperature=0.7, vocab_size=37,
                        block_v=16)
    assert (kl == 0).all() and (grad == 0).all()
    mask = torch.ones(11, dtype=torch.bool)
    mask[[0, 4]] = False
    xg, yg = x.clone(), y.clone()
    xg[0], yg[4] = float("nan"), float("inf")
    kl, grad = run_full(xg, yg, go, mask=mask, backend="triton", block_v=16)
    assert (kl[~mask] == 0).all() and (grad[~mask] == 0).all()
    rkl, rgrad = ref_grad(ref_kl, x[mask], go[mask], y[mask])
    assert_kl(kl[mask], rkl)
    assert_grad(grad[mask], rgrad, torch.float32)
    # In place, both modes.
    ids, lq = teacher_topk(y, 5)
    for fn, ref in ((lambda b: reverse_kl(b, y, backend="triton", block_v=16, inplace_grad=True),
                     ref_grad(ref_kl, x, go, y)[1]),
                    (lambda b: topk_reverse_kl(b, ids, lq, backend="triton", block_v=16,
                                               inplace_grad=True),
                     ref_grad(ref_topk_kl, x, go, ids, lq)[1])):
        buf = x.clone().requires_grad_(True) * 1
        (fn(buf) * go).sum().backward()
        assert_grad(buf.detach(), ref, torch.float32)
    # Teacher from hidden states, chunked launches.
    g = torch.Generator().manual_seed(16)
    hidden, weight = torch.randn(11, 8, generator=g), torch.randn(40, 8, generator=g)
    kl, grad = run_full(x, lm_head_logits(hidden, weight), go, backend="triton", block_v=16,
                        chunk_tokens=4)
    rkl, rgrad = ref_grad(ref_kl, x, go, hidden @ weight.t())
    assert_kl(kl, rkl)
    assert_grad(grad, rgrad, torch.float32)


def _case_tp2():
    import test_ops_reverse_kl as mod  # ranks unpickle _tp_rank from the module, not __main__
    mod.test_tp2_matches_tp1_and_reference(backend="triton")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from interp_helpers import run_cases
    sys.exit(run_cases([("full_and_topk", _case_full_and_topk),
                        ("exact_zero_mask_inplace_callable", _case_exact_zero_mask_inplace_callable),
                        ("tp2", _case_tp2)]))
