"""Prompt data: JSONL/Parquet rows with a domain each, chat templates through the HF tokenizer,
bad-row reporting with file and line, and a deterministic, resumable domain-weighted sampler.

    ds = PromptDataset.from_config(cfg.data, tokenizer)       # reads + checks everything now
    sampler = DomainSampler(ds, cfg.data.domain_weights, cfg.data.seed)
    rows = sampler.next_batch(cfg.train.prompts_per_step)    # rows[i].prompt_ids, .fields
    state = sampler.state_dict()                              # into the checkpoint
"""
from .dataset import PromptDataset
from .rows import BadRow, DataError, PromptRow
from .sampler import DomainSampler
from .template import encode_prompt

__all__ = ["PromptDataset", "DomainSampler", "PromptRow", "BadRow", "DataError", "encode_prompt"]
