"""Tiny random HF checkpoints (built locally, never downloaded) for the conversion tests."""
from __future__ import annotations

import os

import torch

from tools.make_tiny_hf import make_tiny_hf

VOCAB = 500  # not a multiple of 128 * tp: the Megatron side pads to 512 rows
LAYERS = 4   # 2 per stage at PP=2
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}

# arch name -> make_tiny_hf arguments: each exercises its family's quirks.
MODELS = {
    # tied embeddings + Llama 3 rope scaling (low frequencies rescaled at head_dim 16)
    "LlamaForCausalLM": dict(arch="llama", tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                             max_position_embeddings=16384),
    "Qwen2ForCausalLM": dict(arch="qwen2"),  # q/k/v biases
    "Qwen3ForCausalLM": dict(arch="qwen3"),  # q/k RMSNorm
}


def make_model(root: str, arch: str, seed: int = 0) -> str:
    """Write the tiny model for ``arch`` under ``root``; returns its directory."""
    from safetensors.torch import load_file, save_file
    out = os.path.join(root, arch)
    make_tiny_hf(out, seed=seed, vocab_size=VOCAB, num_hidden_layers=LAYERS, **MODELS[arch])
    # transformers initialises biases to zero: randomise them, or a q/k/v bias mix-up between
    # heads would convert "correctly".
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = 0.5 * torch.randn(t.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    return out


def hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()
