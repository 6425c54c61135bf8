"""How a run proceeds: the loop's length, checkpoints and metric sinks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import check, doc

__all__ = ["TrainConfig", "CheckpointConfig", "LoggingConfig"]


@dataclass
class TrainConfig:
    """The outer loop: one step = one rollout batch."""

    SECTION: ClassVar[str] = "train"

    steps: int = doc(100, "Rollout steps to run (each followed by optimizer.steps_per_rollout x "
                          "optimizer.epochs_per_rollout updates).")
    prompts_per_step: int = doc(8, "Prompts per rollout batch.")
    seed: int = doc(1234, "Seed of model init, dropout and sampling.")
    async_rollout: bool = doc(
        False, "One-step-off asynchronous rollout: generate batch k+1 with weights of step k "
               "while training on batch k (needs dedicated or external engines).")
    eval_interval: int = doc(
        0, "Greedy held-out accuracy of the student (data.eval_paths) every this many steps, "
           "right after the step's weight sync, logged as eval/<domain>; 0: only before and after "
           "the run. Decoded like those: on the rollout engine (any layout), in the trainer with "
           "rollout.engine=local.")
    cpu_threads: int | None = doc(
        None, "CPU runs only: torch threads of each trainer process; null: torch's default (all "
              "cores). With SGLang servers on the same few cores, 1 each avoids oversubscription.")

    def __post_init__(self):
        check(self.steps >= 1, self, "steps", "must be >= 1")
        check(self.cpu_threads is None or self.cpu_threads >= 1, self, "cpu_threads",
              "must be >= 1 or null")
        check(self.prompts_per_step >= 1, self, "prompts_per_step", "must be >= 1")
        check(self.eval_interval >= 0, self, "eval_interval", "must be >= 0 (0: no periodic eval)")
        check(self.seed >= 0, self, "seed", "must be >= 0")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints: <dir>/step_<N>, a `latest` pointer, keep-last-k pruning."""

    SECTION: ClassVar[str] = "checkpoint"

    dir: str | None = doc(None, "Checkpoint root directory; null disables saving.")
    save_interval: int = doc(50, "Save every this many steps (and at the end); 0 saves only at the end.")
    keep_last: int | None = doc(3, "Keep this many newest checkpoints; null keeps all.")
    resume: str = doc("auto", "auto: continue from the newest complete checkpoint in dir if any; "
                              "none: start fresh; otherwise a checkpoint directory path.")
    hf_export_dir: str | None = doc(None, "Export the final student as an HF checkpoint here.")

    def __post_init__(self):
        check(self.save_interval >= 0, self, "save_interval", "must be >= 0")
        check(self.keep_last is None or self.keep_last >= 1, self, "keep_last", "must be >= 1 or null")
        check(bool(self.resume), self, "resume", "use auto, none or a checkpoint path")


@dataclass
class LoggingConfig:
    """Metric sinks. Only rank 0 writes."""

    SECTION: ClassVar[str] = "logging"

    console: bool = doc(True, "Print one progress line per step.")
    interval: int = doc(1, "Log every this many steps.")
    jsonl_path: str | None = doc(None, "Append one JSON object per step to this file.")
    tensorboard_dir: str | None = doc(None, "TensorBoard event directory.")
    wandb_project: str | None = doc(None, "W&B project; null disables W&B.")
    wandb_entity: str | None = doc(None, "W&B entity (team or user).")
    wandb_mode: Literal["online", "offline", "disabled"] = doc("online", "W&B mode.")
    wandb_run_name: str | None = doc(None, "W&B run name.")

    def __post_init__(self):
        check(self.interval >= 1, self, "interval", "must be >= 1")
