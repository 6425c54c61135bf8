"""mopd_loss (single rank, PyTorch reference backend) against the float64 reference in
tests/test_ops_reference.py: loss, logits gradient and metrics, every aggregation / IS variant,
fp32 and bf16 (tolerances: TOL there; metrics 1e-4 absolute)."""
from __future__ import annotations

import pytest
import torch

from mopd_megatron.ops import mopd_loss
from mopd_megatron.ops import vocab_parallel_logprobs as vpl
from test_ops_reference import TOL, make_batch, ref_mopd

EPS_LOW, EPS_HIGH, ALPHA = 0.5, 2.0, 0.3


def _run(batch, dtype=None, **kw):
    b = dict(batch)
    x = b.pop("logits").clone().requires_grad_(True)
    eps = dict(eps_low=kw.pop("eps_low", EPS_LOW), eps_high=kw.pop("eps_high", EPS_HIGH),
               alpha=kw.pop("alpha", ALPHA))
    loss, metrics = mopd_loss(x, **b, **eps, backend="torch", **kw)
    loss.backward()
    return loss, x.grad, metrics


def _ref(batch, **kw):
    b = dict(batch)
    kw.setdefault("eps_low", EPS_LOW), kw.setdefault("eps_high", EPS_HIGH)
    kw.setdefault("alpha", ALPHA)
    return ref_mopd(b["logits"], b["targets"], b["rollout_logprobs"], b["teacher_logprobs"],
                    b["orm_advantages"], b["loss_mask"], b["seq_ids"], **kw)


def _assert_matches(got, ref, dtype, check_entropy=False):
    loss, grad, metrics = got
    rloss, rgrad, rmetrics = ref
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), rloss, atol=tol["loss"], rtol=tol["loss"])
    torch.testing.assert_close(grad.double(), rgrad, rtol=0,
                               atol=tol["grad"] * max(rgrad.abs().max().item(), 1e-30))
    for k, v in metrics.items():
        assert not v.requires_grad
        assert abs(v.item() - rmetrics[k]) < 1e-4, (k, v.item(), rmetrics[k])
    assert ("entropy" in metrics) == check_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
@pytest.mark.parametrize("is_variant", ["icepop", "tis", "none"])
def test_loss_grad_metrics_match_float64(is_variant, aggregation, dtype):
    batch = make_batch(61, 97, 6, dtype=dtype, seed=11)
    opts = dict(aggregation=aggregation, is_variant=is_variant)
    got = _run(batch, **opts, entropy=True, chunk_tokens=16)
    _assert_matches(got, _ref(batch, **opts), dtype, check_entropy=True)


def test_tis_cap_and_icepop_defaults_are_mimo_form():
    batch = make_batch(40, 31, 3, seed=12)
    got = _run(batch, is_variant="tis", tis_cap=1.3)
    _assert_matches(got, _ref(batch, is_variant="tis", tis_cap=1.3), torch.float32)
    got_default = _run(batch)  # icepop + seq_mean
    _assert_matches(got_default, _ref(batch), torch.float32)
    assert 0 < got_default[2]["is_masked_frac"].item() < 1


def test_masked_and_is_rejected_tokens_get_exactly_zero_gradient():
    batch = make_batch(80, 53, 5, seed=13)
    _, grad, metrics = _run(batch, chunk_tokens=7)
    rloss, rgrad, _ = _ref(batch)
    mask = batch["loss_mask"].bool()
    assert (grad[~mask] == 0).all()
    lp = torch.log_softmax(batch["logits"].double(), -1).gather(
        1, batch["targets"][:, None]).squeeze(1)
    ratio = (lp - batch["rollout_logprobs"].double()).exp()
    rejected = mask & ((ratio < EPS_LOW) | (ratio > EPS_HIGH))
    assert rejected.sum() > 0 and (grad[rejected] == 0).all()
    kept = mask & ~rejected
    assert (grad[kept].abs().sum(1) > 0).all()
    assert abs(metrics["is_masked_frac"].item() - rejected.sum().item() / mask.sum().item()) < 1e-6


