#!/usr/bin/env python
"""Peak RSS of HF <-> Megatron conversion against model size (streaming check).

For each size a random bf16 Qwen2-shaped model (narrow, many layers) is generated layer by
layer into sharded safetensors, then converted HF -> Megatron (torch_dist, --tp 2) and back
(--max-shard-mb shards). Every step runs in its own process, which reports its own peak RSS
(``ru_maxrss``), so the numbers are per conversion, imports included. With streaming, peak RSS
stays flat as the model grows; a converter that loads the model would grow with it.

    python benchmarks/bench_convert_memory.py --sizes-gb 0.25 0.5 1 2 \
        --results benchmarks/RESULTS.md

Takes minutes and several GB of disk (each size is deleted after use): a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

# Narrow but real layer shapes: ~6.3 MB of bf16 per layer, so 2 GB takes ~330 layers.
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000)
LAYER_BYTES = 2 * (512 * 512 * 2 + 2 * 128 * 512 + 3 * 1536 * 512 + 2 * 512 + 512 + 2 * 128)
FIXED_BYTES = 2 * (2 * 32000 * 512 + 512)


def generate(out: str, layers: int, shard_mb: int = 512) -> int:
    """Write config.json + sharded safetensors, one shard in memory at a time; returns bytes."""
    import torch
    from safetensors.torch import save_file
    os.makedirs(out)
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=layers,
               max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
               tie_word_embeddings=False, rope_theta=1000000.0, dtype="bfloat16", **SHAPE)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    H, F, kv = 512, 1536, 128
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)

    def layer(i):
        p = f"model.layers.{i}."
        return {p + "input_layernorm.weight": rnd(H), p + "post_attention_layernorm.weight": rnd(H),
                p + "self_attn.q_proj.weight": rnd(H, H), p + "self_attn.q_proj.bias": rnd(H),
                p + "self_attn.k_proj.weight": rnd(kv, H), p + "self_attn.k_proj.bias": rnd(kv),
                p + "self_attn.v_proj.weight": rnd(kv, H), p + "self_attn.v_proj.bias": rnd(kv),
                p + "self_attn.o_proj.weight": rnd(H, H), p + "mlp.gate_proj.weight": rnd(F, H),
                p + "mlp.up_proj.weight": rnd(F, H), p + "mlp.down_proj.weight": rnd(H, F)}

    groups = [{"model.embed_tokens.weight": rnd(32000, H)}]  # filled lazily below
    shard, used, n, total = {}, 0, 0, 0
    weight_map = {}

    def flush():
        nonlocal shard, used, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, used, n = {}, 0, n + 1

    def add(tensors):
        nonlocal used, total
        for k, t in tensors.items():
            shard[k] = t
            used += t.nbytes
            total += t.nbytes
        if used >= shard_mb * 2**20:
            flush()

    add(groups[0])
    for i in range(layers):
        add(layer(i))
    add({"model.norm.weight": rnd(H), "lm_head.weight": rnd(32000, H)})
    if shard:
        flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def _child(argv: list[str]) -> None:
    import resource
    kind, args = argv[0], argv[1:]
    if kind == "generate":
        size = generate(args[0], int(args[1]))
        extra = {"bytes": size}
    elif kind == "hf2mcore":
        from mopd_megatron.convert import convert_hf_to_megatron
        convert_hf_to_megatron(args[0], args[1], tp=2, dtype="bf16")
        extra = {}
    else:
        from mopd_megatron.convert import convert_megatron_to_hf
        convert_megatron_to_hf(args[0], args[1], max_shard_mb=float(args[2]))
        extra = {}
    # ru_maxrss is KiB on Linux
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **extra}))


def _run(*args) -> tuple[dict, float]:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--max-shard-mb", type=float, default=2048,
                   help="safetensors shard size of the Megatron -> HF output")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--results", default=None, help="append a markdown table to this file")
    a = p.parse_args()
    work = tempfile.mkdtemp(dir=a.workdir, prefix="bench_convert_")
    rows = []
    try:
        for gb in a.sizes_gb:
            layers = max(1, round((gb * 1e9 - FIXED_BYTES) / LAYER_BYTES))
            hf, ck, back = (os.path.join(work, n) for n in ("hf", "ckpt", "back"))
            gen, _ = _run("generate", hf, str(layers))
            to_m, t_m = _run("hf2mcore", hf, ck)
            to_h, t_h = _run("mcore2hf", ck, back, str(a.max_shard_mb))
            row = dict(layers=layers, model_gb=gen["bytes"] / 1e9, ckpt_gb=dir_bytes(ck) / 1e9,
                       hf2mcore_mib=to_m["peak_rss_mib"], hf2mcore_s=t_m,
                       mcore2hf_mib=to_h["peak_rss_mib"], mcore2hf_s=t_h)
            rows.append(row)
            print(json.dumps(row), flush=True)
            for d in (hf, ck, back):
                shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| layers | model (GB, bf16) | HF -> Megatron peak RSS (MiB) | time (s) "
             "| Megatron -> HF peak RSS (MiB) | time (s) |", "|---|---|---|---|---|---|"]
    table += [f"| {r['layers']} | {r['model_gb']:.2f} | {r['hf2mcore_mib']:.0f} | "
              f"{r['hf2mcore_s']:.0f} | {r['mcore2hf_mib']:.0f} | {r['mcore2hf_s']:.0f} |"
              for r in rows]
    print("\n".join(table))
    if a.results:
        import torch
        with open(a.results, "a", encoding="utf-8") as fh:
            fh.write(SECTION.format(cpu=platform.processor() or platform.machine(),
                                    cores=os.cpu_count(), torch=torch.__version__,
                                    shard=a.max_shard_mb, table="\n".join(table),
                                    date=time.strftime("%Y-%m-%d")))


SECTION = """
## Checkpoint conversion

`benchmarks/bench_convert_memory.py` ({date}; {cores}-core {cpu} CPU, shared machine, torch
{torch}): a random bf16 Qwen2-shaped model (hidden 512, 32k vocabulary, more layers for more
size) converted HF -> Megatron torch_dist (`--tp 2`) and back (`--max-shard-mb {shard:g}`),
each step in a fresh process reporting its own peak RSS (imports of torch, megatron-core and
transformers included). Streaming shows as a flat peak RSS while the model grows: both
converters hold one tensor-layer at a time (safetensors shards are written tensor by tensor,
so the shard size does not matter either). Times include ~5 s of imports and vary with the
load of the machine; peak RSS is the figure to read.

{table}
"""

if __name__ == "__main__":
    main()
