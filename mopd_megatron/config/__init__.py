"""Typed, validated run configuration.

    from mopd_megatron.config import load_recipe
    cfg = load_recipe("recipes/tiny_cpu.yaml", overrides=["train.steps=5"])  # section checks
    cfg.validate(world_size=8)                                              # cross-section checks

Every error is a ConfigError naming the dotted field path, the value, and where it came from
(``recipe.yaml:12`` or ``--set ...``).
"""
from .algorithm import DataConfig, LossConfig, OptimizerConfig, RewardConfig, VerifierSpec
from .base import ConfigError, field_docs
from .loader import config_from_dict, load_recipe, parse_override
from .model import FP8Config, ModelConfig, TeacherConfig
from .recipe import MOPDConfig
from .run import CheckpointConfig, LoggingConfig, TrainConfig
from .systems import ParallelConfig, RolloutConfig, RuntimeConfig

__all__ = [
    "ConfigError", "MOPDConfig", "load_recipe", "config_from_dict", "parse_override", "field_docs",
    "ModelConfig", "FP8Config", "TeacherConfig", "DataConfig", "VerifierSpec", "RewardConfig",
    "LossConfig", "OptimizerConfig", "RolloutConfig", "ParallelConfig", "TrainConfig",
    "CheckpointConfig", "LoggingConfig", "RuntimeConfig",
]
