"""sglang_cuda: a colocated SGLang engine on the GPU, driven the way the trainer drives it.

Server: RolloutConfig(mode=colocated) -> server_specs_from_config, which adds
--enable-memory-saver on CUDA; started with the launcher's SGLangServer and wrapped in
SGLangEngine exactly as SGLangEngine.launch does (started here one step at a time so that the
server's process group is recorded before the wait: the suite stops it if the check runs out
of time). Trainer side: a Megatron student of a second checkpoint (random seed 1 vs the
server's seed 0) loaded through trainer/builders.py::load_weights, exported with
convert.export_hf_weights and pushed with SGLangEngine.update_weights, i.e.
weight_sync.push_tensor_buckets with CUDA tensors (CUDA-IPC handles). The order is the
trainer's: release before training, resume, then sync and the parity probe.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from .common import (GIB, CheckFailed, Skip, device_used_bytes, fmt_gib, free_port,
                     init_megatron, load_file, require)

# A tiny Qwen2 whose head_dim (64) every CUDA attention backend supports; init std 0.1 gives
# peaked next-token distributions, so the probe tells the two seeds apart (~nats) while bf16
# noise stays at ~0.01 nats.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2)
INIT_STD = 0.1
MEM_FRACTION = 0.2             # of the card: weights + KV cache, what release should give back
BUCKET_MIB = 1                 # several buckets even for a tiny model
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a tiny "
              "language model that learned to count: 1, 2, 3, 4, 5.")
# Startup without CUDA graphs: the capture costs tens of seconds the suite does not have, and
# the memory saver's release/resume covers weights and KV cache either way.
SERVER_ARGS = ("--disable-cuda-graph", "--log-level", "warning")
MIN_FREED, MIN_RESUMED = 0.5, 0.8  # of the server's footprint / of what release freed


def _log_tail(path: str | None, n: int = 25) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:])


def run(rec, opts) -> None:
    device = getattr(opts, "sglang_device", None) or "cuda"
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    require("sglang", "the SGLang server")
    if device == "cuda":  # what --enable-memory-saver loads in the server
        require("torch_memory_saver", "SGLang's memory saver (--enable-memory-saver)")
    require("megatron.core", "the trainer side")
    from transformers import AutoTokenizer

    from mopd_megatron.config import ParallelConfig, RolloutConfig
    from mopd_megatron.convert import export_hf_weights
    from mopd_megatron.models.builder import build_model_chunks
    from mopd_megatron.models.hf_config import load_hf_config
    from mopd_megatron.rollout import SamplingParams, SGLangEngine, parity_probe
    from mopd_megatron.rollout.server import SGLangServer
    from mopd_megatron.rollout.sglang_engine import server_specs_from_config
    from mopd_megatron.trainer.builders import load_weights
    from mopd_megatron.trainer.sync import trainer_probe_logprobs
    make_tiny_hf = load_file("mopd_make_tiny_hf", "tools/make_tiny_hf.py").make_tiny_hf

    cuda = device == "cuda"
    tmp = tempfile.mkdtemp(prefix="gpu_suite_sglang.")
    t0 = time.perf_counter()
    start_dir = make_tiny_hf(os.path.join(tmp, "engine_start"), "qwen2", 0, init_std=INIT_STD,
                             **SHAPE)
    trainer_dir = make_tiny_hf(os.path.join(tmp, "trainer"), "qwen2", 1, init_std=INIT_STD,
                               **SHAPE)
    rec.update(dict(model=dict(arch="qwen2", init_std=INIT_STD, **SHAPE), workdir=tmp,
                    build_models_s=time.perf_counter() - t0))

    layout = init_megatron()
    hf = load_hf_config(trainer_dir)
    chunks = build_model_chunks(hf, ParallelConfig(), dtype="bf16")
    load_weights(chunks, trainer_dir, "hf", hf)
    tok = AutoTokenizer.from_pretrained(trainer_dir, local_files_only=True)
    probe = tok.encode(PROBE_TEXT)[:48]
    ours = trainer_probe_logprobs(chunks, layout, hf.vocab_size, probe)

    ro = RolloutConfig(mode="colocated", mem_fraction_static=MEM_FRACTION, base_port=free_port(),
                       startup_timeout_s=max(30.0, rec.remaining() - 60.0), concurrency=8,
                       request_timeout_s=60.0, weight_sync_bucket_mib=BUCKET_MIB,
                       server_args=list(SERVER_ARGS),
                       max_total_tokens=None if cuda else 8192)
    [spec] = server_specs_from_config(ro, start_dir, log_dir=tmp, device=device)
    # The tiny checkpoint is saved in fp32; a real one is bf16 and "auto" would pick that.
    spec = dataclasses.replace(spec, dtype="bfloat16")
    cmd = spec.command()
    rec.update(dict(server_command=" ".join(cmd[1:]), memory_saver="--enable-memory-saver" in cmd,
                    parity_tolerance=ro.parity_tolerance, probe_tokens=len(probe)))
    if cuda and "--enable-memory-saver" not in cmd:
        raise CheckFailed("the colocated CUDA server was launched without --enable-memory-saver")

    used = {}
    if cuda:
        torch.cuda.synchronize()
        used["before server"] = device_used_bytes()
    server = SGLangServer(spec, ro.startup_timeout_s)
    engine = None
    try:
        t0 = time.perf_counter()
        server.start(wait=False)
        rec.add_pgid(server.process.pid)
        try:
            server.wait_ready()
        except Exception as e:
            raise CheckFailed(f"server did not start: {e}\n{_log_tail(spec.log_path)}") from None
        engine = SGLangEngine([server.url], [server], tp_sizes=[spec.tp_size],
                              concurrency=ro.concurrency, request_timeout_s=ro.request_timeout_s,
                              samples_per_request=ro.samples_per_request)
        rec.set("startup_s", time.perf_counter() - t0)
        if cuda:
            used["with server"] = device_used_bytes()
        pre = parity_probe(engine, [probe], [ours])
        rec.set("parity_before_sync", dataclasses.asdict(pre))

        t0 = time.perf_counter()
        engine.release_memory()
        rec.set("release_s", time.perf_counter() - t0)
        if cuda:
            used["after release_memory"] = device_used_bytes()
        t0 = time.perf_counter()
        engine.resume_memory()
        rec.set("resume_s", time.perf_counter() - t0)
        if cuda:
            used["after resume_memory"] = device_used_bytes()
            rec.set("device_used_bytes", used)

        devices = set()

        def buckets():
            for bucket in export_hf_weights(chunks, hf, layout, ro.weight_sync_bucket_mib):
                devices.update(t.device.type for _, t in bucket)
                yield bucket
        t0 = time.perf_counter()
        stats = engine.update_weights(buckets(), "gpu_suite")
        rec.set("sync", dict(seconds=time.perf_counter() - t0, push_seconds=stats.seconds,
                             bytes=stats.bytes, buckets=stats.buckets, tensors=stats.tensors,
                             tensor_devices=sorted(devices),
                             transport="cuda_ipc" if devices == {"cuda"} else "shm",
                             api=engine.weight_update_api()))
        post = parity_probe(engine, [probe], [ours])
        rec.set("parity_after_sync", dataclasses.asdict(post))
        samples = engine.generate([probe[:8]], 2, SamplingParams(max_new_tokens=8,
                                                                 ignore_eos=True))
        versions = sorted({s.weight_version for s in samples})
        rec.set("generate_after_sync", dict(samples=len(samples), weight_versions=versions,
                                            tokens=[len(s.token_ids) for s in samples]))
    finally:
        if engine is not None:
            engine.shutdown()
        else:
            server.stop()

    bad = []
    if cuda:
        footprint = used["with server"] - used["before server"]
        freed = used["with server"] - used["after release_memory"]
        resumed = used["after resume_memory"] - used["after release_memory"]
        rec.update(dict(server_footprint_bytes=footprint, released_bytes=freed,
                        resumed_bytes=resumed))
        if freed < MIN_FREED * footprint:
            bad.append(f"release_memory freed {freed / GIB:.2f} GiB of the server's "
                       f"{footprint / GIB:.2f} GiB (< {MIN_FREED:.0%})")
        if resumed < MIN_RESUMED * freed:
            bad.append(f"resume_memory took back {resumed / GIB:.2f} of {freed / GIB:.2f} GiB")
        if devices != {"cuda"}:
            bad.append(f"the exported buckets were on {sorted(devices)}, not CUDA: no CUDA-IPC")
    if not post.mean_abs_diff <= ro.parity_tolerance:
        bad.append(f"parity after sync {post.mean_abs_diff:.3g} nats > {ro.parity_tolerance}")
    if not pre.mean_abs_diff > max(ro.parity_tolerance, 5 * post.mean_abs_diff):
        bad.append(f"parity before sync {pre.mean_abs_diff:.3g} nats: the probe cannot tell the "
                   "two checkpoints apart, so it proves nothing about the sync")
    if versions != ["gpu_suite"]:
        bad.append(f"samples after the sync carry weight versions {versions}")
    if bad:
        raise CheckFailed("; ".join(bad) + f" (models and server log kept in {tmp})")
    shutil.rmtree(tmp, ignore_errors=True)


def summary(f: dict) -> list[str]:
    out = []
    if "server_command" in f:
        out.append(f"- server: `{f['server_command']}` (memory saver: {f.get('memory_saver')}); "
                   f"ready in {f.get('startup_s', 0):.1f} s")
    u = f.get("device_used_bytes") or {}
    if u:
        out.append("- GPU memory in use (whole device, GiB): " + ", ".join(
            f"{k} {fmt_gib(v)}" for k, v in u.items())
            + f"; release_memory {f.get('release_s', 0):.2f} s, resume_memory "
              f"{f.get('resume_s', 0):.2f} s")
    if "released_bytes" in f:
        out.append(f"- server footprint {fmt_gib(f['server_footprint_bytes'])} GiB, released "
                   f"{fmt_gib(f['released_bytes'])} GiB, resumed {fmt_gib(f['resumed_bytes'])} GiB")
    s = f.get("sync")
    if s:
        out.append(f"- weight sync ({s['transport']}, API {s['api']}): {s['bytes'] / 2**20:.1f} MiB "
                   f"in {s['buckets']} buckets / {s['tensors']} tensors, {s['seconds']:.3f} s with "
                   f"the export ({s['push_seconds']:.3f} s push)")
    pre, post = f.get("parity_before_sync"), f.get("parity_after_sync")
    if pre and post:
        out.append(f"- parity probe ({f.get('probe_tokens')} tokens, mean |log p_engine - log "
                   f"p_trainer|): before the sync {pre['mean_abs_diff']:.3g} nats, after "
                   f"{post['mean_abs_diff']:.3g} (max {post['max_abs_diff']:.3g}; tolerance "
                   f"{f.get('parity_tolerance')})")
    return out