def test_teacher_equal_to_student_gives_zero_advantage():
    batch = make_batch(30, 41, 3, seed=14)
    lp = torch.log_softmax(batch["logits"].double(), -1).gather(
        1, batch["targets"][:, None]).squeeze(1)
    batch["teacher_logprobs"] = lp.float()
    loss, grad, m = _run(batch, alpha=0.0)
    # A_t = teacher - logp is the fp32 rounding of logp only: the loss and gradient vanish.
    assert abs(loss.item()) < 1e-5 and grad.abs().max().item() < 1e-6
    assert abs(m["teacher_term_mean"].item()) < 1e-6 and abs(m["reverse_kl"].item()) < 1e-6
    # With alpha > 0 only the ORM term drives the update.
    loss_orm, _, _ = _run(batch, alpha=1.0)
    assert abs(loss_orm.item()) > 1e-3


def test_empty_sequences_and_empty_batch_give_no_nan():
    batch = make_batch(24, 19, 4, seed=15)
    batch["seq_ids"] = torch.arange(24) // 6  # 4 sequences of 6 tokens
    batch["loss_mask"][6:12] = 0  # sequence 1 has no response token
    batch["teacher_logprobs"][6:12] = float("nan")  # garbage off the mask must not leak
    batch["rollout_logprobs"][6:12] = float("inf")
    batch["targets"][6:12] = -100  # ignore-index style padding on masked tokens
    got = _run(batch, entropy=True)
    assert got[0].isfinite() and got[1].isfinite().all()
    assert got[2]["sequences"].item() == 3  # S counts sequences with >= 1 response token
    _assert_matches(got, _ref(batch), torch.float32, check_entropy=True)
    batch["loss_mask"][:] = 0
    loss, grad, metrics = _run(batch, entropy=True)
    assert loss.item() == 0 and (grad == 0).all()
    assert all(v.isfinite() for v in metrics.values())


def test_non_contiguous_sequence_ids():
    batch = make_batch(33, 23, 4, seed=16)
    batch["seq_ids"] = batch["seq_ids"][torch.randperm(33, generator=torch.Generator().manual_seed(0))] * 1000 + 7
    _assert_matches(_run(batch), _ref(batch), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_and_poisoned_out_of_place_buffer(dtype, monkeypatch):
    batch = make_batch(45, 77, 5, dtype=dtype, seed=17)
    ref = _ref(batch)
    b = dict(batch)
    leaf = b.pop("logits").clone().requires_grad_(True)
    buf = leaf * 1
    loss, _ = mopd_loss(buf, **b, eps_low=EPS_LOW, eps_high=EPS_HIGH, alpha=ALPHA,
                        backend="torch", inplace_grad=True, chunk_tokens=6)
    loss.backward()
    tol = TOL[dtype]["grad"] * ref[1].abs().max().item()
    torch.testing.assert_close(buf.detach().double(), ref[1], rtol=0, atol=tol)
    torch.testing.assert_close(leaf.grad.double(), ref[1], rtol=0, atol=tol)
    monkeypatch.setattr(vpl, "_new_grad_buffer", lambda x: torch.full_like(x, float("nan")))
    _, grad, _ = _run(batch, chunk_tokens=6)
    assert not grad.isnan().any()
    torch.testing.assert_close(grad.double(), ref[1], rtol=0, atol=tol)


@pytest.mark.parametrize("override,msg", [
    (dict(aggregation="sum"), r"aggregation='sum'"),
    (dict(is_variant="ppo"), r"is_variant='ppo'"),
    (dict(eps_low=2.0, eps_high=0.5), r"eps_low=2.0, eps_high=0.5"),
    (dict(is_variant="tis", tis_cap=0.0), r"tis_cap=0.0"),
    (dict(seq_ids=torch.zeros(5, dtype=torch.long)), r"seq_ids: expected shape \[8\]"),
    (dict(loss_mask=torch.ones(8, 1)), r"loss_mask: expected shape \[8\]"),
    (dict(seq_ids=torch.zeros(8)), r"seq_ids: expected integer ids"),
    (dict(alpha=float("nan")), r"alpha=nan"),
])
def test_clear_errors(override, msg):
    batch = make_batch(8, 5, 2, seed=18)
    args = dict(batch, eps_low=0.5, eps_high=2.0, alpha=0.1)
    args.update(override)
    with pytest.raises(ValueError, match=msg):
        mopd_loss(**args, backend="torch")
