"""The Triton kernels on CPU under TRITON_INTERPRET=1, against the float64 reference in
tests/test_ops_reference.py (and the PyTorch backend).

TRITON_INTERPRET must be set before triton is imported, so the checks run in a child process
(this file executed as a script) and never touch triton in the pytest process. The interpreter
is slow: sizes stay small, but the vocab block is made smaller than V so the online max/sum-exp
crosses several blocks, with V and T not multiples of it. Tolerances: TOL in the reference
(fp32 / bf16).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # ~14-21 s on 2 cores: interpreter + a 2-rank TP case
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    from interp_helpers import run_in_interpreter
    run_in_interpreter(__file__)


# ------------------------------------------------------- everything below runs in the child
def _case_token_logprobs():
    import torch
    from mopd_megatron.ops import score_logprobs, token_logprobs
    from test_ops_reference import TOL, ref_token_logprobs
    # (T, V, block_v): several blocks with a ragged tail; V below one block; V a block multiple.
    for T, V, block in [(37, 101, 32), (5, 7, 16), (16, 64, 16)]:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(T + V)
            logits = (3.0 * torch.randn(T, V, generator=g)).to(dtype)
            targets = torch.randint(0, V, (T,), generator=g)
            grad_out = torch.randn(T, generator=g)
            tol = TOL[dtype]
            x = logits.clone().requires_grad_(True)
            logp, ent = token_logprobs(x, targets, return_entropy=True, backend="triton",
                                       block_v=block)
            ref_lp, ref_ent = ref_token_logprobs(logits, targets)
            torch.testing.assert_close(logp.double(), ref_lp, atol=tol["logp"], rtol=tol["logp"])
            torch.testing.assert_close(ent.double(), ref_ent, atol=tol["logp"], rtol=tol["logp"])
            (logp * grad_out).sum().backward()
            xr = logits.double().requires_grad_(True)
            (ref_token_logprobs(xr, targets)[0] * grad_out.double()).sum().backward()
            atol = tol["grad"] * xr.grad.abs().max().item()
            torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=atol)
            # In place: the gradient lands in the logits buffer itself.
            buf = logits.clone().requires_grad_(True) * 1
            lp2 = token_logprobs(buf, targets, backend="triton", inplace_grad=True, block_v=block)
            (lp2 * grad_out).sum().backward()
            torch.testing.assert_close(buf.detach().double(), xr.grad, rtol=0, atol=atol)
            scored = score_logprobs(logits, targets, backend="triton", block_v=block)
            assert scored.grad_fn is None
            torch.testing.assert_close(scored, logp.detach(), atol=0, rtol=0)
            # Same numbers as the PyTorch reference backend (fp32 arithmetic on both).
            torch.testing.assert_close(
                logp.detach(), token_logprobs(logits, targets, backend="torch"),
                atol=2e-6, rtol=2e-6)


def _case_poisoned_grad_buffer():
    import torch
    from mopd_megatron.ops import token_logprobs
    from mopd_megatron.ops import vocab_parallel_logprobs as vpl
    real = vpl._new_grad_buffer
    vpl._new_grad_buffer = lambda x: torch.full_like(x, float("nan"))
    try:
        logits = torch.randn(13, 45)
        x = logits.clone().requires_grad_(True)
        grad_out = torch.randn(13)
        grad_out[::2] = 0.0
        lp = token_logprobs(x, torch.randint(0, 45, (13,)), backend="triton", block_v=16)
        (lp * grad_out).sum().backward()
        assert not x.grad.isnan().any(), "the kernel left gradient elements unwritten"
        assert (x.grad[::2] == 0).all()
    finally:
        vpl._new_grad_buffer = real


def _case_mopd_loss():
    import torch
    from mopd_megatron.ops import mopd_loss
    from test_ops_reference import TOL, make_batch, ref_mopd
    for dtype in (torch.float32, torch.bfloat16):
        batch = make_batch(29, 75, 4, dtype=dtype, seed=31)
        b = dict(batch)
        x = b.pop("logits").clone().requires_grad_(True)
        loss, metrics = mopd_loss(x, **b, eps_low=0.5, eps_high=2.0, alpha=0.2,
                                  backend="triton", block_v=32, entropy=True)
        loss.backward()
        rloss, rgrad, rmetrics = ref_mopd(batch["logits"], batch["targets"],
                                          batch["rollout_logprobs"], batch["teacher_logprobs"],
                                          batch["orm_advantages"], batch["loss_mask"],
                                          batch["seq_ids"], 0.5, 2.0, 0.2)
        tol = TOL[dtype]
        assert abs(loss.item() - rloss.item()) < tol["loss"], (loss.item(), rloss.item())
        torch.testing.assert_close(x.grad.double(), rgrad, rtol=0,
                                   atol=tol["grad"] * rgrad.abs().max().item())
        for k, v in metrics.items():
            assert abs(v.item() - rmetrics[k]) < 1e-4, k


def _case_tp2():
    from test_ops_tp import test_tp2_matches_tp1_and_reference
    test_tp2_matches_tp1_and_reference(False, True, "seq_mean", 2 * 37, backend="triton")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from interp_helpers import run_cases
    sys.exit(run_cases([("token_logprobs", _case_token_logprobs),
                        ("poisoned_grad_buffer", _case_poisoned_grad_buffer),
                        ("mopd_loss", _case_mopd_loss), ("tp2", _case_tp2)]))
