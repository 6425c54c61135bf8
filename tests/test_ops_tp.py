"""TP=2 (two real gloo processes) equals TP=1 and the float64 reference: same loss, logp,
entropy and metrics on every rank, and each rank's logits-gradient slice equals the matching
vocab slice of the full gradient. Also: exactly two all-reduces in the forward, none in the
backward. Tolerances: fp32 1e-5 (loss/logp), grad 1e-5 x max|grad|."""
from __future__ import annotations

import pytest
import torch

from dist_helpers import count_all_reduces, run_ranks
from mopd_megatron.ops import mopd_loss, score_logprobs, token_logprobs
from test_ops_reference import make_batch, ref_mopd, ref_token_logprobs

EPS = dict(eps_low=0.5, eps_high=2.0, alpha=0.4)


def _tp_rank(rank, world, batch, use_new_group, inplace, aggregation, backend="torch"):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world))) if use_new_group else dist.group.WORLD
    b = dict(batch)
    full = b.pop("logits")
    v_local = full.shape[1] // world
    shard = full[:, rank * v_local:(rank + 1) * v_local].clone()
    leaf = shard.clone().requires_grad_(True)
    x = leaf * 1 if inplace else leaf
    calls = count_all_reduces(dist)
    loss, metrics = mopd_loss(x, **b, **EPS, tp_group=group, entropy=True, backend=backend,
                              inplace_grad=inplace, chunk_tokens=7, aggregation=aggregation)
    n_fwd = list(calls)
    loss.backward()
    n_bwd = calls[len(n_fwd):]
    logp, ent = token_logprobs(shard, b["targets"], group, return_entropy=True, chunk_tokens=5,
                               backend=backend)
    scored = score_logprobs(shard, b["targets"], group, backend=backend)
    return dict(loss=loss.item(), grad=leaf.grad.clone(), metrics={k: v.item() for k, v in
                metrics.items()}, fwd_reduces=n_fwd, bwd_reduces=n_bwd, logp=logp.detach(),
                ent=ent, scored=scored)


@pytest.mark.parametrize("use_new_group,inplace,aggregation,V", [
    (False, False, "seq_mean", 2 * 37),   # odd V_local
    (True, True, "token_mean", 2 * 64),
])
def test_tp2_matches_tp1_and_reference(use_new_group, inplace, aggregation, V, backend="torch"):
    """Also called by test_ops_triton_interp.py with backend="triton" under the interpreter."""
    batch = make_batch(53, V, 5, seed=21)
    outs = run_ranks(_tp_rank, 2, batch, use_new_group, inplace, aggregation, backend,
                     timeout=240)
    # TP=1 in this process, same inputs.
    b = dict(batch)
    full = b.pop("logits").clone().requires_grad_(True)
    loss1, m1 = mopd_loss(full, **b, **EPS, entropy=True, backend="torch",
                          aggregation=aggregation)
    loss1.backward()
    rloss, rgrad, rmetrics = ref_mopd(batch["logits"], batch["targets"],
                                      batch["rollout_logprobs"], batch["teacher_logprobs"],
                                      batch["orm_advantages"], batch["loss_mask"],
                                      batch["seq_ids"], aggregation=aggregation, **EPS)
    ref_lp, ref_ent = ref_token_logprobs(batch["logits"], batch["targets"])
    v_local = V // 2
    gtol = 1e-5 * rgrad.abs().max().item()
    for rank, o in enumerate(outs):
        assert abs(o["loss"] - loss1.item()) < 1e-5 and abs(o["loss"] - rloss.item()) < 1e-5
        sl = slice(rank * v_local, (rank + 1) * v_local)
        torch.testing.assert_close(o["grad"], full.grad[:, sl], rtol=0, atol=gtol)
        torch.testing.assert_close(o["grad"].double(), rgrad[:, sl], rtol=0, atol=gtol)
        for k, v in o["metrics"].items():
            assert abs(v - m1[k].item()) < 1e-5 and abs(v - rmetrics[k]) < 1e-4, k
        torch.testing.assert_close(o["logp"].double(), ref_lp, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(o["ent"].double(), ref_ent, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(o["scored"], o["logp"], atol=0, rtol=0)
        # Batched communication: MAX of m [T], then SUM of stacked [s, z, u] [3, T].
        assert o["fwd_reduces"] == [(53,), (3, 53)], o["fwd_reduces"]
        assert o["bwd_reduces"] == []
    # The two ranks hold different halves of the gradient, together the whole of it.
    torch.testing.assert_close(torch.cat([o["grad"] for o in outs], 1), full.grad,
                               rtol=0, atol=gtol)


def test_single_rank_fast_path_does_no_communication(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    batch = make_batch(10, 12, 2, seed=22)
    b = dict(batch)
    loss, _ = mopd_loss(b.pop("logits").requires_grad_(True), **b, **EPS, backend="torch")
    loss.backward()
    assert calls == []


def _padding_shard_rank(rank, world, backend):
    """Rank 1 holds only vocabulary padding (-inf logits), as a tiny vocabulary at TP=2 does."""
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(6, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 16, (6,), generator=g)
    shard = real.float() if rank == 0 else torch.full((6, 16), float("-inf"))
    leaf = shard.clone().requires_grad_(True)
    logp, ent = token_logprobs(leaf, targets, dist.group.WORLD, return_entropy=True,
                               backend=backend)
    logp.sum().backward()
    want = torch.log_softmax(real, -1).gather(1, targets[:, None]).squeeze(1)
    p = torch.softmax(real, -1)
    want_ent = -(p * torch.log_softmax(real, -1)).sum(-1)
    return (float((logp.double() - want).abs().max()), float((ent.double() - want_ent).abs().max()),
            bool(torch.isfinite(leaf.grad).all()) if rank == 0 else bool((leaf.grad == 0).all()))


def test_shard_of_pure_padding_gives_finite_logprobs():
    for logp_err, ent_err, grad_ok in run_ranks(_padding_shard_rank, 2, "torch"):
        assert logp_err < 1e-5 and ent_err < 1e-5 and grad_ok
