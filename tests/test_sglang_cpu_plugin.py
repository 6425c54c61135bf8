"""The CPU harness's SGLang plugin: batched decode attention for the torch_native backend.

The plugin replaces a per-sequence Python loop by one padded, masked SDPA call. Checked here
against a float64 attention written in this file and against SGLang's own loop (the method the
plugin wraps, called through the real plugin loader in a fresh process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PLUGIN_DIR = Path(__file__).resolve().parent / "harness" / "sglang_cpu" / "standins"
sys.path.insert(0, str(PLUGIN_DIR))
from mopd_sglang_cpu_plugin import batched_sdpa_decode  # noqa: E402

sys.path.remove(str(PLUGIN_DIR))

# float32 kernel against a float64 reference: observed ~1e-7; 1e-5 leaves room for summation
# order while a wrong slot, a missed mask or a wrong head mapping costs O(1).
ATOL = 1e-5


def make_case(seed: int, lens: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8,
              pool: int = 200, max_ctx: int = 24):
    """Random caches; each sequence's slots scattered over the pool; the slots past a row's
    length point at tokens filled with large values, so attending to them shows."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(pool, kv_heads, dim, generator=g)
    v_cache = torch.randn(pool, kv_heads, dim, generator=g)
    req_to_token = torch.zeros(len(lens) + 3, max_ctx, dtype=torch.long)
    order = torch.randperm(pool - 8, generator=g) + 8
    poison_slots = torch.arange(8)                        # never a live token
    k_cache[poison_slots] = 1e4
    v_cache[poison_slots] = -1e4
    req_pool_indices = torch.randperm(len(lens) + 3, generator=g)[:len(lens)]
    used = 0
    for i, n in enumerate(lens):
        row = req_pool_indices[i]
        req_to_token[row, :n] = order[used:used + n]
        req_to_token[row, n:] = poison_slots[torch.arange(max_ctx - n) % 8]
        used += n
    query = torch.randn(len(lens), heads, dim, generator=g)
    return query, k_cache, v_cache, req_to_token, req_pool_indices, torch.tensor(lens)


def reference(query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    """Attention of each sequence's one query over its own keys, float64, head by head."""
    heads, kv_heads = query.shape[1], k_cache.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for b in range(query.shape[0]):
        slots = req_to_token[req_pool_indices[b], :int(seq_lens[b])]
        k, v = k_cache[slots].double(), v_cache[slots].double()   # [n, kv_heads, D]
        for h in range(heads):
            kh = h // (heads // kv_heads)                        # GQA: consecutive heads share
            w = torch.softmax((k[:, kh] @ query[b, h].double()) * scale, dim=0)
            out[b, h] = w @ v[:, kh]
    return out


@pytest.mark.parametrize("lens", [[1], [5, 1, 9, 3], [12] * 6, list(range(1, 17))])
def test_batched_decode_matches_float64_reference(lens):
    query, kc, vc, r2t, idx, seq_lens = make_case(len(lens), lens)
    out = torch.full_like(query, float("nan"))               # every element must be written
    scale = 0.3
    got = batched_sdpa_decode(query, out, kc, vc, r2t, idx, seq_lens, scaling=scale,
                              enable_gqa=True)
    assert got is out
    want = reference(query, kc, vc, r2t, idx, seq_lens, scale)
    assert torch.allclose(out.double(), want, atol=ATOL, rtol=0), (out.double() - want).abs().max()


def test_equal_heads_without_gqa():
    query, kc, vc, r2t, idx, seq_lens = make_case(7, [4, 2, 6], heads=2, kv_heads=2)
    out = torch.full_like(query, float("nan"))
    batched_sdpa_decode(query, out, kc, vc, r2t, idx, seq_lens, scaling=None)
    want = reference(query, kc, vc, r2t, idx, seq_lens, query.shape[-1] ** -0.5)
    assert torch.allclose(out.double(), want, atol=ATOL, rtol=0)


SGLANG_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend as B
from test_sglang_cpu_plugin import make_case
hooked = B._run_sdpa_forward_decode
original = getattr(hooked, "__wrapped__", None)
res = {"hooked": original is not None}
me = B.__new__(B)   # the loop reads no instance state but the sliding-window mask helper
if original is not None:
    q, kc, vc, r2t, idx, lens = make_case(3, [5, 1, 9, 3, 7])
    a, b = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    hooked(me, q, a, kc, vc, r2t, idx, lens, None, scaling=0.3, enable_gqa=True)
    original(me, q, b, kc, vc, r2t, idx, lens, None, scaling=0.3, enable_gqa=True)
    res["max_diff"] = float((a - b).abs().max())
    # a sliding window is left to SGLang's loop: same result as calling it directly
    hooked(me, q, a, kc, vc, r2t, idx, lens, None, scaling=0.3, enable_gqa=True,
           sliding_window_size=2)
    original(me, q, b, kc, vc, r2t, idx, lens, None, scaling=0.3, enable_gqa=True,
             sliding_window_size=2)
    res["window_equal"] = bool(torch.equal(a, b))
print("RESULT " + json.dumps(res))
"""


def run_in_sglang(env_extra: dict) -> dict:
    pytest.importorskip("sglang", reason="SGLang CPU harness not installed "
                        "(tests/harness/sglang_cpu/setup.sh)")
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", **env_extra}
    proc = subprocess.run([sys.executable, "-c", SGLANG_CHECK, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.slow
def test_sglang_loads_the_plugin_and_it_matches_sglangs_own_loop():
    res = run_in_sglang({})
    assert res["hooked"], "the installed harness did not register mopd_batched_decode"
    assert res["max_diff"] < ATOL, res
    assert res["window_equal"], res


@pytest.mark.slow
def test_plugin_can_be_turned_off():
    assert run_in_sglang({"MOPD_SGLANG_BATCHED_DECODE": "0"}) == {"hooked": False}
