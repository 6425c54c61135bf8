"""The GPU recipes' model fields reach Megatron's TransformerConfig: FP8, sequence parallelism,
p2p overlap and recompute, built on CPU without Transformer Engine and without weights, through
the function the trainer itself calls; and both dry-runs print them as the recipe sets them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
GPU_RECIPES = ["recipes/mopd_70b.yaml", "recipes/qwen3_8b_mopd.yaml"]


def _tc(recipe: str, *overrides: str):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.plan.build import student_transformer_config
    cfg = load_recipe(REPO / recipe, list(overrides))
    return cfg, student_transformer_config(cfg)[0]


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_recipe_layout_reaches_the_transformer_config(recipe):
    cfg, tc = _tc(recipe)
    par = cfg.parallel
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size,
            tc.virtual_pipeline_model_parallel_size) == (par.tp, par.pp, par.vpp)
    assert par.sequence_parallel is True and tc.sequence_parallel is True  # both recipes set it
    assert tc.params_dtype == torch.bfloat16 and tc.bf16
    # overlap_p2p_comm=true without vpp: separate isend/irecv (1F1B does not overlap)
    assert par.overlap_p2p_comm and not tc.batch_p2p_comm and not tc.overlap_p2p_comm
    assert tc.recompute_granularity is None and par.recompute == "none"
    assert tc.fp8 is None and not cfg.model.fp8.enabled  # recipes ship FP8 off
    assert "transformer_engine" not in sys.modules, "built without Transformer Engine"


@pytest.mark.parametrize("recipe", GPU_RECIPES)
@pytest.mark.parametrize("fp8_recipe", ["tensorwise", "blockwise"])
def test_fp8_fields_reach_the_transformer_config(recipe, fp8_recipe):
    cfg, tc = _tc(recipe, "model.fp8.enabled=true", f"model.fp8.recipe={fp8_recipe}",
                  "model.fp8.format=e4m3", "model.fp8.param=true",
                  "model.fp8.num_layers_at_start_in_bf16=2", "model.fp8.num_layers_at_end_in_bf16=0")
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param) == ("e4m3", fp8_recipe, True)
    assert tc.first_last_layers_bf16 is True
    assert (tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (2, 0)
    _, off = _tc(recipe, "model.fp8.enabled=true", "model.fp8.first_last_layers_bf16=false")
    assert off.first_last_layers_bf16 is False and off.fp8 == "hybrid"
    assert off.fp8_recipe == "tensorwise"  # the recipes' (and the section's) default


def test_teachers_are_built_without_fp8_or_recompute():
    from mopd_megatron.config import load_recipe
    from mopd_megatron.models.builder import transformer_config
    from mopd_megatron.plan.arch import resolve_hf_config
    cfg = load_recipe(REPO / GPU_RECIPES[0], ["model.fp8.enabled=true", "parallel.recompute=full"])
    hf, _ = resolve_hf_config(cfg.teachers[0].hf_config, "teacher")
    tc = transformer_config(hf, cfg.parallel, dtype=cfg.model.dtype, fp8=cfg.model.fp8, frozen=True)
    assert tc.fp8 is None and tc.recompute_granularity is None
    assert tc.sequence_parallel and tc.tensor_model_parallel_size == 8  # the student's layout


@pytest.mark.parametrize("recompute,method", [("selective", None), ("full", "uniform")])
def test_recompute_reaches_the_transformer_config(recompute, method):
    _, tc = _tc(GPU_RECIPES[1], f"parallel.recompute={recompute}")
    assert (tc.recompute_granularity, tc.recompute_method) == (recompute, method)


def test_p2p_fields_reach_the_transformer_config():
    _, tc = _tc(GPU_RECIPES[0], "parallel.overlap_p2p_comm=false")
    assert tc.batch_p2p_comm and not tc.overlap_p2p_comm   # Megatron-LM's pairing
    _, tc = _tc(GPU_RECIPES[0], "parallel.pp=2", "parallel.vpp=2")
    assert tc.overlap_p2p_comm and not tc.batch_p2p_comm and tc.virtual_pipeline_model_parallel_size == 2


def test_delayed_scaling_with_bf16_edges_is_refused_before_megatron_sees_it():
    from mopd_megatron.config import ConfigError
    with pytest.raises(ConfigError, match=r"mopd_70b.yaml:\d+: model.fp8.first_last_layers_bf16"):
        _tc(GPU_RECIPES[0], "model.fp8.enabled=true", "model.fp8.recipe=delayed")


# -- what the dry-runs print ---------------------------------------------------------------
def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOPD_"))}
    return dict(env, MOPD_PYTHON=sys.executable, PYTHONPATH=str(REPO))


def _megatron_line(out: str) -> dict[str, str]:
    m = re.search(r"^megatron .*\n\s+(.*)$", out, re.M)
    assert m, out
    return dict(kv.split("=", 1) for kv in m.group(1).split())


@pytest.mark.parametrize("fp8_recipe", [None, "blockwise"])
def test_mopd_train_dry_run_prints_the_resolved_fields_for_a_cluster_shape(fp8_recipe):
    sets = [] if fp8_recipe is None else ["--set", "model.fp8.enabled=true",
                                          "--set", f"model.fp8.recipe={fp8_recipe}"]
    r = subprocess.run([sys.executable, "-m", "mopd_megatron.cli", "train", "--recipe",
                        "recipes/mopd_70b.yaml", "--dry-run", "--nodes", "8", "--gpus-per-node",
                        "8", *sets], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    out = r.stdout
    assert "world size 64: tp 8 x pp 4 x dp 2" in out, out + r.stderr
    f = _megatron_line(out)
    assert f["sequence_parallel"] == "True" and f["tensor_model_parallel_size"] == "8"
    if fp8_recipe is None:
        assert f["fp8"] == "None" and "fp8_recipe" not in f
    else:
        assert (f["fp8"], f["fp8_recipe"]) == ("hybrid", fp8_recipe)
        # No GPU here: said, with the reason, after the build was printed
        assert re.search(r"^fp8 +cannot run on this machine: no CUDA GPU", out, re.M), out
    # This machine lacks the 70B files: every missing input is reported, not only the first,
    # the layout is not among them (the shape came from the options), and the run would stop.
    assert r.returncode == 2
    problems = re.findall(r"^  - (.*)$", out[out.index("preflight:"):], re.M)
    assert any("model.checkpoint=" in p for p in problems)
    assert any("data.paths[1]=" in p for p in problems)
    assert not any("world size" in p for p in problems), problems
    assert ("FP8 cannot run here" in out) == (fp8_recipe is not None)


def test_slurm_dry_run_prints_the_resolved_fields():
    base = subprocess.run(["bash", "slurm/mopd_70b.sh", "--dry-run"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert base.returncode == 0, base.stdout + base.stderr
    f = _megatron_line(base.stdout)
    assert f["sequence_parallel"] == "True" and f["fp8"] == "None"
    env = dict(_env(), MOPD_OVERRIDES="model.fp8.enabled=true model.fp8.recipe=blockwise")
    r = subprocess.run(["bash", "slurm/mopd_70b.sh", "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    f = _megatron_line(r.stdout)
    assert (f["fp8"], f["fp8_recipe"], f["sequence_parallel"]) == ("hybrid", "blockwise", "True")
