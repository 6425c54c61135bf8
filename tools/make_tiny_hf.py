#!/usr/bin/env python
"""Build a tiny Hugging Face causal LM + tokenizer on disk, fully offline (no hub access).

Used by tests and the CPU demo wherever a real HF checkpoint directory is needed (SGLang
servers, conversion round trips). The tokenizer is a byte-level BPE trained in-process on a
small built-in corpus, so any text encodes; weights come from a seeded init, so the same
arguments always give the same files.

    python tools/make_tiny_hf.py OUT_DIR --arch qwen2 --seed 0
"""
from __future__ import annotations

import argparse
import os

ARCHS = ("llama", "qwen2", "qwen3")

# Small but not degenerate: GQA (4 q heads / 2 kv heads), head_dim 16, two layers.
DEFAULT_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! 1 + 1 = 2. 12 * 12 = 144. What is the capital of France? Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time there was a tiny language model that learned to count: 1, 2, 3, 4, 5.",
    "Solve for x: 2x + 3 = 7, so x = 2. The answer is \\boxed{2}.",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def build_tokenizer(vocab_size: int):
    """Byte-level BPE trained on _CORPUS; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 40, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_config(arch: str, tie_word_embeddings: bool = False, **overrides):
    """The transformers config for `arch` with the tiny shape (overrides win)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shape = {**DEFAULT_SHAPE, **overrides}
    common = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6)
    if arch == "llama":
        return LlamaConfig(**shape, **common)
    if arch == "qwen2":
        return Qwen2Config(**shape, **common)
    if arch == "qwen3":
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        return Qwen3Config(**shape, **common, head_dim=head_dim)
    raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")


def make_tiny_hf(out_dir: str, arch: str = "qwen2", seed: int = 0,
                 tie_word_embeddings: bool = False, init_std: float = 0.2, **overrides) -> str:
    """Write config.json, model.safetensors (fp32) and the tokenizer files to `out_dir`.

    init_std is larger than the usual 0.02 so that the tiny model has peaked, seed-specific
    next-token distributions: tests can then tell two weight sets apart by their outputs.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    os.makedirs(out_dir, exist_ok=True)
    config = build_config(arch, tie_word_embeddings=tie_word_embeddings,
                          initializer_range=init_std, **overrides)
    build_tokenizer(config.vocab_size).save_pretrained(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 + noise so that seeds differ there too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--init-std", type=float, default=0.2,
                        help="weight init std (default 0.2: peaked, seed-specific outputs)")
    for key, value in DEFAULT_SHAPE.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    args = parser.parse_args(argv)
    shape = {k: getattr(args, k) for k in DEFAULT_SHAPE}
    out = make_tiny_hf(args.out_dir, args.arch, args.seed, args.tie_word_embeddings,
                       args.init_std, **shape)
    print(f"wrote tiny {args.arch} model to {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
