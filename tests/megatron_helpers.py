"""Tiny models and layout-comparison helpers for the multi-process Megatron tests.

Every function that takes ``(rank, world_size, ...)`` runs inside a spawned rank.
"""
from __future__ import annotations

import os

import torch

VOCAB = 250  # not a multiple of 128: exercises vocabulary padding and its masking

TINY = {
    "LlamaForCausalLM": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192},
                             rope_theta=500000.0, tie_word_embeddings=True),
    "Qwen2ForCausalLM": dict(rope_theta=1000000.0, tie_word_embeddings=False),
    "Qwen3ForCausalLM": dict(rope_theta=1000000.0, head_dim=16, tie_word_embeddings=False),
}


def tiny_config(arch: str, layers: int = 2, **overrides) -> dict:
    cfg = dict(architectures=[arch], vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu")
    cfg.update(TINY[arch])
    cfg.update(overrides)
    return cfg


def microbatches(n: int = 2, b: int = 2, s: int = 12, seed: int = 0) -> list[dict]:
    """Fixed micro-batches with a ragged loss mask (prompt tokens and right padding masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (b, s), generator=g)
        mask = torch.zeros(b, s)
        for i in range(b):
            start = int(torch.randint(1, s // 2, (1,), generator=g))
            end = int(torch.randint(start + 1, s + 1, (1,), generator=g))
            mask[i, start:end] = 1
        out.append(dict(tokens=tokens, position_ids=torch.arange(s).expand(b, s),
                        labels=torch.roll(tokens, -1, 1), loss_mask=mask))
    return out


def build(hf_dict: dict, tp=1, pp=1, vpp=None, seed=1234, dtype="fp32"):
    from mopd_megatron.config import ParallelConfig
    from mopd_megatron.models.builder import build_model_chunks
    from mopd_megatron.models.hf_config import load_hf_config
    from mopd_megatron.runtime import init_runtime
    layout = init_runtime(tp=tp, pp=pp, vpp=vpp, seed=seed)
    hf = load_hf_config(hf_dict)
    return layout, hf, build_model_chunks(hf, ParallelConfig(tp=tp, pp=pp, vpp=vpp), dtype=dtype)


def full_logits(chunks, tokens) -> torch.Tensor:
    """Vocabulary-complete logits [b, s, V_padded] of a PP=1 model (gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    model = chunks[0]
    model.eval()
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = model(tokens, pos, attention_mask=None)
        if ps.get_tensor_model_parallel_world_size() > 1:
            out = gather_from_tensor_model_parallel_region(out)
    return out.float()


def loss_and_grads(ddp_chunks, hf, batches, ckpt_dir):
    """Global loss of ``batches`` and the full gradients, gathered through a dist-checkpoint of
    the gradients (so every layout's gradients come back under layout-free names)."""
    from megatron.core import parallel_state as ps

    from mopd_megatron.checkpoint import dist_ckpt
    from mopd_megatron.mcore.cross_entropy import masked_token_ce
    from mopd_megatron.mcore.schedule import forward_backward
    for c in ddp_chunks:
        c.zero_grad_buffer()
    metrics = forward_backward(ddp_chunks, batches, masked_token_ce, vocab_size=hf.vocab_size,
                               tp_rank=ps.get_tensor_model_parallel_rank())
    stats = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0:
        stats[0] = sum(float(m["loss_sum"]) for m in metrics)
        stats[1] = sum(float(m["tokens"]) for m in metrics)
    torch.distributed.all_reduce(stats)
    with torch.no_grad():
        for c in ddp_chunks:
            for p in c.module.parameters():
                p.copy_(p.main_grad)
    dist_ckpt.save(ckpt_dir, ddp_chunks)
    return float(stats[0] / stats[1])


def read(path, keys=None) -> dict:
    """Full (unsharded) model tensors of a torch_dist checkpoint under their layout-free names
    (the same whatever TP/PP/DP wrote it), read without a process group by the converter's
    reader; ``keys``: only these."""
    from mopd_megatron.convert import dcp_io
    reader = dcp_io.Reader(path)
    return {k: dcp_io.read_chunk(reader, k, (0,) * len(md.size), tuple(md.size))
            for k, md in reader.tensors().items() if keys is None or k in keys}


def max_diff(a: dict, b: dict) -> dict:
    assert set(a) == set(b), (set(a) ^ set(b))
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def tmp(base: str, name: str) -> str:
    return os.path.join(base, name)
