"""Tiny demo inputs and trainer runs for the tests/test_train_*.py files.

``tiny_inputs(dir)`` builds (once per directory) a character tokenizer, prompt files, two
barely-trained teachers and a student with tools/build_demo_teachers.py in a subprocess, small
enough to take seconds. ``recipe_overrides(dir, run_dir)`` points the tiny_cpu recipe at them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "tiny_cpu.yaml")
TINY_FLAGS = ["--teacher-steps", "20", "--student-steps", "10", "--hidden", "32", "--ffn", "64",
              "--layers", "2", "--batch", "16", "--seed", "0", "--train-prompts", "400",
              "--max-len", "5",  # the strings the golden losses were recorded with
              # vocab 24 + 110 = 134 > 128: at TP=2 both vocab shards hold real tokens, the
              # layout the golden losses (tests/assets) were recorded with
              "--unused-tokens", "110"]


def tiny_inputs(out: Path) -> Path:
    if not (out / "build.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, str(ROOT / "tools" / "build_demo_teachers.py"),
                        "--out", str(out), *TINY_FLAGS], check=True, env=env, cwd=ROOT,
                       capture_output=True, timeout=300)
    return out


# The loop-mechanics tests sample in-process (rollout.engine=local: no server start-up, any
# layout); tests/test_train_sglang.py puts the recipe's SGLang engine back.
LOCAL_ENGINE = ["rollout.engine=local", "rollout.mode=colocated", "train.async_rollout=false"]


def recipe_overrides(d: Path, run: Path, steps: int = 3, extra: list[str] = ()) -> list[str]:
    return [*LOCAL_ENGINE, f"model.hf_config={d}/student/hf", f"model.checkpoint={d}/student/mcore",
            "model.checkpoint_format=megatron",
            f"teachers[0].checkpoint={d}/teacher_caesar/mcore",
            f"teachers[0].hf_config={d}/teacher_caesar/hf",
            f"teachers[1].checkpoint={d}/teacher_reversal/mcore",
            f"teachers[1].hf_config={d}/teacher_reversal/hf",
            f"data.paths=[{d}/prompts.jsonl]", "data.eval_paths=[]", "train.eval_interval=0",
            "data.build_demo_inputs=false",  # these are the inputs: never rebuilt as the demo's
            f"checkpoint.dir={run}/ckpt", f"logging.jsonl_path={run}/metrics.jsonl",
            "logging.console=false", f"train.steps={steps}", "train.prompts_per_step=4",
            "parallel.global_batch_size=16", "parallel.micro_batch_size=4",
            "optimizer.warmup_steps=0",
            # the seed's objective and the lr the golden losses (tests/assets) were recorded with;
            # the demo recipe has since moved to loss.signal=full_vocab at lr 3e-4
            "loss.signal=sampled", "optimizer.lr=2e-4", *extra]


def jsonl_losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in Path(path).read_text().splitlines()]
