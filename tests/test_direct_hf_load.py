"""Loading an HF checkpoint directly into the built Megatron model (convert.load_hf_weights).

- Every mapping's ``shard`` is the piece of the full Megatron tensor Megatron gives a TP rank
  (the inverse of ``gather_tp``, which tests/test_convert_mappings.py checks against layouts
  written by hand), and reads only that piece.
- At TP=2 x PP=2 on 4 real gloo ranks (and PP=2 x VPP=2 with tied embeddings), for Qwen2
  (q/k/v bias), Llama (tied embeddings, two safetensors files), Qwen3 (QK norm, bf16 model):
  the weights are bitwise those of the offline path (convert HF -> Megatron with the converter,
  load that), every parameter is overwritten, each rank reads only its shards' bytes, and the
  directory holding the models (and its parent) is unchanged, down to directory mtimes.
- The trainer: a format-hf student reproduces the golden per-step losses (recorded from the
  Megatron-format student), writes nothing next to the model, and a resume (checkpoint.resume
  auto) never reads model.checkpoint: the run resumes after the HF weights were overwritten
  with garbage, with the golden losses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from convert_models import VOCAB, make_model
from dist_helpers import run_ranks

from mopd_megatron.convert import ConversionError
from mopd_megatron.convert.mappings import (Context, Direct, FusedGateUp, FusedQKV, Split,
                                            Tensors, VocabRows)

CTX = Context(num_attention_heads=8, num_query_groups=4, kv_channels=2, vocab_size=10,
              padded_vocab_size=16)


# --- the mappings' shards ----------------------------------------------------------------------
class Counting(Tensors):
    """Tensors that count the elements read."""

    read_elems = 0

    def read(self, i, index=None):
        t = super().read(i, index)
        self.read_elems += t.numel()
        return t


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    qkv = ("q", "k", "v")
    return [  # mapping, HF tensors, Megatron's partition dim, padding rows of the full tensor
        (Direct("w"), [r(8, 6)], 0, 0),                      # column parallel
        (Direct("w"), [r(6, 8)], 1, 0),                      # row parallel (o_proj, down_proj)
        (VocabRows("emb"), [r(10, 3)], 0, 6),                # 10 rows padded to 16
        (FusedQKV(*qkv), [r(16, 5), r(8, 5), r(8, 5)], 0, 0),
        (FusedQKV(*qkv), [r(16), r(8), r(8)], 0, 0),         # biases
        (FusedGateUp("gate", "up"), [r(8, 3), r(8, 3)], 0, 0),
    ]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_are_the_pieces_megatron_holds_and_read_only_those(tp):
    for m, hf, dim, pad in _cases():
        full = m.to_megatron(hf, CTX)
        shards = []
        for rank in range(tp):
            src = Counting(hf)
            t = m.shard(src, CTX, Split(dim, rank, tp))
            shards.append(t)
            rows = full.shape[0] // tp if dim == 0 else full.shape[0]
            pad_here = max(0, min(rows, (rank + 1) * rows - (full.shape[0] - pad))) if pad else 0
            assert src.read_elems == t.numel() - pad_here * (t.numel() // t.shape[0]), m
        assert torch.equal(m.gather_tp(shards, dim), full), (m, tp)


def test_shard_refuses_a_split_the_model_cannot_have():
    q, k, v = torch.zeros(16, 5), torch.zeros(8, 5), torch.zeros(8, 5)
    with pytest.raises(ConversionError, match="query groups: 4 is not divisible by TP=3"):
        FusedQKV("q", "k", "v").shard(Tensors([q, k, v]), CTX, Split(0, 0, 3))
    with pytest.raises(ConversionError, match="only along"):
        FusedGateUp("g", "u").shard(Tensors([q, q]), CTX, Split(1, 0, 2))


# --- TP=2 x PP=2 against the offline path, on real ranks ---------------------------------------
# (arch, model dtype, layout)
CASES = {
    "qwen2-tp2pp2": ("Qwen2ForCausalLM", "fp32", dict(tp=2, pp=2)),
    "llama-tied-tp2pp2": ("LlamaForCausalLM", "fp32", dict(tp=2, pp=2)),
    "qwen3-bf16-tp2pp2": ("Qwen3ForCausalLM", "bf16", dict(tp=2, pp=2)),
    "llama-tied-pp2vpp2": ("LlamaForCausalLM", "fp32", dict(pp=2, vpp=2)),
}


def _split_into_two_files(hf_dir: str) -> None:
    """Re-save ``model.safetensors`` as two files with an index, as large models ship."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    os.remove(path)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(hf_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def tree(root: str) -> dict:
    """Every entry under ``root`` (root included) with its size and mtime: a file or directory
    created, changed or created-and-removed anywhere below changes it."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _direct_vs_offline(rank, world, cases):
    from mopd_megatron.config import ParallelConfig
    from mopd_megatron.convert import load_hf_weights
    from mopd_megatron.convert.export import local_parameters
    from mopd_megatron.models.builder import build_model_chunks
    from mopd_megatron.models.hf_config import load_hf_config
    from mopd_megatron.runtime import init_runtime
    from mopd_megatron.checkpoint import dist_ckpt
    from megatron.core import parallel_state as ps
    out = {}
    for name, (hf_dir, offline, dtype, layout) in cases.items():
        init_runtime(**layout, seed=5)
        hf = load_hf_config(hf_dir)
        want = build_model_chunks(hf, ParallelConfig(**layout), dtype=dtype)
        dist_ckpt.load(offline, want)
        got = build_model_chunks(hf, ParallelConfig(**layout), dtype=dtype)
        with torch.no_grad():
            for c in got:  # a parameter the load skipped would stay NaN
                for p in c.parameters():
                    p.fill_(float("nan"))
        stats = load_hf_weights(got, hf_dir, hf)
        w, g = local_parameters(want), local_parameters(got)
        unequal = sorted(f"{k}[{i}]" for (k, i) in w if not torch.equal(w[(k, i)], g[(k, i)]))
        # What this rank should have read: its parameters' elements in the files' dtype (fp32),
        # less the vocabulary padding rows (zeros, not in the file).
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        elems = 0
        for (k, _), p in g.items():
            elems += p.numel()
            if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
                rows = p.shape[0]
                pad = max(0, min(rows, (tp_rank + 1) * rows - VOCAB))
                elems -= pad * p.shape[1]
        out[name] = dict(unequal=unequal, params=len(w), same_keys=set(w) == set(g),
                         filled=stats.tensors, bytes_read=stats.bytes_read, expected=elems * 4,
                         dtypes={str(p.dtype) for p in g.values()})
    return out


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    from mopd_megatron.convert import convert_hf_to_megatron
    root = str(tmp_path_factory.mktemp("direct_hf"))
    models = os.path.join(root, "models")
    dirs = {arch: make_model(models, arch) for arch, _, _ in CASES.values()}
    _split_into_two_files(dirs["LlamaForCausalLM"])
    cases = {}
    for name, (arch, dtype, layout) in CASES.items():
        offline = os.path.join(root, "offline", name)
        convert_hf_to_megatron(dirs[arch], offline, tp=layout.get("tp", 1), pp=layout["pp"],
                               dtype=dtype)
        cases[name] = (dirs[arch], offline, dtype, layout)
    before = tree(root)
    results = run_ranks(_direct_vs_offline, 4, cases)
    return results, before, tree(root)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_direct_load_is_bitwise_the_offline_path(direct, case):
    results, _, _ = direct
    for rank, r in enumerate(results):
        res = r[case]
        assert res["same_keys"] and res["params"] == res["filled"] > 0, (rank, res)
        assert res["unequal"] == [], f"rank {rank}: differ from the offline path: {res['unequal']}"
        want_dtype = "torch.bfloat16" if CASES[case][1] == "bf16" else "torch.float32"
        assert res["dtypes"] == {want_dtype}


@pytest.mark.slow
def test_each_rank_reads_only_its_shards(direct):
    results, _, _ = direct
    for rank, r in enumerate(results):
        for case, res in r.items():
            assert res["bytes_read"] == res["expected"], (rank, case, res)


@pytest.mark.slow
def test_direct_load_writes_nothing(direct):
    _, before, after = direct
    assert after == before


# --- the trainer: a format-hf student, and a resume that does not read it ------------------------
class Stop(Exception):
    pass


def _train(rank, world, overrides, stop_at):
    """Train; with ``stop_at``, fail at the start of that step's rollout (a crash after the
    checkpoint of the step before). Returns the per-step losses and where the run started."""
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    from train_helpers import RECIPE

    def stop(trainer, step):
        if step == stop_at:
            raise Stop

    trainer = Trainer(load_recipe(RECIPE, overrides), hooks={"rollout": stop} if stop_at else {})
    try:
        trainer.train()
    except Stop:
        pass
    finally:
        trainer.close()
    return {"losses": trainer.losses, "start": trainer.start_step}


@pytest.mark.slow
def test_trainer_loads_hf_directly_and_a_resume_never_reads_it(tmp_path):
    from train_helpers import recipe_overrides, tiny_inputs
    golden = json.loads((Path(__file__).parent / "assets" /
                         "train_golden_losses.json").read_text())["losses"]
    tiny = tiny_inputs(tmp_path / "tiny")
    store = tmp_path / "store"
    student = store / "student_hf"
    shutil.copytree(tiny / "student" / "hf", student)
    overrides = recipe_overrides(tiny, tmp_path / "run", steps=len(golden), extra=[
        f"model.checkpoint={student}", "model.checkpoint_format=hf", "checkpoint.save_interval=1"])
    watched = {"store": str(store), "tiny": str(tiny)}
    before = {k: tree(v) for k, v in watched.items()}

    first = run_ranks(_train, 1, overrides, len(golden))[0]   # stops before the last step
    assert first["start"] == 0
    assert first["losses"] == pytest.approx(golden[:-1], rel=1e-5, abs=1e-7)
    assert {k: tree(v) for k, v in watched.items()} == before, "start-up wrote next to a model"

    for f in student.glob("*.safetensors"):   # any read of the initial weights now fails
        f.write_bytes(b"\xff" * f.stat().st_size)
    second = run_ranks(_train, 1, overrides, None)[0]
    assert second["start"] == len(golden) - 1
    assert second["losses"] == pytest.approx(golden, rel=1e-5, abs=1e-7)
