"""GRPO advantage against an independent float64 reference (plain Python statistics)."""
import math
import statistics

import pytest
import torch

from mopd_megatron.rewards.grpo import broadcast_to_tokens, grpo_advantages

TOL = dict(rtol=1e-6, atol=1e-6)  # float32 output vs float64 reference


def reference(rewards, n, eps, scale_by_std):
    out = []
    for g in range(0, len(rewards), n):
        group = [float(r) for r in rewards[g:g + n]]
        mean = math.fsum(group) / n
        std = statistics.pstdev(group)  # population std, as documented
        for r in group:
            if max(group) == min(group):
                out.append(0.0)
            else:
                out.append((r - mean) / (std + eps) if scale_by_std else r - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_matches_reference(n, scale_by_std):
    g = torch.Generator().manual_seed(n)
    rewards = torch.rand(7 * n, generator=g, dtype=torch.float64)
    rewards[:n] = torch.bernoulli(torch.full((n,), 0.5), generator=g).double()  # binary group
    got = grpo_advantages(rewards.float(), n, eps=1e-6, scale_by_std=scale_by_std)
    want = reference(rewards.float().tolist(), n, 1e-6, scale_by_std)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    torch.testing.assert_close(got.double(), want, **TOL)


def test_binary_group_values():
    # rewards [1, 0, 0, 0]: mean 0.25, population std sqrt(3)/4.
    got = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    s = math.sqrt(3) / 4
    want = torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, **TOL)
    assert abs(got.sum().item()) < 1e-6  # centred


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1 / 3, -7.3])
@pytest.mark.parametrize("scale_by_std,eps", [(True, 1e-6), (True, 0.0), (False, 1e-6)])
def test_identical_rewards_give_exactly_zero(value, scale_by_std, eps):
    # eps=0 would make these 0/0 = NaN without the explicit flat-group rule.
    rewards = torch.tensor([value] * 6 + [0.0, 1.0, 1.0], dtype=torch.float32)
    adv = grpo_advantages(rewards, 3, eps=eps, scale_by_std=scale_by_std)
    assert torch.equal(adv[:6], torch.zeros(6))  # exactly, not approximately
    assert (adv[6:] != 0).all()


def test_two_dimensional_input_keeps_shape():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]])
    adv = grpo_advantages(rewards, 2)
    assert adv.shape == (3, 2)
    torch.testing.assert_close(adv.flatten().double(),
                               reference(rewards.flatten().tolist(), 2, 1e-6, True), **TOL)


def test_mean_only_is_dr_grpo():
    adv = grpo_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        grpo_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match=r"need advantages \[S\] and mask \[S, T\]"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 5))


def test_broadcast_to_tokens():
    adv = torch.tensor([0.5, -1.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])  # [S=2, T=4]
    got = broadcast_to_tokens(adv, mask)
    want = torch.tensor([[0.0, 0.5, 0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.equal(got, want)


def test_rewards_do_not_carry_grad():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not grpo_advantages(rewards, 2).requires_grad  # an advantage is a constant
