"""The final HF export (trainer/hf_export.py): every rank writes a share of the files from the
last committed checkpoint, and together they are byte for byte what the offline converter
writes from that checkpoint alone."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from convert_models import make_model
from dist_helpers import run_ranks

from mopd_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

SHARD_MB = 0.05  # the ~1 MB tiny model in several files


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    hf_dir = make_model(str(root), "Qwen2ForCausalLM")
    ckpt = root / "mcore"
    convert_hf_to_megatron(hf_dir, str(ckpt), dtype="fp32")
    offline = root / "offline"
    convert_megatron_to_hf(str(ckpt), str(offline), max_shard_mb=SHARD_MB)
    return root, hf_dir, ckpt, _files(offline)


def test_writers_share_the_files_and_write_the_offline_bytes(converted, tmp_path):
    _, _, ckpt, want = converted
    shards = sorted(n for n in want if n.endswith(".safetensors"))
    assert len(shards) >= 3
    out = tmp_path / "parts"
    out.mkdir()
    for i in range(3):  # writer i writes shard files i, i + 3, ... (and 0 the rest)
        before = set(os.listdir(out))
        convert_megatron_to_hf(str(ckpt), str(out), max_shard_mb=SHARD_MB, part=(i, 3))
        new = set(os.listdir(out)) - before
        assert sorted(n for n in new if n.endswith(".safetensors")) == shards[i::3]
        assert (i == 0) == ("model.safetensors.index.json" in new)
    assert _files(out) == want


def _export(rank, world, cfg):
    import torch.distributed as dist

    from mopd_megatron.trainer.hf_export import export_committed
    dist.init_process_group("gloo")
    export_committed(cfg, max_shard_mb=SHARD_MB)
    return sorted(os.listdir(cfg.checkpoint.hf_export_dir))


def test_ranks_export_the_committed_checkpoint_together(converted, tmp_path):
    from mopd_megatron.checkpoint import save_atomic
    root, _, ckpt, want = converted
    ckpt_root = tmp_path / "ckpt"
    save_atomic(ckpt_root, 7, lambda tmp: shutil.copytree(ckpt, tmp / "dist"))
    out = tmp_path / "student_hf"
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(dir=str(ckpt_root), hf_export_dir=str(out)),
                          model=SimpleNamespace(hf_config=str(ckpt)))  # config.json is there
    listed = run_ranks(_export, 2, cfg)
    assert all(names == sorted(want) for names in listed)  # complete when any rank returns
    assert _files(out) == want
