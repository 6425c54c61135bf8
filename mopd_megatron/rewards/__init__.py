"""Outcome rewards: per-domain verifiers behind one registry, and the GRPO group advantage.

    from mopd_megatron.rewards import build_reward_registry, grpo_advantages
    registry = build_reward_registry(recipe_reward_domains, max_workers=4)
    results = registry.score_batch([(domain, text, row), ...])   # [RewardResult]
    adv = grpo_advantages(torch.tensor([r.reward for r in results]), group_size=n)

Modules: registry (domain -> verifier), math_verifier (math-verify in killable worker
processes), code_verifier + sandbox (+ _jail, the isolation launcher; _bwrap, the rootless
sandbox's bubblewrap command; remote, the SandboxFusion client), simple (exact match, regex),
grpo (advantage).
"""
from mopd_megatron.rewards.grpo import broadcast_to_tokens, grpo_advantages
from mopd_megatron.rewards.registry import (VERIFIER_TYPES, RewardRegistry,
                                            build_reward_registry)
from mopd_megatron.rewards.sandbox import SandboxConfig, SandboxUnavailable
from mopd_megatron.rewards.types import RewardResult, Verifier

__all__ = ["RewardRegistry", "RewardResult", "SandboxConfig", "SandboxUnavailable",
           "VERIFIER_TYPES", "Verifier", "broadcast_to_tokens", "build_reward_registry",
           "grpo_advantages"]
