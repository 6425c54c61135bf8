"""Bad inputs stop ``mopd train`` with a clear error before any model is built and without
writing anything (no checkpoint directory, no metrics file)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from train_helpers import RECIPE, recipe_overrides, tiny_inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_inputs(tmp_path_factory.mktemp("tiny_demo"))


def run_cli(overrides, capsys):
    from mopd_megatron.trainer.cli import main
    code = main(["--recipe", RECIPE, *[a for o in overrides for a in ("--set", o)]])
    return code, capsys.readouterr().err


def assert_nothing_written(run: Path):
    assert not (run / "ckpt").exists() and not (run / "metrics.jsonl").exists()


def test_malformed_row_names_file_and_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "caesar", "prompt": "abc=", "answer": "def"}\n{"domain": "caesar", "prompt": \n')
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"data.paths=[{bad}]"]), capsys)
    assert code == 2 and f"{bad}:2" in err and "bad_json" in err
    assert_nothing_written(tmp_path / "run")


def test_unknown_domain_row(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "poetry", "prompt": "roses", "answer": "red"}\n')
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"data.paths=[{bad}]"]), capsys)
    assert code == 2 and "poetry" in err and f"{bad}:1" in err
    assert_nothing_written(tmp_path / "run")


def test_domain_without_teacher(tiny, tmp_path, capsys):
    extra = ["data.domain_weights={caesar: 1.0, reversal: 1.0, copy: 1.0}",
             "reward.verifiers.copy={type: exact_match}"]
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=extra), capsys)
    assert code == 2 and "'copy' has no teacher" in err
    assert_nothing_written(tmp_path / "run")


def test_teacher_vocabulary_mismatch(tiny, tmp_path, capsys):
    other = tmp_path / "teacher_hf"
    shutil.copytree(tiny / "teacher_caesar" / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"teachers[0].hf_config={other}"]), capsys)
    assert code == 2 and "teachers[0].hf_config" in err and "vocab_size" in err
    assert_nothing_written(tmp_path / "run")


def test_teacher_tokenizer_mismatch(tiny, tmp_path, capsys):
    other = tmp_path / "teacher_hf"
    shutil.copytree(tiny / "teacher_caesar" / "hf", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"teachers[0].hf_config={other}"]), capsys)
    assert code == 2 and "tokenizer differs" in err
    assert_nothing_written(tmp_path / "run")


def test_missing_checkpoint(tiny, tmp_path, capsys):
    extra = [f"teachers[1].checkpoint={tmp_path}/nowhere"]
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=extra), capsys)
    assert code == 2 and "teachers[1].checkpoint" in err and "does not exist" in err
    assert_nothing_written(tmp_path / "run")


def test_not_a_megatron_checkpoint(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"model.checkpoint={empty}"]), capsys)
    assert code == 2 and "model.checkpoint" in err and "metadata.json" in err
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lrr=1e-3", "unknown field (did you mean: lr?)"),
    ("loss.eps_low=2.0", "loss.eps_low"),
    ("parallel.global_batch_size=12", "parallel.global_batch_size"),
    ("rollout.engine=vllm", "rollout.engine"),
])
def test_bad_override(tiny, tmp_path, capsys, override, needle):
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[override]), capsys)
    assert code == 2 and needle in err and "--set" in err
    assert_nothing_written(tmp_path / "run")


def test_dry_run_prints_plan_and_writes_nothing(tiny, tmp_path, capsys):
    from mopd_megatron.trainer.cli import main
    overrides = recipe_overrides(tiny, tmp_path / "run")
    assert main(["--recipe", RECIPE, "--dry-run", *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "3 steps x 4 prompts x 4 samples = 16 sequences per rollout" in out
    assert_nothing_written(tmp_path / "run")


def test_sglang_engine_without_sglang_says_how_to_install(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang" else real(name, *a))
    extra = ["rollout.engine=sglang", f"model.checkpoint={tiny}/student/hf",
             "model.checkpoint_format=hf"]
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=extra), capsys)
    assert code == 2 and "rollout.engine='sglang': SGLang is not installed" in err
    assert "tests/harness/sglang_cpu/setup.sh" in err and "rollout.engine=local" in err
    assert_nothing_written(tmp_path / "run")


# --- checks against the file system and the models' own configs (issue 20, item 6) ------------
def test_checkpoint_dir_that_is_a_file(tiny, tmp_path, capsys):
    """Used to train, then die with FileExistsError at the first save."""
    ckpt = tmp_path / "ckpt_file"
    ckpt.write_text("not a directory")
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=[f"checkpoint.dir={ckpt}"]), capsys)
    assert code == 2, err
    assert f"--set checkpoint.dir={ckpt}: checkpoint.dir='{ckpt}': is a file, not a directory" in err
    assert ckpt.read_text() == "not a directory" and not (tmp_path / "run").exists()


def test_checkpoint_dir_under_a_file(tiny, tmp_path, capsys):
    """A directory that cannot be created is found without creating anything."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run",
                                         extra=[f"checkpoint.dir={blocker}/deep/ckpt"]), capsys)
    assert code == 2 and "checkpoint.dir=" in err
    assert f"cannot be created: {blocker} is a file, not a directory" in err
    assert not (tmp_path / "run").exists()


