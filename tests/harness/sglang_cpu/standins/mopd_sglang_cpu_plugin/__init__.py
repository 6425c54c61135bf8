"""CPU TEST HARNESS ONLY - never on sys.path of a GPU job.

An SGLang general plugin (entry-point group ``sglang.srt.plugins``, loaded by every SGLang
process through ``sglang.srt.plugins.load_plugins``) that makes the ``torch_native`` attention
backend's decode step one batched SDPA call instead of one call per sequence.

Why: on CPU the per-sequence Python loop in ``TorchNativeAttnBackend._run_sdpa_forward_decode``
was half of the scheduler's time for the demo's 128-sample batches of a 2-layer model (its own
source marks the loop "inefficient ... optimize later"). The batched form gathers each
sequence's keys and values through ``req_to_token`` padded to the longest sequence and masks
the padding; the arithmetic per sequence is the same. Cases it does not cover (cross-attention,
encoder lengths, sliding windows, causal decode, more than one query token per sequence) go to
SGLang's own loop unchanged.

``MOPD_SGLANG_BATCHED_DECODE=0`` in a server's environment turns the plugin off.
"""
from __future__ import annotations

import os

TARGET = ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
          "_run_sdpa_forward_decode")


def batched_sdpa_decode(query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                        seq_lens, *, scaling=None, enable_gqa=False):
    """Decode attention for one query token per sequence, all sequences at once.

    query/output: [num_seqs, heads, head_dim]; k_cache/v_cache: [pool_tokens, kv_heads,
    head_dim]; req_to_token: [max_reqs, max_context]; seq_lens: [num_seqs] (keys per sequence,
    the new token included). Writes into and returns ``output``.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention
    longest = int(seq_lens.max())
    slots = req_to_token[req_pool_indices, :longest]            # [B, L]; past a row's length:
    keys = k_cache[slots].transpose(1, 2)                        # stale slots, masked below
    values = v_cache[slots].transpose(1, 2)                      # [B, kv_heads, L, D]
    keep = torch.arange(longest, device=seq_lens.device)[None, :] < seq_lens[:, None]
    q = query.unsqueeze(2)                                       # [B, heads, 1, D]
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = scaled_dot_product_attention(q, keys, values, attn_mask=keep[:, None, None, :],
                                       scale=scaling, enable_gqa=enable_gqa)
    output.copy_(out.squeeze(2))
    return output


def _around_decode(original, self, query, output, k_cache, v_cache, req_to_token,
                   req_pool_indices, seq_lens, encoder_lens=None, scaling=None, enable_gqa=False,
                   causal=False, is_cross_attn=False, sliding_window_size=None):
    if (encoder_lens is not None or is_cross_attn or causal or sliding_window_size is not None
            or query.shape[0] != seq_lens.shape[0] or seq_lens.shape[0] == 0):
        return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                        seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn,
                        sliding_window_size=sliding_window_size)
    return batched_sdpa_decode(query, output, k_cache, v_cache, req_to_token,
                               req_pool_indices, seq_lens, scaling=scaling,
                               enable_gqa=enable_gqa)


def register() -> None:
    """The entry point: SGLang calls it in each of its processes before serving."""
    if os.environ.get("MOPD_SGLANG_BATCHED_DECODE", "1") == "0":
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    HookRegistry.register(TARGET, _around_decode, HookType.AROUND)
