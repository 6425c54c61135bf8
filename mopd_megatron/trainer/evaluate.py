"""Greedy per-domain accuracy on held-out prompts (data.eval_paths), for the student and for
each teacher on its own domains. Every rank runs the forward (TP shares it); rank 0 scores."""
from __future__ import annotations

import torch.distributed as dist

from ..rollout.local import sample_tokens

__all__ = ["load_eval_rows", "greedy_accuracy"]


def load_eval_rows(cfg, tokenizer) -> list:
    """Held-out rows, read and checked exactly like the training prompts."""
    if not cfg.data.eval_paths:
        return []
    from ..data import PromptDataset
    ds = PromptDataset(cfg.data.eval_paths, tokenizer, cfg.data.domain_weights,
                       chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                       bad_rows=cfg.data.bad_rows)
    return [r for d in ds.domains for r in ds.rows_by_domain[d]]


def greedy_accuracy(chunks, rows, tokenizer, rewards, *, max_new_tokens: int, eos_id: int,
                    pad_id: int, vocab_size: int, domains=None) -> dict[str, float]:
    """{domain: fraction of rows whose greedy answer gets reward 1} (rank 0; {} elsewhere)."""
    rows = [r for r in rows if domains is None or r.domain in domains]
    if not rows:
        return {}
    out = sample_tokens(chunks, [r.prompt_ids for r in rows], max_new_tokens=max_new_tokens,
                        temperature=0.0, eos_id=eos_id, vocab_size=vocab_size, pad_id=pad_id)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t, _, _ in out]
    scored = rewards.score_batch([(r.domain, txt, r.fields) for r, txt in zip(rows, texts)])
    acc: dict[str, list[float]] = {}
    for r, s in zip(rows, scored):
        acc.setdefault(r.domain, []).append(1.0 if s.reward >= 1.0 else 0.0)
    return {d: sum(v) / len(v) for d, v in sorted(acc.items())}
