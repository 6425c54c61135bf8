"""token_logprobs / score_logprobs (PyTorch reference backend, single rank) against the float64
reference in tests/test_ops_reference.py. Tolerances: TOL there (fp32 and bf16)."""
from __future__ import annotations

import pytest
import torch

from mopd_megatron.ops import score_logprobs, token_logprobs
from mopd_megatron.ops import vocab_parallel_logprobs as vpl
from test_ops_reference import TOL, ref_token_logprobs

# (T, V, chunk_tokens): odd vocabularies, T not a multiple of the chunk, a single-token batch.
SHAPES = [(37, 101, 8), (64, 1000, 16), (5, 7, 2), (1, 3, None), (50, 257, None)]


def _inputs(T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    grad_out = torch.randn(T, generator=g)
    return logits, targets, grad_out


def _ref_grad(logits, targets, grad_out):
    x = logits.detach().double().requires_grad_(True)
    lp, _ = ref_token_logprobs(x, targets)
    (lp * grad_out.double()).sum().backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,V,chunk", SHAPES)
def test_forward_backward_match_float64(T, V, chunk, dtype):
    logits, targets, grad_out = _inputs(T, V, dtype)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, targets, return_entropy=True, backend="torch",
                               chunk_tokens=chunk)
    ref_lp, ref_ent = ref_token_logprobs(logits, targets)
    tol = TOL[dtype]
    assert logp.dtype == torch.float32 and logp.shape == (T,)
    torch.testing.assert_close(logp.double(), ref_lp, atol=tol["logp"], rtol=tol["logp"])
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol["logp"], rtol=tol["logp"])
    (logp * grad_out).sum().backward()
    ref_g = _ref_grad(logits, targets, grad_out)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), ref_g, rtol=0,
                               atol=tol["grad"] * ref_g.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_overwrites_logits_buffer(dtype):
    logits, targets, grad_out = _inputs(23, 129, dtype, seed=1)
    leaf = logits.clone().requires_grad_(True)
    buf = leaf * 1  # non-leaf stand-in for the output layer's result
    logp = token_logprobs(buf, targets, backend="torch", inplace_grad=True, chunk_tokens=5)
    captured = {}
    buf.register_hook(lambda g: captured.setdefault("g", g))
    (logp * grad_out).sum().backward()
    # The gradient is the logits buffer itself: no second [T, V] allocation.
    assert captured["g"].data_ptr() == buf.data_ptr()
    ref_g = _ref_grad(logits, targets, grad_out)
    atol = TOL[dtype]["grad"] * ref_g.abs().max().item()
    torch.testing.assert_close(buf.detach().double(), ref_g, rtol=0, atol=atol)
    torch.testing.assert_close(leaf.grad.double(), ref_g, rtol=0, atol=atol)


def test_out_of_place_grad_writes_every_element(monkeypatch):
    """Poison the one new gradient buffer with NaN: any element the backward skips stays NaN."""
    monkeypatch.setattr(vpl, "_new_grad_buffer", lambda x: torch.full_like(x, float("nan")))
    logits, targets, grad_out = _inputs(19, 33, torch.float32, seed=2)
    grad_out[::3] = 0.0  # zero-weight rows must be written too (as exact zeros)
    x = logits.clone().requires_grad_(True)
    (token_logprobs(x, targets, backend="torch", chunk_tokens=4) * grad_out).sum().backward()
    assert not x.grad.isnan().any()
    assert (x.grad[::3] == 0).all()
    ref_g = _ref_grad(logits, targets, grad_out)
    torch.testing.assert_close(x.grad.double(), ref_g, rtol=0, atol=1e-6)


def test_score_logprobs_is_forward_only():
    logits, targets, _ = _inputs(11, 45, torch.bfloat16, seed=4)
    x = logits.clone().requires_grad_(True)
    logp, ent = score_logprobs(x, targets, return_entropy=True, chunk_tokens=3)
    assert logp.grad_fn is None and not logp.requires_grad and ent.grad_fn is None
    ref_lp, ref_ent = ref_token_logprobs(logits, targets)
    torch.testing.assert_close(logp.double(), ref_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=2e-5)
    # Same numbers as the differentiable path.
    torch.testing.assert_close(logp, token_logprobs(x, targets, chunk_tokens=3).detach(),
                               atol=0, rtol=0)


def test_shift_invariance_and_extreme_logits():
    """Large logits (fp32 exp would overflow without max-subtraction) and a -inf entry."""
    logits, targets, _ = _inputs(9, 20, torch.float32, seed=5)
    logits = logits + 500.0
    logits[0, (targets[0] + 1) % 20] = float("-inf")
    logp, ent = token_logprobs(logits, targets, return_entropy=True, backend="torch")
    ref_lp, ref_ent = ref_token_logprobs(logits, targets)
    assert logp.isfinite().all() and ent.isfinite().all()
    torch.testing.assert_close(logp.double(), ref_lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-5)


def test_empty_batch():
    x = torch.zeros(0, 10, requires_grad=True)
    logp = token_logprobs(x, torch.zeros(0, dtype=torch.long))
    logp.sum().backward()
    assert logp.shape == (0,) and x.grad.shape == (0, 10)


@pytest.mark.parametrize("bad,msg", [
    (dict(targets=torch.tensor([0, 10])), r"targets: ids must lie in \[0, 10\)"),
    (dict(targets=torch.tensor([0, -1])), r"targets: ids must lie"),
    (dict(targets=torch.tensor([0, 1, 2])), r"targets: expected shape \[2\]"),
    (dict(targets=torch.tensor([0.0, 1.0])), r"targets: expected int64"),
    (dict(logits=torch.zeros(2, 10, dtype=torch.float64)), r"logits: dtype torch.float64"),
    (dict(logits=torch.zeros(1, 2, 10)), r"logits: expected \[T, V_local\]"),
    (dict(backend="cuda"), r"backend='cuda'"),
])
def test_clear_errors(bad, msg):
    args = dict(logits=torch.zeros(2, 10), targets=torch.tensor([0, 9]), backend="torch")
    args.update(bad)
    with pytest.raises(ValueError, match=msg):
        token_logprobs(args.pop("logits"), args.pop("targets"), **args)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprobs(torch.zeros(2, 10), torch.tensor([0, 9]), backend="triton")
