"""Memory planner: hand-computed per-term bytes for a tiny model, the shipped recipes accepted,
an oversized variant refused with a change that really fits, and ${VAR} recipe expansion.

The expectations below are worked out by hand in the comments (independent of
mopd_megatron/plan/*): tiny model h=64, a=4 heads, g=2 KV groups, d=16, f=160, V=1000, L=4,
untied, no biases. Exact integer bytes, so the comparisons are exact (tolerance 1e-6 B where
a GiB fraction enters).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mopd_megatron.config import ConfigError, load_recipe
from mopd_megatron.models.hf_config import load_hf_config
from mopd_megatron.plan.arch import ArchSpec, resolve_arch
from mopd_megatron.plan.cli import plan_main
from mopd_megatron.plan.memory import PlanInputs, TeacherSpec, plan_memory, stage_terms

REPO = Path(__file__).resolve().parents[1]

TINY_HF = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}

# Per layer, TP-split: q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*160 = 4096+4096+4096+30720
LAYER_SHARDED = 43008
LAYER_REPLICATED = 128            # two RMSNorm weights of 64
EMBED = 64000                     # 1000 x 64
TOTAL = 4 * (43008 + 128) + 2 * 64000 + 64   # = 300608


def tiny_arch() -> ArchSpec:
    return ArchSpec(load_hf_config(TINY_HF))


def test_param_counts_by_hand():
    a = tiny_arch()
    assert a.layer_sharded() == LAYER_SHARDED
    assert a.layer_replicated() == LAYER_REPLICATED
    assert a.total_params() == TOTAL == 300608
    # TP=2, PP=2: stage 0 = 2 layers x (43008/2 + 128) + embedding 64000/2 = 43264 + 32000
    assert a.stage_params(0, 2, 2) == 75264
    # stage 1 = 2 layers + final norm 64 + output layer 64000/2
    assert a.stage_params(1, 2, 2) == 75328


def test_known_configs_match_published_sizes():
    # Llama-3 70B: 80 x (855,638,016 + 16,384) + 2 x 128256 x 8192 + 8192
    llama = resolve_arch("/nowhere/Llama-3.3-70B-Instruct", "student")
    assert llama.total_params() == 70_553_706_496
    # Qwen3-8B: 36 x (192,937,984 + 8,448) + 2 x 151936 x 4096 + 4096 (q/k norms of 128)
    qwen = resolve_arch("/nowhere/Qwen3-8B", "student")
    assert qwen.total_params() == 8_190_735_360


def _tiny_inputs(**kw) -> PlanInputs:
    a = tiny_arch()
    base = dict(student=a, teachers=(TeacherSpec("math", a, offload=False),
                                     TeacherSpec("code", a, offload=True)),
                train_gpus=8, tp=2, pp=2, micro_batch_size=2, global_batch_size=16, seq_len=128,
                recompute="none", dtype="bf16", distributed_optimizer=True,
                rollout_mode="colocated", sglang_mem_fraction=0.25, sglang_tp=1,
                gpu_mem_gib=0.004, reserve_gib=0.0)
    base.update(kw)
    return PlanInputs(**base)


def test_tiny_plan_terms_by_hand():
    plan = plan_memory(_tiny_inputs())
    # DP = 8 / (2*2) = 2; T = 2 x 128 = 256 tokens; micro-batches m = 16 / (2 x 2) = 4.
    # Stage 0 (P=75264): weights 2P = 150528, grads 4P = 301056, Adam 12P/2 = 451584,
    # resident teacher 150528 -> persistent 1,053,696.
    # Activations per layer per token (no SP): 8h + (4ad + 4gd + 6f)/t
    #   = 512 + (256 + 128 + 960)/2 = 1184 B; x 256 tok x 2 layers x min(2 - 0, 4) = 1,212,416.
    # SGLang 0.25 x 0.004 GiB = 1,073,741.824 < 1,212,416, so stage 0 peaks in 'train':
    #   1,053,696 + 1,212,416 = 2,266,112.
    # Stage 1 (P=75328): persistent 150656+301312+451968+150656 = 1,054,592; rollout 1,073,741.8
    #   (> train 606,208 + logits 260,096) -> 2,128,333.8 < stage 0.
    assert plan.stage == 0 and plan.peak_phase == "train"
    by = {t.name: t.bytes for t in plan.terms}
    assert by["student weights"] == 150528
    assert by["grads (fp32 main)"] == 301056
    assert by["optimizer state"] == 451584
    assert by["teacher math (resident)"] == 150528
    assert by["teacher code (offloaded, loaded)"] == 150528
    assert by["activations"] == 1_212_416
    assert by["SGLang weights + KV"] == pytest.approx(0.25 * 0.004 * 2**30, abs=1e-6)
    assert plan.peak == 2_266_112
    assert plan.fits and plan.headroom == pytest.approx(0.004 * 2**30 - 2_266_112, abs=1e-6)


def test_tiny_plan_last_stage_logits_and_variants():
    # Make the last stage heaviest: no teachers, SGLang tiny. Stage 1 train phase:
    # activations 1184 x 256 x 2 layers x 1 in flight = 606,208; fused logits
    # 256 x 500 x 2 + 256 x 16 = 260,096; naive adds 256 x 500 x 8 = 1,024,000.
    x = _tiny_inputs(teachers=(), sglang_mem_fraction=0.01)
    s1 = {t.name: t.bytes for t in plan_memory(x).terms}
    fused = plan_memory(x)
    naive = plan_memory(_tiny_inputs(teachers=(), sglang_mem_fraction=0.01, logits_path="naive"))
    assert fused.stage == 0  # 2 micro-batches in flight on stage 0 outweigh the logits
    assert "logits (fused)" not in s1
    # Stage 1 with naive logits: persistent 903,936 + 606,208 + 1,284,096 = 2,794,240 > stage 0
    # (persistent 903,168 + 1,212,416 = 2,115,584).
    assert naive.stage == 1
    nb = {t.name: t.bytes for t in naive.terms}
    assert nb["logits (naive)"] == 256 * 500 * 10 + 256 * 16 == 1_284_096
    assert naive.peak == 150656 + 301312 + 451968 + 606_208 + 1_284_096
    # full recompute, stage 0: 2h x T x layers x in-flight + one layer's full set
    #   = 128 x 256 x 2 x 2 + 1184 x 256 = 131,072 + 303,104
    full = {t.name: t.bytes for t in stage_terms(_tiny_inputs(recompute="full"), 0)}
    assert full["activations"] == 434_176
    # sequence parallel: the 8h part divides by t: (256 + 672) x 256 x 2 x 2
    sp = {t.name: t.bytes for t in stage_terms(_tiny_inputs(sequence_parallel=True), 0)}
    assert sp["activations"] == 928 * 256 * 4
    # fp32 model: 4 B weights, Adam 8 B (no master copy), FP8 teacher params 1 B
    f32 = {t.name: t.bytes for t in stage_terms(_tiny_inputs(
        dtype="fp32", teachers=(TeacherSpec("m", tiny_arch(), False, "fp8"),)), 0)}
    assert f32["student weights"] == 4 * 75264
    assert f32["optimizer state"] == 8 * 75264 / 2
    assert f32["teacher m (resident)"] == 75264


def test_layout_errors_name_the_field():
    from mopd_megatron.plan.arch import PlanError
    with pytest.raises(PlanError, match="parallel.pp=3"):
        plan_memory(_tiny_inputs(pp=3, train_gpus=12))
    with pytest.raises(PlanError, match="parallel.tp=4"):
        plan_memory(_tiny_inputs(tp=4))   # 2 KV groups


def _write_tiny_recipe(tmp_path: Path, **par) -> Path:
    """A self-contained recipe around the tiny model (a config.json on disk, no weights)."""
    model = tmp_path / "tiny_model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_HF))
    recipe = {
        "model": {"hf_config": str(model), "checkpoint": str(model), "dtype": "bf16"},
        "teachers": [{"name": "a", "domains": ["a"], "checkpoint": str(model)},
                     {"name": "b", "domains": ["b"], "checkpoint": str(model), "offload": True}],
        "data": {"paths": ["p.jsonl"], "domain_weights": {"a": 1.0, "b": 1.0},
                 "max_prompt_len": 32},
        "reward": {"verifiers": {"a": {"type": "exact_match"}, "b": {"type": "exact_match"}}},
        "rollout": {"n_samples_per_prompt": 4, "max_new_tokens": 96, "mem_fraction_static": 0.3},
        "parallel": {"micro_batch_size": 8, "global_batch_size": 64, **par},
        "train": {"prompts_per_step": 16},
        "checkpoint": {"dir": "runs/tiny/checkpoints"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_reads_config_json_and_prints_table(tmp_path, capsys):
    path = _write_tiny_recipe(tmp_path)
    rc = plan_main(["--recipe", str(path), "--nodes", "1", "--gpus-per-node", "2",
                    "--gpu-mem-gb", "1", "--reserve-gb", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert str(tmp_path / "tiny_model" / "config.json") in out
    assert "0.30B" not in out and "0.00B params" in out  # 300,608 params
    for term in ("student weights", "grads (fp32 main)", "optimizer state", "activations",
                 "logits (fused)", "SGLang weights + KV", "headroom", "FITS"):
        assert term in out


@pytest.mark.parametrize("recipe,nodes", [("mopd_70b.yaml", 8), ("qwen3_8b_mopd.yaml", 1)])
def test_shipped_recipes_fit_80gb(recipe, nodes, capsys):
    rc = plan_main(["--recipe", str(REPO / "recipes" / recipe), "--nodes", str(nodes),
                    "--gpus-per-node", "8", "--gpu-mem-gb", "80"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # the recipes promise headroom, not a squeeze: at least 10% of the card left
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("headroom"))
    assert float(line.split()[1]) >= 8.0, line


def test_oversized_variant_refused_with_a_fix_that_fits(capsys):
    recipe = str(REPO / "recipes" / "qwen3_8b_mopd.yaml")
    # TP=2 is the layout the recipe's comment says the planner refused (peak ~81.6 GiB)
    rc = plan_main(["--recipe", recipe, "--nodes", "1", "--set", "parallel.tp=2"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "biggest terms:" in out
    fixes = [ln.split("->")[0].split() for ln in out.splitlines()
             if ln.startswith("  --set") and "->" in ln]
    assert fixes, out
    # the first suggested change really makes it fit
    extra = [w for w in fixes[0] if w != "--set"]
    args = ["--recipe", recipe, "--nodes", "1", "--set", "parallel.tp=2"]
    for e in extra:
        args += ["--set", e]
    assert plan_main(args) == 0, capsys.readouterr().out


def test_bad_recipe_is_exit_2_with_the_field(capsys):
    rc = plan_main(["--recipe", str(REPO / "recipes" / "mopd_70b.yaml"), "--nodes", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "parallel" in err  # TP x PP = 32 does not divide 8 GPUs


def test_recipe_env_expansion(tmp_path, monkeypatch):
    path = _write_tiny_recipe(tmp_path)
    text = path.read_text().replace("checkpoints", "${MOPD_TEST_RUNS:-fallback}/ck")
    text += "\n" if not text.endswith("\n") else ""
    path.write_text(text)
    monkeypatch.delenv("MOPD_TEST_RUNS", raising=False)
    assert load_recipe(path).checkpoint.dir == "runs/tiny/fallback/ck"
    monkeypatch.setenv("MOPD_TEST_RUNS", "/scratch/x")
    assert load_recipe(path).checkpoint.dir == "runs/tiny//scratch/x/ck"
    path.write_text(text.replace("${MOPD_TEST_RUNS:-fallback}", "${MOPD_TEST_UNSET_VAR}"))
    monkeypatch.delenv("MOPD_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: checkpoint\.dir=.*MOPD_TEST_UNSET_VAR"):
        load_recipe(path)


def test_mopd_plan_module_help():
    out = subprocess.run([sys.executable, "-m", "mopd_megatron.plan.cli", "--help"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0 and "--gpu-mem-gb" in out.stdout
