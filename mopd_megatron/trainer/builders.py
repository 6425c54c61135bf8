"""The trainer's builds, each small and in the order the Trainer runs them.

``preflight`` does every check that can fail on user input (config, data rows, verifiers,
checkpoint paths, teacher vocabularies) before any model is built or any file is written.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, MOPDConfig
from ..models.builder import DTYPES, BuildOptions, build_model_chunks
from ..models.hf_config import HFModelConfig, load_hf_config

__all__ = ["Inputs", "preflight", "build_chunks", "load_weights", "build_student",
           "build_engine", "optim_settings"]


@dataclass
class Inputs:
    """Everything read and checked before any model exists."""

    hf: HFModelConfig
    tokenizer: Any
    dataset: Any          # data.PromptDataset
    rewards: Any          # rewards.RewardRegistry
    eos_id: int
    pad_id: int


def _check_checkpoint(path: str | None, fmt: str, field: str) -> None:
    """A missing or unreadable checkpoint is a config error, found before any build."""
    if path is None:
        return
    if not os.path.exists(path):
        raise ConfigError(field, path, "checkpoint path does not exist")
    if fmt == "megatron" and not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConfigError(field, path, "not a Megatron dist-checkpoint (no metadata.json); "
                          "is the format right?")
    if fmt == "hf" and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        raise ConfigError(field, path, "no HF weight files (*.safetensors) in this directory")


def preflight(cfg: MOPDConfig, world_size: int) -> Inputs:
    """Config, paths, data, verifiers and vocabularies: everything except the models."""
    from transformers import AutoTokenizer

    from ..data import PromptDataset
    from ..rewards import build_reward_registry
    from ..teachers import check_teacher_vocab
    cfg.validate(world_size=world_size)
    if cfg.rollout.engine == "local" and cfg.parallel.pp > 1:
        raise ConfigError("rollout.engine", "local", "in-trainer sampling needs parallel.pp=1; "
                          "use rollout.engine=sglang with pipeline parallelism")
    if (cfg.rollout.engine == "sglang" and cfg.rollout.mode != "external"
            and importlib.util.find_spec("sglang") is None):
        raise ConfigError("rollout.engine", "sglang", "SGLang is not installed, so no server can "
                          "be launched: pip install sglang on GPU machines, "
                          "bash tests/harness/sglang_cpu/setup.sh on CPU (tools/setup_env.sh "
                          "does it), or --set rollout.engine=local to sample in the trainer")
    if cfg.train.async_rollout and cfg.rollout.engine == "local":
        raise ConfigError("train.async_rollout", True, "one-step-off rollout needs server engines "
                          "(rollout.engine=sglang); the local engine samples with the live weights")
    ck = cfg.checkpoint
    if ck.hf_export_dir is not None:
        if ck.dir is None:
            raise ConfigError("checkpoint.hf_export_dir", ck.hf_export_dir, "the HF export is "
                              "converted from the final checkpoint: set checkpoint.dir")
        if os.path.exists(ck.hf_export_dir) and os.listdir(ck.hf_export_dir):
            raise ConfigError("checkpoint.hf_export_dir", ck.hf_export_dir, "exists and is not "
                              "empty; the export will not overwrite it")
    _check_checkpoint(cfg.model.checkpoint, cfg.model.checkpoint_format, "model.checkpoint")
    for i, t in enumerate(cfg.teachers):
        _check_checkpoint(t.checkpoint, t.format, f"teachers[{i}].checkpoint")
    hf = load_hf_config(cfg.model.hf_config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    check_teacher_vocab(cfg.teachers, hf.vocab_size, tokenizer.get_vocab())
    dataset = PromptDataset.from_config(cfg.data, tokenizer)
    specs = {d: {"type": v.type, **v.params} for d, v in cfg.reward.verifiers.items()}
    try:
        rewards = build_reward_registry(specs)
    except ValueError as e:
        raise ConfigError("reward.verifiers", specs, str(e)) from None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.tokenizer", cfg.model.tokenizer, "the tokenizer has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Inputs(hf, tokenizer, dataset, rewards, eos, pad)


def build_options(cfg: MOPDConfig) -> BuildOptions:
    rec = None if cfg.parallel.recompute == "none" else cfg.parallel.recompute
    return BuildOptions(dtype=cfg.model.dtype, recompute=rec)


def build_chunks(hf_source, cfg: MOPDConfig) -> tuple[HFModelConfig, list]:
    """This rank's chunks of the model ``hf_source`` describes, in the current layout."""
    hf = load_hf_config(hf_source) if not isinstance(hf_source, HFModelConfig) else hf_source
    return hf, build_model_chunks(hf, build_options(cfg))


