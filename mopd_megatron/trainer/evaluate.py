"""Greedy per-domain accuracy on held-out prompts (data.eval_paths), for the student and for
each teacher on its own domains; rank 0 scores with the reward registry. Where the answers come
from (``engine_accuracy``: the rollout engine; ``greedy_accuracy``: the in-trainer sampler) is
decided by trainer/eval_plan.py, which the dry-runs print.
"""
from __future__ import annotations

import dataclasses

import torch.distributed as dist

from ..rollout.engine import SamplingParams
from ..rollout.local import sample_tokens

__all__ = ["load_eval_rows", "greedy_sampling", "engine_accuracy", "greedy_accuracy"]


def load_eval_rows(cfg, tokenizer) -> list:
    """Held-out rows, read and checked exactly like the training prompts."""
    if not cfg.data.eval_paths:
        return []
    from ..data import PromptDataset
    ds = PromptDataset(cfg.data.eval_paths, tokenizer, cfg.data.domain_weights,
                       chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                       bad_rows=cfg.data.bad_rows)
    return [r for d in ds.domains for r in ds.rows_by_domain[d]]


def greedy_sampling(rollout_sampling: SamplingParams) -> SamplingParams:
    """The rollout's sampling settings (max_new_tokens, stop ids) at temperature 0: greedy."""
    return dataclasses.replace(rollout_sampling, temperature=0.0, top_p=1.0, top_k=-1)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def engine_accuracy(engine, collective: bool, rows, tokenizer, rewards,
                    sampling: SamplingParams) -> dict[str, float]:
    """{domain: accuracy} of the weights ``engine`` holds, one greedy answer per row (rank 0;
    {} elsewhere). Server engines exist on rank 0 only and rank 0 alone drives them;
    ``collective`` engines are driven by every rank together."""
    if sampling.temperature != 0:
        raise ValueError(f"engine_accuracy: greedy eval needs temperature 0, got {sampling.temperature}")
    if not rows or not (collective or _is_rank0()):
        return {}
    samples = engine.generate([r.prompt_ids for r in rows], 1, sampling)  # prompt-major, n = 1
    if not _is_rank0():
        return {}
    return _score(rows, [s.token_ids for s in samples], tokenizer, rewards)


def greedy_accuracy(chunks, rows, tokenizer, rewards, *, max_new_tokens: int, eos_id: int,
                    pad_id: int, vocab_size: int, domains=None) -> dict[str, float]:
    """{domain: accuracy} of ``chunks`` decoded in the trainer (every rank runs the forward,
    TP shares it; rank 0 scores, {} elsewhere). pp = 1 only."""
    rows = [r for r in rows if domains is None or r.domain in domains]
    if not rows:
        return {}
    out = sample_tokens(chunks, [r.prompt_ids for r in rows], max_new_tokens=max_new_tokens,
                        temperature=0.0, eos_id=eos_id, vocab_size=vocab_size, pad_id=pad_id)
    if not _is_rank0():
        return {}
    return _score(rows, [t for t, _, _ in out], tokenizer, rewards)


def _score(rows, responses: list[list[int]], tokenizer, rewards) -> dict[str, float]:
    """{domain: fraction of rows whose answer gets reward 1}."""
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in responses]
    scored = rewards.score_batch([(r.domain, txt, r.fields) for r, txt in zip(rows, texts)])
    acc: dict[str, list[float]] = {}
    for r, s in zip(rows, scored):
        acc.setdefault(r.domain, []).append(1.0 if s.reward >= 1.0 else 0.0)
    return {d: sum(v) / len(v) for d, v in sorted(acc.items())}
