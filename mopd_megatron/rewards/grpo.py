"""GRPO outcome advantage A_ORM, the alpha-weighted term of the MOPD advantage (eq. 9).

For the n responses y_1..y_n sampled for one prompt with rewards r_1..r_n:

    A_i = (r_i - mean(r)) / (std(r) + eps)      (GRPO, scale_by_std=True)
    A_i =  r_i - mean(r)                        (Dr. GRPO, scale_by_std=False)

std is the POPULATION standard deviation (divide by n, not n - 1): it is defined for n = 1 and
matches the usual GRPO implementations. A group whose rewards are all identical carries no
preference signal and gets exactly 0.0 (not a rounding residue of r - mean). Every token of a
response receives its sequence's advantage (`broadcast_to_tokens`).
"""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """rewards: [num_prompts * group_size], the samples of one prompt contiguous (or already
    [num_prompts, group_size]). Returns float32 advantages with the input's shape.

    Computed in float64 so that the statistics do not depend on the reward dtype."""
    if group_size < 1:
        raise ValueError(f"grpo_advantages: group_size must be >= 1, got {group_size}")
    if eps < 0:
        raise ValueError(f"grpo_advantages: eps must be >= 0, got {eps}")
    if rewards.numel() % group_size:
        raise ValueError(f"grpo_advantages: {rewards.numel()} rewards do not split into groups "
                         f"of {group_size}")
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)  # [prompts, n]
    centered = r - r.mean(dim=1, keepdim=True)  # [prompts, n]
    if scale_by_std:
        std = r.std(dim=1, unbiased=False, keepdim=True)  # population std, [prompts, 1]
        centered = centered / (std + eps)
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # [prompts, 1]
    adv = torch.where(flat, torch.zeros_like(centered), centered)
    return adv.to(torch.float32).reshape(rewards.shape)


def broadcast_to_tokens(seq_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """seq_advantages: [S]; response_mask: [S, T] (1 on response tokens, 0 on prompt/padding).
    Returns [S, T] float32: the sequence's advantage on its response tokens, 0 elsewhere."""
    if seq_advantages.dim() != 1 or response_mask.dim() != 2 \
            or response_mask.shape[0] != seq_advantages.shape[0]:
        raise ValueError(f"broadcast_to_tokens: need advantages [S] and mask [S, T], got "
                         f"{tuple(seq_advantages.shape)} and {tuple(response_mask.shape)}")
    return seq_advantages.to(torch.float32)[:, None] * response_mask.to(torch.float32)
