"""Config: recipes load into typed sections; every error names field, value and file:line."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from mopd_megatron.config import (ConfigError, LossConfig, MOPDConfig, ParallelConfig,
                                  config_from_dict, field_docs, load_recipe)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_cpu.yaml"

BASE = textwrap.dedent("""\
    model:
      hf_config: m
    teachers:
      - domains: [math]
        checkpoint: t_math
      - domains: [code]
        checkpoint: t_code
    data:
      paths: [p.jsonl]
      domain_weights: {math: 1.0, code: 2.0}
    reward:
      verifiers:
        math: {type: math}
        code: {type: code}
    rollout:
      n_samples_per_prompt: 4
    train:
      prompts_per_step: 4
    parallel:
      global_batch_size: 16
      micro_batch_size: 2
    """)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln)


def test_tiny_recipe_loads_validates_and_round_trips():
    cfg = load_recipe(TINY)
    cfg.validate(world_size=1, check_paths=False)
    assert cfg.domains == ["caesar", "reversal"]
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # '3e-4' must be a float, not a string
    assert cfg.teacher_for("reversal").name == "reversal"
    again = config_from_dict(yaml.safe_load(cfg.dump_yaml()))
    assert again == cfg


def test_defaults_and_derived_fields(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE))
    assert cfg.loss.eps_low == 0.5 and cfg.loss.eps_high == 5.0
    assert cfg.rollout.weight_sync_bucket_mib == 512
    assert cfg.model.tokenizer == "m"          # defaults to the HF config directory
    assert cfg.teachers[0].hf_config == "t_math" and cfg.teachers[0].name == "math"
    assert cfg.rollout_batch_size == 16
    cfg.validate(world_size=8, check_paths=False)  # dp = 8, 16 % (2 * 8) == 0


def test_unknown_key_names_key_file_and_line(tmp_path):
    text = BASE.replace("  micro_batch_size: 2", "  micro_batch_sise: 2")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "parallel.micro_batch_sise" in msg and "unknown key" in msg
    assert f"{path}:{line_of(text, 'micro_batch_sise')}" in msg
    assert "did you mean: micro_batch_size" in msg


def test_unknown_top_level_section(tmp_path):
    text = BASE + "optimiser:\n  lr: 1.0e-5\n"
    with pytest.raises(ConfigError, match=r"recipe.yaml:%d: optimiser=.*did you mean: optimizer"
                       % line_of(text, "optimiser")):
        load_recipe(write(tmp_path, text))


def test_section_check_names_field_value_and_line(tmp_path):
    text = BASE + "loss:\n  eps_low: 2.0\n"
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert e.value.path == "loss.eps_low" and e.value.value == 2.0
    assert str(e.value).startswith(f"{tmp_path / 'recipe.yaml'}:{line_of(text, 'eps_low')}: loss.eps_low=2.0")


def test_list_item_errors_are_rerooted(tmp_path):
    text = BASE.replace("checkpoint: t_code", "checkpoint: t_code\n    format: megatron")
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert e.value.path == "teachers[1].hf_config"
    assert f":{line_of(text, '- domains: [code]')}:" in str(e.value)


def test_type_errors(tmp_path):
    for bad, path in [("train:\n  steps: ten\n", "train.steps"),
                      ("train:\n  steps: true\n", "train.steps"),       # bool is not an int
                      ("rollout:\n  mode: colocate\n", "rollout.mode")]:
        text = BASE.replace("train:\n  prompts_per_step: 4\n", "").replace(
            "rollout:\n  n_samples_per_prompt: 4\n", "") + bad
        with pytest.raises(ConfigError) as e:
            load_recipe(write(tmp_path, text))
        assert e.value.path == path, str(e.value)
        assert f"recipe.yaml:{line_of(text, path.split('.')[1] + ':')}" in str(e.value)


def test_duplicate_keys_and_bad_yaml(tmp_path):
    text = BASE + "train:\n  steps: 3\n"   # a second 'train' section
    with pytest.raises(ConfigError, match=r"duplicate key \(first at line %d\)" % line_of(text, "train:")):
        load_recipe(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, BASE + "loss: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_required_section(tmp_path):
    text = BASE.split("reward:")[0]
    with pytest.raises(ConfigError, match="reward=None: required field is missing"):
        load_recipe(write(tmp_path, text))


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE), [
        "optimizer.lr=3e-6", "train.steps=7", "loss.is_variant=tis", "model.fp8.enabled=false",
        "optimizer.betas=[0.8, 0.9]", "teachers[1].offload=true", "teachers.0.checkpoint=other",
        "checkpoint.dir=", "reward.verifiers.math.params={tol: 1}"])
    assert cfg.optimizer.lr == 3e-6 and cfg.train.steps == 7 and cfg.loss.is_variant == "tis"
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.teachers[1].offload is True and cfg.teachers[0].checkpoint == "other"
    assert cfg.checkpoint.dir is None
    assert cfg.reward.verifiers["math"].params == {"tol": 1}
    cfg = load_recipe(write(tmp_path, BASE), ["rollout.server_args=[--disable-radix-cache]"])
    assert cfg.rollout.server_args == ["--disable-radix-cache"]


@pytest.mark.parametrize("override, needle", [
    ("loss.eps_hgh=3", "loss.eps_hgh=3: unknown field (did you mean: eps_high?)"),
    ("rollot.temperature=1", "rollot=1: unknown field (did you mean: rollout?)"),
    ("teachers[5].offload=true", "teachers[5]=True: index out of range (the recipe has 2 items)"),
    ("teachers.x.offload=true", "teachers.x=True: list index must be a number"),
    ("train.steps.x=1", "train.steps.x=1: train.steps is a value, not a section"),
    ("train.steps", "must look like section.field=value"),
    ("train.steps=0", "train.steps=0: must be >= 1"),
    ("data.seed=-1", "data.seed=-1: must be >= 0"),
    ("optimizer.epochs_per_rollout=0", "optimizer.epochs_per_rollout=0: must be >= 1"),
    ("train.eval_interval=-1", "train.eval_interval=-1: must be >= 0"),
    ("optimizer.decay_fraction=0", "optimizer.decay_fraction=0.0: must be in (0, 1]"),
    ("optimizer.schedule=wsdd", "optimizer.schedule='wsdd'"),
    ("rollout.parity_interval=0", "rollout.parity_interval=0: must be >= 1"),
    ("rollout.top_p=[1", "value is not valid YAML"),
    ("rollout.server_args=[--port, '1']", "rollout.server_args=['--port', '1']: --port set by the "
                                          "trainer from the rollout fields"),
    ("rollout.server_args=[--tp-size=2]", "--tp-size set by the trainer"),
    ("rollout.server_args=[--log-level, 1]", "rollout.server_args[1]=1: expected a string"),
    ("runtime.timeout_minutes=0", "runtime.timeout_minutes=0: must be >= 1"),
    ("runtime.phase_warn_minutes=-1", "runtime.phase_warn_minutes=-1.0: must be >= 0"),
])
def test_bad_overrides_name_the_override(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, BASE), [override])
    assert needle in str(e.value) and "--set" in str(e.value)


def cfg_with(tmp_path, *overrides) -> MOPDConfig:
    return load_recipe(write(tmp_path, BASE), list(overrides))


@pytest.mark.parametrize("overrides, path, needle", [
    (["data.domain_weights={math: 1.0, code: 1.0, chat: 1.0}"], "data.domain_weights.chat",
     "domain 'chat' has no teacher"),
    (["reward.verifiers={math: {type: math}}"], "data.domain_weights.code",
     "domain 'code' has no verifier (add reward.verifiers.code)"),
    (["reward.verifiers.chat.type=exact_match"], "reward.verifiers.chat", "'chat' is not a data domain"),
    (["teachers[1].domains=[code, math]"], "teachers[1].domains", "domain 'math' already has a teacher"),
    (["teachers[1].domains=[code, chat]"], "teachers[1].domains", "domain 'chat' is not a data domain"),
    (["teachers[1].name=math"], "teachers[1].name", "teacher names must be unique"),
    (["train.prompts_per_step=3"], "parallel.global_batch_size", "3 x 4 = 12 sequences"),
    (["rollout.n_samples_per_prompt=1", "train.prompts_per_step=16"], "rollout.n_samples_per_prompt",
     "needs >= 2 samples"),
    (["train.async_rollout=true"], "train.async_rollout", "rollout.mode to dedicated or external"),
    (["model.fp8.enabled=true"], "model.fp8.enabled", "needs Transformer Engine"),
    (["train.eval_interval=10", "data.eval_paths=[]"], "train.eval_interval",
     "periodic eval needs held-out prompts: set data.eval_paths"),
])
def test_cross_section_checks(tmp_path, overrides, path, needle):
    cfg = cfg_with(tmp_path, *overrides)
    with pytest.raises(ConfigError) as e:
        cfg.validate(check_paths=False)
    assert e.value.path == path and needle in str(e.value), str(e.value)


def test_wsd_decays_over_the_last_fraction_of_all_optimizer_steps(tmp_path):
    from mopd_megatron.trainer.builders import total_optimizer_steps
    from mopd_megatron.mcore.optimizer import scheduler_kwargs
    cfg = cfg_with(tmp_path, "optimizer.schedule=wsd", "optimizer.decay_fraction=0.3",
                   "train.steps=10", "optimizer.steps_per_rollout=2",
                   "optimizer.epochs_per_rollout=2", "parallel.global_batch_size=8")
    s = scheduler_kwargs(cfg.optimizer, total_optimizer_steps(cfg))
    assert (s["lr_decay_style"], s["lr_decay_steps"], s["wsd_decay_steps"]) == ("WSD", 40, 12)


def test_world_size_checks(tmp_path):
    cfg = cfg_with(tmp_path, "parallel.tp=2", "parallel.pp=2")
    with pytest.raises(ConfigError, match=r"parallel.tp=2: tp x pp = 2 x 2 must divide the world size 6"):
        cfg.validate(world_size=6, check_paths=False)
    cfg.validate(world_size=8, check_paths=False)  # dp 2: 16 % (2 * 2) == 0
    with pytest.raises(ConfigError, match=r"micro_batch_size x data-parallel size = 2 x 16"):
        cfg.validate(world_size=64, check_paths=False)


def test_path_checks_name_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("m", "t_math"):
        (tmp_path / d).mkdir()
    (tmp_path / "p.jsonl").write_text("")
    cfg = cfg_with(tmp_path)
    with pytest.raises(ConfigError, match=r"teachers\[1\].checkpoint='t_code': path does not exist"):
        cfg.validate()
    (tmp_path / "t_code").mkdir()
    cfg.validate()
    with pytest.raises(ConfigError, match="checkpoint.resume='gone': path does not exist"):
        cfg_with(tmp_path, "checkpoint.resume=gone").validate()


def test_direct_construction_checks_name_full_paths():
    with pytest.raises(ConfigError, match=r"^loss.eps_high=0.9: must be >= 1"):
        LossConfig(eps_high=0.9)
    with pytest.raises(ConfigError, match=r"^parallel.overlap_p2p_comm=False: parallel.vpp requires"):
        ParallelConfig(pp=4, vpp=2, overlap_p2p_comm=False)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel=True: needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"--set model.dtype=fp32: model.dtype='fp32': model.fp8.enabled requires dtype bf16"):
        config_from_dict(yaml.safe_load(BASE), ["model.dtype=fp32", "model.fp8.enabled=true"])


def test_every_field_is_documented():
    rows = field_docs(MOPDConfig, "")
    assert len(rows) > 60
    undocumented = [path for path, _, _, help_ in rows if not help_.strip()]
    assert undocumented == []
    paths = {r[0] for r in rows}
    assert {"loss.eps_low", "teachers[].offload", "model.fp8.recipe", "reward.verifiers.<key>.type"} <= paths


def test_docs_field_table_matches_the_code(tmp_path):
    from mopd_megatron.config.docs import main as docs_main
    page = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    assert docs_main([str(page), "--check"]) == 0, \
        "docs/recipes.md's recipe-field table is stale: python -m mopd_megatron.config.docs docs/recipes.md"
    stale = tmp_path / "R.md"
    stale.write_text(page.read_text().replace("| `train.seed` | int | `1234` |",
                                              "| `train.seed` | int | `1` |"))
    assert docs_main([str(stale), "--check"]) == 1


def test_validate_errors_point_at_the_recipe_line(tmp_path):
    text = BASE.replace("{math: 1.0, code: 2.0}", "{math: 1.0, code: 2.0, chat: 1.0}")
    cfg = load_recipe(write(tmp_path, text))
    with pytest.raises(ConfigError) as e:
        cfg.validate(check_paths=False)
    assert str(e.value).startswith(f"{tmp_path / 'recipe.yaml'}:{line_of(text, 'chat: 1.0')}: "
                                   "data.domain_weights.chat=1.0: domain 'chat' has no teacher")
    with pytest.raises(ConfigError, match=r"^--set train.async_rollout=true: train.async_rollout=True"):
        load_recipe(write(tmp_path, BASE), ["train.async_rollout=true"]).validate(check_paths=False)


def test_loaded_config_pickles_and_overrides_copy_input():
    import pickle
    cfg = load_recipe(TINY)
    again = pickle.loads(pickle.dumps(cfg))  # the trainer ships it to spawned ranks
    assert again == cfg
    data = yaml.safe_load(BASE)
    config_from_dict(data, ["train.steps=3", "model.fp8.enabled=false"])
    assert "steps" not in data["train"] and "fp8" not in data["model"]


def test_rollout_cpu_and_batching_fields():
    from mopd_megatron.config.systems import RolloutConfig
    with pytest.raises(ConfigError, match=r"rollout.samples_per_request=4: batched requests need "
                                          r"direct server URLs"):
        RolloutConfig(router=True, samples_per_request=4)
    for field in ("samples_per_request", "max_total_tokens", "server_cpu_threads"):
        with pytest.raises(ConfigError, match=rf"rollout.{field}=0: must be >= 1"):
            RolloutConfig(**{field: 0})
    with pytest.raises(ConfigError, match=r"train.cpu_threads=0: must be >= 1"):
        config_from_dict(yaml.safe_load(BASE), ["train.cpu_threads=0"])


@pytest.mark.parametrize("override, field", [("rollout.top_p=0.9", "rollout.top_p"),
                                             ("rollout.top_k=50", "rollout.top_k")])
def test_truncated_sampling_is_refused_with_the_reason(tmp_path, override, field):
    # log mu from the engine is the untruncated tempered distribution: under top-p/top-k
    # sampling w = pi_theta/mu would not be the behaviour ratio.
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, BASE), [override])
    assert e.value.path == field and f"--set {override}" in str(e.value)
    assert "untruncated tempered distribution" in str(e.value) and "importance weight" in str(e.value)
    from mopd_megatron.config.systems import RolloutConfig
    with pytest.raises(ConfigError, match=rf"^{field}=.*would not be the behaviour-policy ratio"):
        RolloutConfig(**{field.split(".")[1]: 0.5 if field.endswith("top_p") else 1})
    # Spelling out the untruncated values stays valid (recipes/tiny_cpu.yaml sets top_p: 1.0).
    cfg = load_recipe(write(tmp_path, BASE), ["rollout.top_p=1.0", "rollout.top_k=-1"])
    assert (cfg.rollout.top_p, cfg.rollout.top_k) == (1.0, -1)
    for bad, needle in [("rollout.top_p=0", "must be in (0, 1]"), ("rollout.top_k=0", "must be -1 or >= 1")]:
        with pytest.raises(ConfigError) as e:
            load_recipe(write(tmp_path, BASE), [bad])
        assert needle in str(e.value)


def test_alpha_lives_in_the_loss_section(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE + "loss:\n  alpha: 0.25\n"))
    assert cfg.loss.alpha == 0.25 and not hasattr(cfg.reward, "alpha")
    assert LossConfig().alpha == 1.0
    with pytest.raises(ConfigError, match=r"^loss.alpha=-1.0: must be >= 0"):
        LossConfig(alpha=-1.0)
    # The GRPO group-size rule reads loss.alpha: pure distillation may sample once per prompt.
    single = ["rollout.n_samples_per_prompt=1", "train.prompts_per_step=16"]
    with pytest.raises(ConfigError, match=r"needs >= 2 samples per prompt; set loss.alpha=0"):
        cfg_with(tmp_path, *single).validate(check_paths=False)
    cfg_with(tmp_path, *single, "loss.alpha=0").validate(check_paths=False)


def test_old_reward_alpha_names_its_new_place(tmp_path):
    text = BASE.replace("    code: {type: code}\n", "    code: {type: code}\n  alpha: 0.5\n")
    assert "reward:\n  verifiers:\n    math: {type: math}\n    code: {type: code}\n  alpha: 0.5" in text
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert e.value.path == "reward.alpha"
    assert str(e.value).startswith(f"{tmp_path / 'recipe.yaml'}:{line_of(text, 'alpha: 0.5')}: "
                                   "reward.alpha=0.5: unknown key: reward.alpha moved to loss.alpha")
    with pytest.raises(ConfigError, match=r"^--set reward.alpha=0: reward.alpha=0: unknown field: "
                                          r"reward.alpha moved to loss.alpha"):
        load_recipe(write(tmp_path, BASE), ["reward.alpha=0"])


def test_demo_inputs_are_built_only_where_the_recipe_lays_them_out(tmp_path, monkeypatch):
    """data.build_demo_inputs hands the builder the directory above model.hf_config's
    student/hf; the builder replaces that whole directory, so any other layout is refused."""
    import subprocess

    from mopd_megatron.trainer.cli import ensure_demo_inputs
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    text = TINY.read_text()
    recipe = write(tmp_path, text.replace(".cache/tiny_cpu/student/hf", str(tmp_path / "models")))
    with pytest.raises(ConfigError, match=r"recipe.yaml:%d: data.build_demo_inputs=True: .*"
                       r"<dir>/student/hf" % line_of(text, "build_demo_inputs: true")):
        ensure_demo_inputs(load_recipe(recipe))
    ensure_demo_inputs(load_recipe(recipe, ["data.build_demo_inputs=false"]))
    assert calls == []
    ensure_demo_inputs(load_recipe(TINY, [f"model.hf_config={tmp_path}/demo/student/hf"]))
    assert [c[-2:] for c in calls] == [["--out", str(tmp_path / "demo")]]
