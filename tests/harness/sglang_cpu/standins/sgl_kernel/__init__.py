"""CPU TEST HARNESS ONLY - never on sys.path of a GPU job.

Stand-in for `sgl_kernel`, SGLang's compiled kernel package. Its PyPI wheels are CUDA builds
(importing them fails without libcuda) and the CPU build is source-only, yet SGLang's CPU
model runner imports a few symbols unconditionally. This module provides those in plain
PyTorch; every other attribute resolves to a function that raises NotImplementedError naming
the missing kernel, so an unexpected code path fails loudly instead of computing garbage.

setup.sh appends this folder to the END of sys.path (.pth file), so a real sgl_kernel, when
installed, always wins.
"""
from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+mopd.cpu.harness"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Write each request's new KV-cache slots into its row of the request->token table.

    req_to_token: [max_reqs, pool_len]; out_cache_loc: [sum(end - start)] packed in request
    order. Request i owns out_cache_loc[cum_i : cum_i + (end_i - start_i)].
    """
    del pool_len  # row length of req_to_token; slicing already respects it
    cursor = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(),
                               end_offset.tolist()):
        count = end - start
        if count <= 0:
            continue
        req_to_token[row, start:end] = out_cache_loc[cursor:cursor + count].to(req_to_token.dtype)
        cursor += count


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """Move KV rows src_loc -> tgt_loc in every per-layer buffer (used by cache defragmentation).

    data_ptrs: [n_buffers] int64 base addresses; strides: [n_buffers] bytes per token row.
    The kernel only receives raw addresses, so the copy is done on raw memory as well.
    """
    for base, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        for dst, src in zip(tgt_loc.tolist(), src_loc.tolist()):
            ctypes.memmove(base + dst * row_bytes, base + src * row_bytes, row_bytes)


def weak_ref_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The real op returns a non-owning alias (for CUDA graphs); on CPU the tensor itself does."""
    return tensor


def _not_in_harness(name: str):
    def missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by the mopd CPU test harness stand-in "
            "(tests/harness/sglang_cpu/standins/sgl_kernel); a real sgl_kernel build is needed")
    missing.__name__ = name
    return missing


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _not_in_harness(name)
