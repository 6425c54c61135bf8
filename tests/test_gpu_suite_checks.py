"""The GPU suite's checks run their own comparison code on CPU where a CPU twin exists, so a
check that first meets a GPU is not also meeting its own bugs there.

packed_thd: the same function the GPU check calls, with the local spec (the block-diagonal mask
instead of THD) and a smaller vocabulary: packed and padded rows agree to fp32 rounding.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_helpers import run_ranks

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def packed_on_cpu(rank, world):
    sys.path.insert(0, str(BENCH))
    import torch

    from gpu import packed_thd
    from mopd_megatron.runtime import init_runtime
    init_runtime(tp=1, pp=1, vpp=None, seed=1)
    return packed_thd.compare(torch, use_te=False, device="cpu", dtype="fp32", vocab_size=2048)


@pytest.mark.slow
def test_packed_thd_check_runs_its_comparison_on_the_mask_path():
    out = run_ranks(packed_on_cpu, 1)[0]
    assert out["format"] == "mask" and out["sequences"] == 6
    assert out["tokens"] == sum(24 + n for n in (361, 282, 11, 300, 9, 12))
    # fp32 on CPU, no TF32: much tighter than the GPU tolerance (1e-3 nats, 1e-2)
    assert out["logp_max_abs"] < 1e-4 and out["grad_max_rel"] < 1e-4, out
