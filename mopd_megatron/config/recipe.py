"""The whole run's config and the cross-section checks made before anything is built."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml

from .algorithm import DataConfig, LossConfig, OptimizerConfig, RewardConfig
from .base import ConfigError, doc
from .model import ModelConfig, TeacherConfig
from .run import CheckpointConfig, LoggingConfig, TrainConfig
from .systems import ParallelConfig, RolloutConfig, RuntimeConfig

__all__ = ["MOPDConfig"]


@dataclass
class MOPDConfig:
    """A recipe: one section per component. Build with ``load_recipe``; then ``validate``."""

    SECTION: ClassVar[str] = ""

    model: ModelConfig = doc(help="The student.")
    teachers: list[TeacherConfig] = doc(help="Frozen domain teachers.")
    data: DataConfig = doc(help="Prompt datasets.")
    reward: RewardConfig = doc(help="Verifiers and the GRPO outcome advantage.")
    rollout: RolloutConfig = doc(help="Rollout engine.", factory=RolloutConfig)
    loss: LossConfig = doc(help="MOPD surrogate.", factory=LossConfig)
    optimizer: OptimizerConfig = doc(help="Optimizer and schedule.", factory=OptimizerConfig)
    parallel: ParallelConfig = doc(help="Parallel layout.", factory=ParallelConfig)
    runtime: RuntimeConfig = doc(help="Process-group timeout and hang reports.", factory=RuntimeConfig)
    train: TrainConfig = doc(help="Loop length and seed.", factory=TrainConfig)
    checkpoint: CheckpointConfig = doc(help="Checkpointing.", factory=CheckpointConfig)
    logging: LoggingConfig = doc(help="Metric sinks.", factory=LoggingConfig)

    # --- derived quantities the trainer needs -------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self.data.domain_weights)

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per rollout step."""
        return self.train.prompts_per_step * self.rollout.n_samples_per_prompt

    def teacher_for(self, domain: str) -> TeacherConfig:
        for t in self.teachers:
            if domain in t.domains:
                return t
        raise KeyError(domain)

    # --- checks across sections ---------------------------------------------------------------
    def validate(self, world_size: int | None = None, *, check_paths: bool = True,
                 check_imports: bool = True) -> "MOPDConfig":
        """Cross-section checks; raise ConfigError naming the field and value. Returns self.

        ``world_size`` (known at launch) adds the layout checks; ``check_paths`` verifies that
        input files exist (off for validating a cluster recipe on a laptop); ``check_imports``
        refuses features whose GPU libraries are missing (FP8 without Transformer Engine).
        """
        try:
            self._validate(world_size, check_paths, check_imports)
        except ConfigError as e:
            # Point at the recipe line (or --set) of the field when the config came from a file.
            locate = getattr(self, "_locate", None)
            raise e.located(locate(e.path) if locate else None) from None
        return self

    def _validate(self, world_size: int | None, check_paths: bool, check_imports: bool) -> None:
        self._check_domains()
        self._check_batches(world_size)
        if self.train.async_rollout and self.rollout.mode == "colocated":
            raise ConfigError("train.async_rollout", True, "one-step-off rollout needs engines on "
                              "their own devices: set rollout.mode to dedicated or external")
        if self.train.eval_interval and not self.data.eval_paths:
            raise ConfigError("train.eval_interval", self.train.eval_interval,
                              "periodic eval needs held-out prompts: set data.eval_paths")
        if check_imports and self.model.fp8.enabled and importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("model.fp8.enabled", True, "FP8 needs Transformer Engine, which is "
                              "not installed (pip install transformer-engine[pytorch])")
        if check_paths:
            self._check_paths()

    def _check_domains(self) -> None:
        domains = self.domains
        owner: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            for d in t.domains:
                if d in owner:
                    raise ConfigError(f"teachers[{i}].domains", t.domains, f"domain {d!r} already "
                                      f"has a teacher (teachers[{owner[d]}])")
                if d not in domains:
                    raise ConfigError(f"teachers[{i}].domains", t.domains, f"domain {d!r} is not a "
                                      f"data domain (data.domain_weights has {domains})")
                owner[d] = i
        names = [t.name for t in self.teachers]
        for i, n in enumerate(names):
            if names.index(n) != i:
                raise ConfigError(f"teachers[{i}].name", n, "teacher names must be unique")
        for d in domains:
            if d not in owner:
                raise ConfigError(f"data.domain_weights.{d}", self.data.domain_weights[d],
                                  f"domain {d!r} has no teacher (add one to teachers)")
            if d not in self.reward.verifiers:
                raise ConfigError(f"data.domain_weights.{d}", self.data.domain_weights[d],
                                  f"domain {d!r} has no verifier (add reward.verifiers.{d})")
        for d, spec in self.reward.verifiers.items():
            if d not in domains:
                raise ConfigError(f"reward.verifiers.{d}", spec.type, f"{d!r} is not a data "
                                  f"domain (data.domain_weights has {domains})")

    def _check_batches(self, world_size: int | None) -> None:
        par, opt = self.parallel, self.optimizer
        if self.loss.alpha > 0 and self.rollout.n_samples_per_prompt < 2:
            raise ConfigError("rollout.n_samples_per_prompt", self.rollout.n_samples_per_prompt,
                              "the GRPO outcome advantage (loss.alpha > 0) needs >= 2 samples "
                              "per prompt; set loss.alpha=0 for pure distillation")
        need = par.global_batch_size * opt.steps_per_rollout
        if self.rollout_batch_size != need:
            raise ConfigError(
                "parallel.global_batch_size", par.global_batch_size,
                f"a rollout batch of train.prompts_per_step x rollout.n_samples_per_prompt = "
                f"{self.train.prompts_per_step} x {self.rollout.n_samples_per_prompt} = "
                f"{self.rollout_batch_size} sequences must equal global_batch_size x "
                f"optimizer.steps_per_rollout = {par.global_batch_size} x {opt.steps_per_rollout}")
        if world_size is None:
            return
        if world_size % (par.tp * par.pp) != 0:
            raise ConfigError("parallel.tp", par.tp, f"tp x pp = {par.tp} x {par.pp} must divide "
                              f"the world size {world_size}")
        dp = par.data_parallel_size(world_size)
        if par.max_tokens_per_microbatch is not None:  # ranks are dealt sequences by tokens
            if par.global_batch_size < dp:
                raise ConfigError("parallel.global_batch_size", par.global_batch_size,
                                  f"must be >= the data-parallel size {dp} (world size "
                                  f"{world_size}): every rank needs a sequence")
        elif par.global_batch_size % (par.micro_batch_size * dp) != 0:
            raise ConfigError("parallel.global_batch_size", par.global_batch_size,
                              f"must be divisible by micro_batch_size x data-parallel size = "
                              f"{par.micro_batch_size} x {dp} (world size {world_size})")

    def _check_paths(self) -> None:
        errors = self.path_errors()
        if errors:
            raise errors[0]

    def path_errors(self) -> list[ConfigError]:
        """Every input path that does not exist, each as a located ConfigError."""
        out: list[ConfigError] = []
        locate = getattr(self, "_locate", None)

        def exists(path: str | None, field: str) -> None:
            if path is not None and not os.path.exists(path):
                e = ConfigError(field, path, "path does not exist")
                out.append(e.located(locate(field) if locate else None))
        exists(self.model.hf_config, "model.hf_config")
        exists(self.model.checkpoint, "model.checkpoint")
        exists(self.model.tokenizer, "model.tokenizer")
        for i, t in enumerate(self.teachers):
            exists(t.checkpoint, f"teachers[{i}].checkpoint")
            exists(t.hf_config, f"teachers[{i}].hf_config")
        for i, p in enumerate(self.data.paths):
            exists(p, f"data.paths[{i}]")
        for i, p in enumerate(self.data.eval_paths):
            exists(p, f"data.eval_paths[{i}]")
        if self.checkpoint.resume not in ("auto", "none"):
            exists(self.checkpoint.resume, "checkpoint.resume")
        return out

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (tuples become lists), for logs and checkpoints."""
        def plain(x: Any) -> Any:
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return x
        return plain(dataclasses.asdict(self))

    def dump_yaml(self) -> str:
        """The resolved config as a recipe that ``load_recipe`` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