def load_weights(chunks: list, path: str | None, fmt: str, hf: HFModelConfig) -> None:
    """Fill ``chunks`` from a Megatron dist-checkpoint or an HF directory (via the converter)."""
    if path is None:
        return
    if fmt == "megatron":
        from ..training import dist_ckpt
        dist_ckpt.load(path, chunks)
        return
    # HF: the converter streams the safetensors into a torch_dist checkpoint (rank 0, in a
    # scratch directory next to the HF one's parent on a shared file system), which every rank
    # then loads in its own layout; the scratch copy is removed afterwards.
    import shutil
    import tempfile

    import torch.distributed as dist

    from ..convert import convert_hf_to_megatron
    from ..training import dist_ckpt
    name = [None]
    if dist.get_rank() == 0:
        scratch = tempfile.mkdtemp(prefix=".mopd_hf_import.", dir=os.path.dirname(os.path.abspath(path)))
        out = os.path.join(scratch, "dist")
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            chunks[0].config.params_dtype]
        convert_hf_to_megatron(path, out, dtype=dtype)
        name[0] = scratch
    dist.broadcast_object_list(name, src=0)
    try:
        dist_ckpt.load(os.path.join(name[0], "dist"), chunks)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(name[0], ignore_errors=True)


def optim_settings(cfg: MOPDConfig):
    from ..training.optimizer import OptimSettings
    o = cfg.optimizer
    steps = cfg.train.steps * o.steps_per_rollout * o.epochs_per_rollout
    return OptimSettings(
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad, warmup_steps=o.warmup_steps,
        decay_steps=steps, decay_style=o.schedule,
        wsd_decay_steps=max(1, round(o.decay_fraction * steps)), distributed=o.distributed_optimizer)


def build_student(cfg: MOPDConfig, hf: HFModelConfig):
    """(ddp chunks, optimizer, scheduler), weights loaded from model.checkpoint."""
    from ..training.optimizer import build_optimizer, wrap_ddp
    _, chunks = build_chunks(hf, cfg)
    load_weights(chunks, cfg.model.checkpoint, cfg.model.checkpoint_format, hf)
    settings = optim_settings(cfg)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, DTYPES[cfg.model.dtype])
    return ddp, optimizer, scheduler


def build_engine(cfg: MOPDConfig, chunks: list, inputs: Inputs, log_dir: str | None):
    """The rollout engine the recipe names (on rank 0 for server engines)."""
    if cfg.rollout.engine == "local":
        from .generate import LocalEngine
        return LocalEngine(chunks, vocab_size=inputs.hf.vocab_size, eos_id=inputs.eos_id,
                           pad_id=inputs.pad_id, seed=cfg.train.seed)
    if torch.distributed.get_rank() != 0:
        return None  # rank 0 drives the servers and broadcasts the batch
    from ..rollout import SGLangEngine
    model_path = cfg.model.checkpoint if cfg.model.checkpoint_format == "hf" else None
    if model_path is None and cfg.rollout.mode != "external":
        raise ConfigError("model.checkpoint_format", cfg.model.checkpoint_format,
                          "launched SGLang servers start from an HF checkpoint; give the student "
                          "as format hf (or use rollout.mode=external)")
    return SGLangEngine.from_config(cfg.rollout, model_path, log_dir=log_dir)
