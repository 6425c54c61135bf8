"""The trainer's builds, each small and in the order the Trainer runs them.

``preflight`` does every check that can fail on user input (config, data rows, verifiers,
checkpoint paths, teacher vocabularies, the layout and context against the models' configs,
output paths) before any model is built or any file is written.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, MOPDConfig
from ..models.builder import DTYPES, build_model_chunks
from ..models.hf_config import HFModelConfig, load_hf_config

__all__ = ["Inputs", "preflight", "build_chunks", "load_weights", "build_student",
           "Engines", "build_engines", "total_optimizer_steps", "PreflightFailed"]


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


class PreflightFailed(Exception):
    """Every check that failed (``preflight(..., collect=True)``), in the order they ran."""

    def __init__(self, failures: list[Exception]):
        self.failures = failures
        super().__init__("\n".join(f"  - {e}" for e in failures))


def preflight(cfg: MOPDConfig, world_size: int, *, collect: bool = False,
              own_engine: bool = True) -> Inputs:
    """Config, paths, data, verifiers and vocabularies: everything except the models.

    A real start stops at the first failure. ``collect`` (``mopd train --dry-run``) runs every
    check whose inputs could be read and raises PreflightFailed with all the failures.
    """
    from transformers import AutoTokenizer

    from ..data import DataError, PromptDataset
    from ..teachers import check_teacher_vocab
    from .model_checks import model_problems
    from .output_paths import output_problems
    failures: list[Exception] = []
    locate = getattr(cfg, "_locate", None)  # the recipe line (or --set) of a field

    def run(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, OSError, ValueError) as e:
            found = e.located(locate(e.path)) if isinstance(e, ConfigError) and locate else e
            if not collect:
                if found is e:
                    raise
                raise found from None
            failures.append(found)
            return None

    run(cfg.validate, world_size, check_paths=False, check_imports=False)
    missing = set()
    for e in cfg.path_errors():
        missing.add(e.path)
        run(_raise, e)
    if own_engine:  # a caller-supplied engine (tests, replay) launches nothing
        run(_check_engine, cfg)
    run(_check_fp8, cfg)
    run(_check_packing, cfg)
    run(_check_export, cfg)
    for e in output_problems(cfg) + model_problems(cfg):
        run(_raise, e)
    # Checks that read an input run only when its path exists (reported once, above).
    if "model.checkpoint" not in missing:
        run(_check_checkpoint, cfg.model.checkpoint, cfg.model.checkpoint_format, "model.checkpoint")
    for i, t in enumerate(cfg.teachers):
        if f"teachers[{i}].checkpoint" not in missing:
            run(_check_checkpoint, t.checkpoint, t.format, f"teachers[{i}].checkpoint")
    hf = tokenizer = dataset = eos = None
    if "model.hf_config" not in missing:
        hf = run(_field, "model.hf_config", cfg.model.hf_config, load_hf_config)
    if "model.tokenizer" not in missing:  # a local directory: never a hub download
        tokenizer = run(_field, "model.tokenizer", cfg.model.tokenizer,
                        lambda p: AutoTokenizer.from_pretrained(p, local_files_only=True))
    teachers_readable = not any(f"teachers[{i}].hf_config" in missing
                                for i in range(len(cfg.teachers)))
    if hf is not None and tokenizer is not None and teachers_readable:
        run(check_teacher_vocab, cfg.teachers, hf.vocab_size, tokenizer.get_vocab())
    if hf is not None and cfg.loss.signal == "topk" and cfg.loss.topk > hf.vocab_size:
        run(_raise, ConfigError("loss.topk", cfg.loss.topk, f"more than the vocabulary "
                                f"({hf.vocab_size} tokens of {cfg.model.hf_config})"))
    if tokenizer is not None:
        dataset = run(PromptDataset.from_config, cfg.data, tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            run(_raise, ConfigError("model.tokenizer", cfg.model.tokenizer,
                                    "the tokenizer has no EOS token"))
    rewards = run(_verifiers, cfg)
    if failures:
        if rewards is not None:
            rewards.close()
        raise PreflightFailed(failures)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Inputs(hf, tokenizer, dataset, rewards, eos, pad)


def _raise(e: Exception) -> None:
    raise e


def _field(field: str, path: str, read):
    """read(path), an unreadable input reported as an error of the field that names it."""
    try:
        return read(path)
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(field, path, f"cannot be read: {e}") from None


def _check_engine(cfg: MOPDConfig) -> None:
    if cfg.rollout.engine == "local" and cfg.parallel.pp > 1:
        raise ConfigError("rollout.engine", "local", "in-trainer sampling needs parallel.pp=1; "
                          "use rollout.engine=sglang with pipeline parallelism")
    if (cfg.rollout.engine == "sglang" and cfg.rollout.mode != "external"
            and importlib.util.find_spec("sglang") is None):
        raise ConfigError("rollout.engine", "sglang", "SGLang is not installed, so no server can "
                          "be launched: pip install sglang on GPU machines, "
                          "bash tests/harness/sglang_cpu/setup.sh on CPU (tools/setup_env.sh "
                          "does it), or --set rollout.engine=local to sample in the trainer")
    if (cfg.rollout.engine == "sglang" and cfg.rollout.mode != "external"
            and (cfg.model.checkpoint_format != "hf" or cfg.model.checkpoint is None)):
        raise ConfigError("model.checkpoint_format", cfg.model.checkpoint_format,
                          "launched SGLang servers start from an HF checkpoint; give the student "
                          "as format hf (or use rollout.mode=external)")
    if cfg.train.async_rollout and cfg.rollout.engine == "local":
        raise ConfigError("train.async_rollout", True, "one-step-off rollout needs server engines "
                          "(rollout.engine=sglang); the local engine samples with the live weights")


def _check_fp8(cfg: MOPDConfig) -> None:
    """FP8 needs Transformer Engine on a Hopper or newer GPU: refused here, before any build."""
    from ..models.fp8 import fp8_unavailable_reason
    if cfg.model.fp8.enabled:
        reason = fp8_unavailable_reason()
        if reason:
            raise ConfigError("model.fp8.enabled", True, f"FP8 cannot run here: {reason}")


def _check_packing(cfg: MOPDConfig) -> None:
    """Packed rows on a GPU need Transformer Engine's THD attention: the local spec's fused
    causal softmax would ignore the block-diagonal mask and let sequences see each other."""
    from ..models.builder import packed_attention_format
    if cfg.parallel.pack_sequences and torch.cuda.is_available() \
            and packed_attention_format() != "thd":
        raise ConfigError("parallel.pack_sequences", True, "packing on a GPU needs Transformer "
                          "Engine (THD attention); it is not importable here")


def _check_export(cfg: MOPDConfig) -> None:
    ck = cfg.checkpoint
    if ck.hf_export_dir is None:
        return
    if ck.dir is None:
        raise ConfigError("checkpoint.hf_export_dir", ck.hf_export_dir, "the HF export is "
                          "converted from the final checkpoint: set checkpoint.dir")
    if os.path.exists(ck.hf_export_dir) and os.listdir(ck.hf_export_dir):
        raise ConfigError("checkpoint.hf_export_dir", ck.hf_export_dir, "exists and is not "
                          "empty; the export will not overwrite it")


def _verifiers(cfg: MOPDConfig):
    from ..rewards import SandboxUnavailable, build_reward_registry
    from ..runtime import launch_env
    specs = {d: {"type": v.type, **v.params} for d, v in cfg.reward.verifiers.items()}
    try:
        registry = build_reward_registry(specs, max_workers=cfg.reward.workers)
    except ValueError as e:
        raise ConfigError("reward.verifiers", specs, str(e)) from None
    except SandboxUnavailable as e:  # no isolation here: refused, naming the domain's sandbox
        field = f"reward.verifiers.{e.domain}.params.sandbox" if e.domain else "reward.verifiers"
        raise ConfigError(field, specs.get(e.domain, {}).get("sandbox"), str(e)) from None
    if launch_env().rank == 0:  # which isolation untrusted code gets is worth one line
        for d, v in registry.verifiers.items():
            if hasattr(v, "describe_sandbox"):
                print(f"reward.verifiers.{d}: code sandbox {v.describe_sandbox()}", flush=True)
    return registry


def build_chunks(hf_source, cfg: MOPDConfig, *, frozen: bool = False) -> tuple[HFModelConfig, list]:
    """This rank's chunks of the model ``hf_source`` describes, in the recipe's layout (the
    student; ``frozen``: a teacher, forward-only)."""
    hf = load_hf_config(hf_source) if not isinstance(hf_source, HFModelConfig) else hf_source
    return hf, build_model_chunks(hf, cfg.parallel, dtype=cfg.model.dtype, fp8=cfg.model.fp8,
                                  frozen=frozen)


def load_weights(chunks: list, path: str | None, fmt: str, hf: HFModelConfig | None) -> None:
    """Fill ``chunks`` from a Megatron dist-checkpoint or an HF directory. ``hf``: the
    architecture the chunks were built from (None: the HF directory's own config.json)."""
    if path is None:
        return
    if fmt == "megatron":
        from ..checkpoint import dist_ckpt
        dist_ckpt.load(path, chunks)
        return
    # HF: each rank reads its own shards from the safetensors files, with the converter's
    # mappings. No rank converts for the others (which would hold every rank in a collective
    # for a whole-model conversion) and nothing is written next to the model store.
    from ..convert import load_hf_weights
    load_hf_weights(chunks, path, hf)


def total_optimizer_steps(cfg: MOPDConfig) -> int:
    """Optimizer steps of the whole run: the schedule spans every one of them."""
    o = cfg.optimizer
    return cfg.train.steps * o.steps_per_rollout * o.epochs_per_rollout


def build_student(cfg: MOPDConfig, hf: HFModelConfig, *, load: bool = True):
    """(ddp chunks, optimizer, scheduler), weights loaded from model.checkpoint unless ``load``
    is false (a resume: the checkpoint it loads next replaces every weight)."""
    from ..mcore.optimizer import build_optimizer, wrap_ddp
    _, chunks = build_chunks(hf, cfg)
    if load:
        load_weights(chunks, cfg.model.checkpoint, cfg.model.checkpoint_format, hf)
    ddp = wrap_ddp(chunks, cfg.optimizer)
    optimizer, scheduler = build_optimizer(ddp, cfg.optimizer, total_optimizer_steps(cfg),
                                           DTYPES[cfg.model.dtype])
    return ddp, optimizer, scheduler


@dataclass
class Engines:
    """The rollout engines as this rank sees them.

    ``driver`` generates (global rank 0 for server engines, every rank for collective ones);
    ``node`` holds the servers this rank's node loads weights into and releases around training
    (colocated: on each node's local rank 0; otherwise rank 0's own handle, or None).
    ``placement``: where the colocated engines run (what --dry-run prints), else None.
    """

    driver: Any
    node: Any = None
    placement: list | None = None


def gpus_per_node() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_engines(cfg: MOPDConfig, chunks: list, inputs: Inputs, layout) -> Engines:
    """The rollout engines the recipe names, placed as rollout/placement.py says."""
    ro = cfg.rollout
    if ro.engine == "local":
        from ..rollout.local import LocalEngine
        return Engines(LocalEngine(chunks, vocab_size=inputs.hf.vocab_size, eos_id=inputs.eos_id,
                                   pad_id=inputs.pad_id, seed=cfg.train.seed))
    from ..rollout import SGLangEngine
    if ro.mode != "colocated":  # one fleet, driven and loaded by global rank 0
        if layout.rank != 0:
            return Engines(None)
        engine = SGLangEngine.from_config(ro, _engine_model_path(cfg), log_dir=ro.server_log_dir)
        if ro.mode == "dedicated" and ro.external_urls:
            # Engines on other nodes cannot map this node's memory: weights go over a process
            # group of global rank 0 and every server TP rank.
            engine.connect_weight_group(*_weight_group_address())
        return Engines(engine, engine)
    return _colocated_engines(cfg, layout)


def _weight_group_address() -> tuple[str, int]:
    """Where rank 0 hosts the weight-update group: the job's master address (the servers
    reach rank 0 there), on a port free now."""
    import socket

    from ..runtime import free_port, launch_env
    # An address, not a name: "localhost" may resolve to ::1 on one side and 127.0.0.1 on the
    # other, and the group's rendezvous then never completes.
    return socket.gethostbyname(launch_env().master_addr), free_port()


def _engine_model_path(cfg: MOPDConfig) -> str | None:
    return cfg.model.checkpoint if cfg.model.checkpoint_format == "hf" else None


def _engine_host(rollout, layout) -> str:
    """The address a node's engines bind to: rollout.host when every rank runs on one host
    (emulated nodes included), else this node's own name, so that the driver on node 0 can
    reach engines on every node."""
    import socket

    import torch.distributed as dist
    hosts = [None] * layout.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) == 1 or rollout.host not in ("127.0.0.1", "localhost"):
        return rollout.host
    return socket.gethostname()


