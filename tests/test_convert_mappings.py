"""Conversion mappings against layouts written out by hand here, and the converters' errors.

References are independent of the code under test: Megatron's fused QKV is built head by head
from its documented layout, the GLU TP split by slicing gate and up separately.
"""
import json
import os
import shutil

import pytest
import torch
from convert_models import VOCAB, hf_tensors, make_model

from mopd_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from mopd_megatron.convert.cli import hf_to_megatron_main, megatron_to_hf_main
from mopd_megatron.convert.mappings import Context, FusedGateUp, FusedQKV, VocabRows
from mopd_megatron.convert.tables import TABLES
from mopd_megatron.models.hf_config import UnsupportedModelError

CTX = Context(num_attention_heads=6, num_query_groups=2, kv_channels=4, vocab_size=10,
              padded_vocab_size=16)


def _reference_qkv(q, k, v, heads, groups, d):
    """Megatron layout: for each query group, its q heads, then its k head, then its v head."""
    rows = []
    per = heads // groups
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("rest", [(5,), ()])  # weight [out, hidden] and bias [out]
def test_fused_qkv_matches_head_by_head_layout(rest):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6 * 4, *rest, generator=g)
    k, v = torch.randn(2 * 4, *rest, generator=g), torch.randn(2 * 4, *rest, generator=g)
    m = FusedQKV("q", "k", "v")
    fused = m.to_megatron([q, k, v], CTX)
    assert torch.equal(fused, _reference_qkv(q, k, v, 6, 2, 4))
    back = m.to_hf(fused, CTX)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    # TP=2 splits rows into contiguous halves, each holding whole query groups.
    assert torch.equal(m.gather_tp(list(fused.chunk(2)), 0), fused)


def test_fused_qkv_rejects_wrong_shape():
    with pytest.raises(ConversionError, match=r"k: shape \(7, 5\), expected \(8, 5\)"):
        FusedQKV("q", "k", "v").to_megatron(
            [torch.zeros(24, 5), torch.zeros(7, 5), torch.zeros(8, 5)], CTX)


def test_gate_up_tp_gather_regroups_halves():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    m = FusedGateUp("gate", "up")
    full = m.to_megatron([gate, up], CTX)
    assert torch.equal(full, torch.cat([gate, up]))
    # What each of 4 TP ranks holds: its slice of gate stacked on its slice of up.
    shards = [torch.cat([gate[2 * r:2 * r + 2], up[2 * r:2 * r + 2]]) for r in range(4)]
    assert torch.equal(m.gather_tp(shards, 0), full)
    assert all(torch.equal(a, b) for a, b in zip(m.to_hf(full, CTX), (gate, up)))


def test_vocab_rows_pad_with_zeros_and_unpad():
    emb = torch.randn(10, 3)
    m = VocabRows("emb")
    padded = m.to_megatron([emb], CTX)
    assert padded.shape == (16, 3) and torch.equal(padded[:10], emb)
    assert not padded[10:].any()
    assert torch.equal(m.to_hf(padded, CTX)[0], emb)
    with pytest.raises(ConversionError, match="9 rows but vocab_size=10"):
        m.to_megatron([emb[:9]], CTX)
    with pytest.raises(ConversionError, match="fewer than vocab_size=10"):
        m.to_hf(emb[:8], CTX)


@pytest.mark.parametrize("arch", sorted(TABLES))
@pytest.mark.parametrize("flags", [{}, {"tie_word_embeddings": True}])
def test_tables_name_exactly_transformers_parameters(arch, flags):
    """The HF side of each table is what transformers builds, for every optional row."""
    from mopd_megatron.convert.hf_io import reference_shapes
    from mopd_megatron.convert.tables import hf_key_set
    from mopd_megatron.models.hf_config import load_hf_config
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3"}[arch]
    raw = dict(architectures=[arch], model_type=model_type, vocab_size=VOCAB, hidden_size=64,
               intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, **flags)
    assert hf_key_set(load_hf_config(raw)) == set(reference_shapes(raw))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("hf")), "Qwen2ForCausalLM")