def test_prompt_plus_response_beyond_the_context(tiny, tmp_path, capsys):
    """Used to pass, then fail mid-run with an HTTP 400 from SGLang once such a prompt came.
    The error points at the recipe line of the field (a recipe file, not --set)."""
    lines = Path(RECIPE).read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("max_new_tokens:"))
    lines[at] = "  max_new_tokens: 60\n"           # + data.max_prompt_len 16 > 64 positions
    recipe = tmp_path / "long.yaml"
    recipe.write_text("".join(lines))
    from mopd_megatron.trainer.cli import main
    overrides = recipe_overrides(tiny, tmp_path / "run")
    code = main(["--recipe", str(recipe), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{recipe}:{at + 1}: rollout.max_new_tokens=60: data.max_prompt_len + " \
           "rollout.max_new_tokens = 16 + 60 = 76 tokens exceed the student's context of 64" in err
    assert "max_position_embeddings" in err
    assert not (tmp_path / "run").exists()


def test_tp_that_does_not_divide_the_heads(tiny, tmp_path, capsys, monkeypatch):
    """Used to give three Megatron tracebacks after the model build started. A real start of
    rank 0 of three: the check stops it before the process group would wait for the others
    (runtime.timeout_minutes=1 bounds the wait should it ever get that far)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    extra = ["parallel.tp=3", "runtime.timeout_minutes=1"]
    code, err = run_cli(recipe_overrides(tiny, tmp_path / "run", extra=extra), capsys)
    assert code == 2, err
    assert ("--set parallel.tp=3: parallel.tp=3: must divide the 4 attention heads and the 2 KV "
            "groups of the student") in err
    assert not (tmp_path / "run").exists()


def _dry_run(overrides, nodes_ranks, capsys):
    from mopd_megatron.trainer.cli import main
    code = main(["--recipe", RECIPE, "--dry-run", "--nodes", "1", "--ranks-per-node",
                 str(nodes_ranks), *[a for o in overrides for a in ("--set", o)]])
    out = capsys.readouterr().out
    return code, out[out.index("preflight:"):]


def test_layout_against_a_teacher_config_and_the_layers(tiny, tmp_path, capsys):
    """Teachers are built in the student's layout: their configs are checked too; and pp
    must divide the layers (--dry-run reports every problem)."""
    other = tmp_path / "teacher_hf"
    shutil.copytree(tiny / "teacher_caesar" / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (other / "config.json").write_text(json.dumps(cfg))
    extra = [f"teachers[0].hf_config={other}", "parallel.tp=2"]
    code, report = _dry_run(recipe_overrides(tiny, tmp_path / "run", extra=extra), 2, capsys)
    assert code == 2
    assert ("--set parallel.tp=2: parallel.tp=2: must divide the 4 attention heads and the 1 KV "
            "groups of the teacher caesar (teachers[0])") in report
    assert "of the student" not in report  # 4 heads, 2 KV groups: the student splits at tp 2
    code, report = _dry_run(recipe_overrides(tiny, tmp_path / "run", extra=["parallel.pp=3"]), 3,
                            capsys)
    assert code == 2 and "--set parallel.pp=3: parallel.pp=3: must divide the 2 layers of the student" in report
    assert_nothing_written(tmp_path / "run")
    assert not (tmp_path / "run").exists()