def _colocated_engines(cfg: MOPDConfig, layout) -> Engines:
    """Every training node's local rank 0 starts that node's engines on the node's GPUs; global
    rank 0 drives generation over all of them (load-balanced, a prompt's samples on one)."""
    import dataclasses

    import torch.distributed as dist

    from ..rollout import SGLangEngine
    from ..rollout.placement import colocated_placement
    from ..rollout.sglang_engine import server_specs_from_config
    ro = cfg.rollout
    placement = colocated_placement(ro, layout.nodes, layout.local_world_size, gpus_per_node())
    host = _engine_host(ro, layout)
    node = None
    urls: list[str] = []
    if layout.local_rank == 0:
        slots = placement[layout.node_rank].engines
        base = server_specs_from_config(dataclasses.replace(ro, num_engines=1),
                                        _engine_model_path(cfg), ro.server_log_dir)[0]
        specs = [dataclasses.replace(
            base, port=s.port, host=host,
            env=base.env + ((("CUDA_VISIBLE_DEVICES", ",".join(map(str, s.gpus))),) if s.gpus else ()),
            log_path=os.path.join(ro.server_log_dir, f"sglang_node{s.node}_{s.index}.log")
            if ro.server_log_dir else None) for s in slots]
        if ro.server_log_dir:
            os.makedirs(ro.server_log_dir, exist_ok=True)
        node = SGLangEngine.launch(specs, None, ro.startup_timeout_s, ro.server_log_dir,
                                   concurrency=ro.concurrency,
                                   request_timeout_s=ro.request_timeout_s,
                                   samples_per_request=ro.samples_per_request)
        node.watch()  # a dead engine is restarted on its own node
        urls = [c.url for c in node.clients]
    every = [None] * layout.world_size
    dist.all_gather_object(every, urls)
    driver = None
    if layout.rank == 0:
        fleet = [u for per_rank in every for u in per_rank]
        driver = SGLangEngine.connect(fleet, concurrency=ro.concurrency,
                                      request_timeout_s=ro.request_timeout_s,
                                      samples_per_request=ro.samples_per_request)
        driver.restart_wait_s = ro.startup_timeout_s  # its node's watchdog restarts it
    return Engines(driver, node, placement)
