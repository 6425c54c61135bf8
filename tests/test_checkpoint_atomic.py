"""Atomic checkpoint directories: crash safety (real SIGKILL), pointer, pruning, multi-rank."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mopd_megatron.checkpoint import steps as ckpt
from tests.dist_helpers import run_ranks

REPO = Path(__file__).resolve().parents[1]


def tensors_for(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}


def writer(step: int):
    def write(d: Path) -> None:
        torch.save(tensors_for(step), d / "model.pt")
        (d / "data_state.json").write_text(json.dumps({"draws": step * 10}))
    return write


def assert_loadable(path: Path, step: int) -> None:
    loaded = torch.load(path / "model.pt")
    for k, v in tensors_for(step).items():
        assert torch.equal(loaded[k], v)
    assert json.loads((path / "data_state.json").read_text()) == {"draws": step * 10}
    assert ckpt.read_marker(path)["step"] == step


# A writer that finishes step 1, then dies (SIGKILL from the test) in the middle of step 2.
CRASHING_SAVER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from mopd_megatron.checkpoint import steps as ckpt
    root = Path(sys.argv[1])
    def write1(d):
        g = torch.Generator().manual_seed(1)
        torch.save({"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}, d / "model.pt")
        (d / "data_state.json").write_text('{"draws": 10}')
    ckpt.save_atomic(root, 1, write1)
    def write2(d):
        torch.save({"w": torch.zeros(64, 32)}, d / "model.pt")
        print("WRITING", flush=True)
        time.sleep(60)  # killed here
        (d / "data_state.json").write_text('{"draws": 20}')
    ckpt.save_atomic(root, 2, write2)
    print("UNREACHABLE", flush=True)
""")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SAVER, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", line
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith("tmp.")]
    assert leftovers == [f"tmp.2.{proc.pid}"]
    latest = ckpt.find_latest(root)
    assert latest == root / "step_1"
    assert_loadable(latest, 1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]  # partial save cleaned
    # The run resumes and saves step 2 for real.
    assert ckpt.save_atomic(root, 2, writer(2)) == root / "step_2"
    assert ckpt.find_latest(root) == root / "step_2"
    assert_loadable(root / "step_2", 2)


def test_crash_between_commit_and_pointer(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    ckpt.save_atomic(root, 1, writer(1))

    def crash(*_):
        raise KeyboardInterrupt("killed before the pointer moved")
    monkeypatch.setattr(ckpt, "_write_pointer", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic(root, 2, writer(2))
    monkeypatch.undo()
    # step_2 is complete but was never selected: the pointer keeps the run on step_1 ...
    assert ckpt.read_marker(root / "step_2") is not None
    assert ckpt.find_latest(root) == root / "step_1"
    # ... and re-saving step 2 after resuming replaces the orphan.
    ckpt.save_atomic(root, 2, writer(2))
    assert ckpt.find_latest(root) == root / "step_2"
    assert_loadable(root / "step_2", 2)


def test_pointer_order_beats_step_order_and_fallbacks(tmp_path):
    root = tmp_path / "ckpt"
    assert ckpt.find_latest(root) is None
    for s in (10, 20, 30):
        ckpt.save_atomic(root, s, writer(s))
    assert (root / "latest").read_text() == "step_30\n"
    # A run resumed from step_10 (checkpoint.resume=<path>) and saved step 15: commit order wins.
    ckpt.save_atomic(root, 15, writer(15))
    assert ckpt.find_latest(root) == root / "step_15"
    with pytest.raises(FileExistsError, match="is the selected one"):
        ckpt.save_atomic(root, 15, writer(15))
    # Pointer lost or naming a deleted checkpoint: the highest complete step.
    (root / "latest").write_text("step_99\n")
    assert ckpt.find_latest(root) == root / "step_30"
    (root / "latest").unlink()
    (root / "step_30" / ckpt.MARKER).unlink()   # incomplete: never selected
    assert ckpt.find_latest(root) == root / "step_20"
    (root / "step_7").mkdir()                   # a stray directory without a marker
    (root / "deleting.step_3.123").mkdir()      # a crashed prune
    assert ckpt.find_latest(root) == root / "step_20"
    assert not (root / "deleting.step_3.123").exists()


def test_keep_last_never_deletes_the_selected_one(tmp_path):
    root = tmp_path / "ckpt"
    for s in (1, 2, 3, 4):
        ckpt.save_atomic(root, s, writer(s), keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_4"]
    # Resumed from step_3 (protected), later steps with keep_last=1 keep step_3 too.
    ckpt.save_atomic(root, 5, writer(5), keep_last=1, protect=(root / "step_3",))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_5"]
    # The pointer's target survives even when it is not among the highest steps.
    (root / "latest").write_text("step_3\n")
    assert ckpt.prune(root, 1) == []
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_5"]
    with pytest.raises(ValueError, match="keep_last=0"):
        ckpt.prune(root, 0)


def _two_rank_save(rank: int, world_size: int, root: str) -> list[str]:
    import torch.distributed as dist

    from mopd_megatron.runtime import broadcast_object
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    def write(d: Path) -> None:
        torch.save({"shard": torch.full((4,), float(rank))}, d / f"shard_{rank}.pt")

    out = ckpt.save_atomic(root, 3, write, rank=rank, world_size=world_size,
                           barrier=dist.barrier, share=broadcast_object)
    # After the final barrier every rank sees the committed directory with all shards.
    return sorted(p.name for p in Path(out).iterdir())


def test_multi_rank_save_commits_once_after_all_ranks_wrote(tmp_path):
    root = tmp_path / "ckpt"
    seen = run_ranks(_two_rank_save, 2, str(root), timeout=120)
    expected = sorted([ckpt.MARKER, "shard_0.pt", "shard_1.pt"])
    assert seen == [expected, expected]
    assert ckpt.find_latest(root) == root / "step_3"
    assert ckpt.read_marker(root / "step_3")["world_size"] == 2
    assert torch.equal(torch.load(root / "step_3" / "shard_1.pt")["shard"], torch.ones(4))
    with pytest.raises(ValueError, match="needs barrier and share"):
        ckpt.save_atomic(root, 4, writer(4), world_size=2)
