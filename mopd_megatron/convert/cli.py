"""Command lines of the two converters (``tools/convert_*.py`` and ``mopd convert`` call these)."""
from __future__ import annotations

import argparse
import sys

from ..models.hf_config import UnsupportedModelError
from .mappings import ConversionError

HF_TO_MEGATRON = """Convert a Hugging Face checkpoint (safetensors) to a Megatron torch_dist
checkpoint that the trainer loads at any TP/PP (resharding on load; the vocabulary padding is
fixed by --tp). config.json and the tokenizer files are copied next to it. Streams one
tensor-layer at a time. Supported: Llama 3.x, Qwen2/2.5, Qwen3 (dense)."""

MEGATRON_TO_HF = """Convert a Megatron torch_dist checkpoint (any TP/PP wrote it) to a Hugging
Face directory: sharded safetensors + model.safetensors.index.json, config.json and tokenizer
files (taken from next to the checkpoint or --hf-config). Streams one tensor-layer at a time."""


def _run(fn, **kw) -> int:
    try:
        fn(**kw)
    except (ConversionError, UnsupportedModelError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def hf_to_megatron_main(argv=None) -> int:
    from .hf_to_megatron import convert_hf_to_megatron
    p = argparse.ArgumentParser(prog="convert_hf_to_megatron", description=HF_TO_MEGATRON)
    p.add_argument("--hf-dir", required=True,
                   help="HF model directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to train with")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size to train with")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="parameter dtype in the checkpoint (default bf16)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocabulary padding multiple (the trainer builds with 128, "
                        "models/builder.py MAKE_VOCAB_SIZE_DIVISIBLE_BY; keep it for checkpoints "
                        "that mopd train loads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return _run(convert_hf_to_megatron, hf_dir=a.hf_dir, out_dir=a.out, tp=a.tp, pp=a.pp,
                dtype=a.dtype, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                progress=not a.no_progress)


def megatron_to_hf_main(argv=None) -> int:
    from .megatron_to_hf import convert_megatron_to_hf
    p = argparse.ArgumentParser(prog="convert_megatron_to_hf", description=MEGATRON_TO_HF)
    p.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--hf-config", default=None,
                   help="directory with the model's config.json (default: the checkpoint's "
                        "directory or its parent)")
    p.add_argument("--max-shard-mb", type=float, default=2048, help="safetensors shard size (MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return _run(convert_megatron_to_hf, ckpt_dir=a.ckpt, out_dir=a.out, hf_config=a.hf_config,
                max_shard_mb=a.max_shard_mb, progress=not a.no_progress)


def convert_main(argv=None) -> int:
    """``mopd convert hf-to-megatron|megatron-to-hf ...``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"hf-to-megatron": hf_to_megatron_main, "megatron-to-hf": megatron_to_hf_main}
    if not argv or argv[0] not in commands:
        print("usage: mopd convert {hf-to-megatron|megatron-to-hf} [options]  "
              "(add --help after the direction for its options)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