def _copy(src, dst, edit=None, config=None):
    shutil.copytree(src, dst)
    if edit is not None:
        from safetensors.torch import save_file
        tensors = hf_tensors(src)
        edit(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        with open(os.path.join(dst, "config.json")) as fh:
            cfg = json.load(fh)
        cfg.update(config)
        with open(os.path.join(dst, "config.json"), "w") as fh:
            json.dump(cfg, fh)
    return str(dst)


def test_unknown_architecture_names_supported(qwen2, tmp_path):
    bad = _copy(qwen2, tmp_path / "m", config={"architectures": ["MistralForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM, "
                                                    "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        convert_hf_to_megatron(bad, str(tmp_path / "out"))


def test_attention_bias_with_o_proj_bias_is_refused(qwen2, tmp_path):
    bad = _copy(qwen2, tmp_path / "m", config={"architectures": ["LlamaForCausalLM"],
                                               "model_type": "llama", "attention_bias": True})
    with pytest.raises(UnsupportedModelError, match="attention_bias=true is not supported"):
        convert_hf_to_megatron(bad, str(tmp_path / "out"))


def test_missing_and_extra_tensors_are_listed(qwen2, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    bad = _copy(qwen2, tmp_path / "m", edit=edit)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_megatron(bad, str(tmp_path / "out"))
    assert "missing: ['model.layers.1.mlp.up_proj.weight']" in str(e.value)
    assert "unexpected: ['model.layers.1.mlp.extra.weight']" in str(e.value)


def test_shape_mismatch_names_tensor_and_shapes(qwen2, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    bad = _copy(qwen2, tmp_path / "m", edit=edit)
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.o_proj.weight: file has "
                                              r"\(64, 32\), config implies \(64, 64\)"):
        convert_hf_to_megatron(bad, str(tmp_path / "out"))


def test_layout_and_vocab_padding_checks(qwen2, tmp_path):
    with pytest.raises(ValueError, match="--tp 3 must divide the 4 attention heads"):
        convert_hf_to_megatron(qwen2, str(tmp_path / "a"), tp=3)
    with pytest.raises(ValueError, match="--pp 3 must divide the 4 layers of the model"):
        convert_hf_to_megatron(qwen2, str(tmp_path / "b"), pp=3)
    with pytest.raises(ValueError, match="make-vocab-size-divisible-by must be >= 1"):
        convert_hf_to_megatron(qwen2, str(tmp_path / "c"), make_vocab_size_divisible_by=0)
    bad = _copy(qwen2, tmp_path / "m", config={"vocab_size": VOCAB + 3})
    with pytest.raises(ConversionError, match=f"file has \\({VOCAB}, 64\\), config implies "
                                              f"\\({VOCAB + 3}, 64\\)"):
        convert_hf_to_megatron(bad, str(tmp_path / "d"))


def test_cli_round_trip_bf16_and_errors(qwen2, tmp_path, capsys):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert hf_to_megatron_main(["--hf-dir", qwen2, "--out", ckpt, "--dtype", "bf16",
                                "--no-progress"]) == 0
    assert megatron_to_hf_main(["--ckpt", ckpt, "--out", back, "--no-progress"]) == 0
    want, got = hf_tensors(qwen2), hf_tensors(back)
    assert set(want) == set(got)
    assert all(torch.equal(got[n], want[n].to(torch.bfloat16)) for n in want)
    with open(os.path.join(back, "config.json")) as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    # refuses a non-empty output directory, a missing config, a wrong checkpoint
    assert megatron_to_hf_main(["--ckpt", ckpt, "--out", back, "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err
    os.remove(os.path.join(ckpt, "config.json"))
    assert megatron_to_hf_main(["--ckpt", ckpt, "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"k_layernorm.weight', 'decoder.layers.self_"
                                              r"attention.q_layernorm.weight'\]\n  unexpected: "
                                              r"\['decoder.layers.self_attention.linear_qkv.bias'"):
        qwen3_cfg = _copy(qwen2, tmp_path / "q3", config={"architectures": ["Qwen3ForCausalLM"],
                                                           "model_type": "qwen3", "head_dim": 16})
        convert_megatron_to_hf(ckpt, str(tmp_path / "y"), hf_config=qwen3_cfg)
    assert megatron_to_hf_main(["--ckpt", qwen2, "--out", str(tmp_path / "z")]) == 2
    assert "not a torch_dist checkpoint" in capsys.readouterr().err


def test_streamed_safetensors_read_back_by_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mopd_megatron.convert.hf_io import SafetensorsStreamWriter
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.randn(7),
               "c": torch.randn(2, 3, 1).to(torch.float16)}
    path = str(tmp_path / "x.safetensors")
    w = SafetensorsStreamWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    got = load_file(path)
    assert set(got) == set(tensors) and all(torch.equal(got[n], tensors[n]) for n in tensors)
    with safe_open(path, framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}  # transformers requires it
    w = SafetensorsStreamWriter(str(tmp_path / "y.safetensors"), [("a", torch.float32, (7,))])
    with pytest.raises(ValueError, match=r"expected tensor \('a', torch.float32, \(7,\)\), got "
                                         r"\('a', torch.float32, \(6,\)\)"):
        w.write("a", torch.zeros(6))
