"""Every recipe field is consumed: changing it changes what the run builds or does.

A recipe field that nothing reads is a lie. For every dotted path of ``field_docs(MOPDConfig)``
(nested sections, ``teachers[]`` items and ``reward.verifiers.<key>`` entries included), PERTURB
names a valid new value and the probe(s) whose artifact must change; the test loads the real
recipe (recipes/tiny_cpu.yaml pointed at small demo inputs, or recipes/mopd_70b.yaml for the
GPU-only fields) with and without the override, runs the probes, and compares.

A probe is ``cfg -> comparable artifact`` and runs the project's own consumer code:

    megatron   plan.build.student_transformer_config (the function the trainer's build calls)
    plan       plan.memory.plan_memory(plan.cli.inputs_from_config(...))
    launch     the Slurm launcher's CLI (launch/slurm.py::main --emit-shell and --dry-run)
    demo       what ``mopd train`` runs before start-up to build the demo's inputs
               (trainer/cli.py::ensure_demo_inputs; the builder's process recorded, not run)
    runtime, student, teachers, engine, sampling, inputs, logger
               a real ``Trainer(cfg)``: its constructor's calls into the backend (below), the
               objects it built (SamplingParams, TeacherPool, engines, Inputs, MetricLogger)
    rollout, reward, loss, step, sync, eval, checkpoint
               a real ``Trainer(cfg, engine=RecordingEngine())`` and its own methods: rollout(),
               reward(), loss_fn, teacher_scores() + student_update() + metrics(),
               sync_weights(), evaluate() + periodic_eval(), should_save() + save() +
               checkpoint.resolve_resume() + export_hf()

The Trainer runs on a fake *backend*, replaced only where the work leaves Python/this package:
Megatron model construction (``build_model_chunks`` -> models whose logits are a fixed function
of their loaded weights' path; the TransformerConfig is still built by the real
``transformer_config``), Megatron DDP / optimizer (the real OptimizerConfig, DDP config and
OptimizerParamScheduler are built and recorded), dist-checkpoint I/O, the direct HF load and
the HF conversion (which start-up must never call),
``torch.distributed`` collectives (one rank), ``init_runtime``, the SGLang server processes
(``ManagedProcess.start``: the real command line and environment are recorded), and greedy
decoding for eval. Everything between the recipe and those calls is the project's code.

The demo inputs are the tiny demo's own (tools/build_demo_teachers.py: its tokenizer, prompt
rows and HF config), written without training: no probe reads weights, so the checkpoint
directories are placeholders that pass the start-up checks of both formats.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import types
import zlib
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
BIG = ROOT / "recipes" / "mopd_70b.yaml"
LOCAL_ENGINE = ("rollout.engine=local", "rollout.mode=colocated", "train.async_rollout=false")
BIG_WORLD = 64  # the 70B recipe's layout: 8 nodes x 8 GPUs (its header)


@dataclasses.dataclass(frozen=True)
class P:
    """How to change one field. ``set``: overrides of the field itself (``{d}`` = the demo
    inputs directory); ``probes``: artifacts that must change; ``recipe``: "tiny" or "70b";
    ``ctx``: overrides applied to base and changed recipe alike (the field only matters in that
    context); ``also``: other fields the new value needs to be valid, checked not to be what
    makes the difference (the probes must also differ from base + ``also``); ``raises``: the
    changed recipe is refused by the consumer with an error naming this text."""

    set: tuple[str, ...]
    probes: tuple[str, ...]
    recipe: str = "tiny"
    ctx: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    raises: str | None = None


FP8_ON = ("model.fp8.enabled=true",)
WANDB = ("logging.wandb_project=mopd",)
NO_ROUTER_BATCH = ("rollout.samples_per_request=1",)
EXTERNAL = ("rollout.mode=external", "rollout.external_urls=[http://10.0.0.1:30000]",
            "rollout.server_args=[]")
COLOCATED = ("rollout.mode=colocated", "train.async_rollout=false")

PERTURB: dict[str, P] = {
    # --- model ---------------------------------------------------------------------------------
    "model.hf_config": P(("model.hf_config={d}/alt",), ("megatron", "student")),
    "model.checkpoint": P(("model.checkpoint={d}/teacher_caesar/hf",), ("student", "engine")),
    # A Megatron-format student cannot seed launched SGLang servers: a local-engine run.
    "model.checkpoint_format": P(("model.checkpoint_format=megatron",), ("student",), ctx=LOCAL_ENGINE),
    "model.tokenizer": P(("model.tokenizer={d}/tok_nobos",), ("inputs",)),
    "model.dtype": P(("model.dtype=bf16",), ("megatron", "student")),
    "model.fp8.enabled": P(FP8_ON, ("megatron", "plan"), "70b"),
    # FP8's companions reach Megatron only with FP8 on (models/builder.py::fp8_transformer_kwargs).
    "model.fp8.format": P(("model.fp8.format=e4m3",), ("megatron",), "70b", FP8_ON),
    "model.fp8.recipe": P(("model.fp8.recipe=blockwise",), ("megatron",), "70b", FP8_ON),
    "model.fp8.param": P(("model.fp8.param=true",), ("megatron",), "70b", FP8_ON),
    "model.fp8.first_last_layers_bf16": P(("model.fp8.first_last_layers_bf16=false",),
                                          ("megatron",), "70b", FP8_ON),
    "model.fp8.num_layers_at_start_in_bf16": P(("model.fp8.num_layers_at_start_in_bf16=2",),
                                               ("megatron",), "70b", FP8_ON),
    "model.fp8.num_layers_at_end_in_bf16": P(("model.fp8.num_layers_at_end_in_bf16=2",),
                                             ("megatron",), "70b", FP8_ON),
    # --- teachers (item 0 of the list; the field is the same on every item) ---------------------
    "teachers[].domains": P(("teachers[0].domains=[reversal]", "teachers[1].domains=[caesar]"),
                            ("teachers", "step")),
    "teachers[].checkpoint": P(("teachers[0].checkpoint={d}/teacher_reversal/mcore",),
                               ("teachers", "step")),
    "teachers[].format": P(("teachers[0].format=hf",), ("teachers",)),
    "teachers[].hf_config": P(("teachers[0].hf_config={d}/alt",), ("teachers",)),
    "teachers[].name": P(("teachers[0].name=cipher",), ("teachers", "step")),
    "teachers[].offload": P(("teachers[0].offload=true",), ("teachers", "plan")),
    # --- data ----------------------------------------------------------------------------------
    "data.paths": P(("data.paths=[{d}/prompts_b.jsonl]",), ("inputs", "rollout")),
    "data.domain_weights": P(("data.domain_weights={{caesar: 3.0, reversal: 1.0}}",), ("rollout",)),
    "data.chat_template": P(("data.chat_template=true",), ("inputs", "eval")),
    "data.bad_rows": P(("data.bad_rows=fail",), ("inputs",),
                       ctx=("data.paths=[{d}/prompts_bad.jsonl]", "data.bad_rows=skip"),
                       raises="data.bad_rows=fail"),
    "data.max_prompt_len": P(("data.max_prompt_len=6",), ("inputs", "plan"),
                             ctx=("data.bad_rows=skip",)),
    "data.seed": P(("data.seed=1",), ("rollout",)),
    "data.eval_paths": P(("data.eval_paths=[{d}/prompts_b.jsonl]",), ("eval",)),
    "data.build_demo_inputs": P(("data.build_demo_inputs=false",), ("demo",)),
    # --- reward --------------------------------------------------------------------------------
    "reward.verifiers.<key>.type": P(("reward.verifiers.caesar.type=math",), ("inputs",)),
    "reward.verifiers.<key>.params": P(
        ("reward.verifiers.caesar.params={{answer_key: answer, extract: '^(.)'}}",),
        ("inputs", "reward")),
    "reward.grpo_std_normalize": P(("reward.grpo_std_normalize=false",), ("reward",)),
    "reward.workers": P(("reward.workers=2",), ("inputs",)),
    # --- rollout -------------------------------------------------------------------------------
    "rollout.engine": P(("rollout.engine=local",), ("engine",), also=("train.async_rollout=false",)),
    "rollout.mode": P(("rollout.mode=colocated",), ("engine", "plan"),
                      also=("train.async_rollout=false",)),
    "rollout.external_urls": P(("rollout.external_urls=[http://10.0.0.2:30000]",), ("engine",),
                               ctx=EXTERNAL),
    "rollout.num_engines": P(("rollout.num_engines=2",), ("engine",)),
    "rollout.engines_per_node": P(("rollout.engines_per_node=2",), ("engine",),
                                  ctx=COLOCATED),
    "rollout.n_samples_per_prompt": P(("rollout.n_samples_per_prompt=8",), ("rollout",),
                                      also=("parallel.global_batch_size=128",)),
    "rollout.temperature": P(("rollout.temperature=0.7",), ("sampling", "loss", "step")),
    "rollout.max_new_tokens": P(("rollout.max_new_tokens=16",), ("sampling", "eval", "plan")),
    "rollout.concurrency": P(("rollout.concurrency=4",), ("engine",)),
    "rollout.samples_per_request": P(("rollout.samples_per_request=1",), ("engine",)),
    "rollout.request_timeout_s": P(("rollout.request_timeout_s=30",), ("engine",)),
    "rollout.startup_timeout_s": P(("rollout.startup_timeout_s=60",), ("engine",)),
    "rollout.server_tp_size": P(("rollout.server_tp_size=2",), ("engine", "plan")),
    "rollout.mem_fraction_static": P(("rollout.mem_fraction_static=0.5",), ("engine", "plan")),
    "rollout.max_total_tokens": P(("rollout.max_total_tokens=4096",), ("engine",)),
    "rollout.server_cpu_threads": P(("rollout.server_cpu_threads=2",), ("engine",)),
    "rollout.server_log_dir": P(("rollout.server_log_dir=runs/elsewhere",), ("engine",)),
    "rollout.host": P(("rollout.host=0.0.0.0",), ("engine",)),
    "rollout.base_port": P(("rollout.base_port=31000",), ("engine",)),
    "rollout.router": P(("rollout.router=true",), ("engine",), ctx=NO_ROUTER_BATCH),
    "rollout.router_port": P(("rollout.router_port=30200",), ("engine",),
                             ctx=NO_ROUTER_BATCH + ("rollout.router=true",)),
    "rollout.parity_tolerance": P(("rollout.parity_tolerance=0.01",), ("sync",)),
    "rollout.parity_interval": P(("rollout.parity_interval=3",), ("sync",)),
    "rollout.weight_sync_bucket_mib": P(("rollout.weight_sync_bucket_mib=128",), ("sync",)),
    "rollout.server_args": P(("rollout.server_args=[--disable-cuda-graph]",), ("engine",)),
    # --- loss ----------------------------------------------------------------------------------
    "loss.alpha": P(("loss.alpha=0.5",), ("loss",)),
    "loss.eps_low": P(("loss.eps_low=0.3",), ("loss",)),
    "loss.eps_high": P(("loss.eps_high=2.0",), ("loss",)),
    "loss.is_variant": P(("loss.is_variant=tis",), ("loss",)),
    "loss.tis_cap": P(("loss.tis_cap=3.0",), ("loss",), ctx=("loss.is_variant=tis",)),
    "loss.aggregation": P(("loss.aggregation=token_mean",), ("loss",)),
    "loss.log_entropy": P(("loss.log_entropy=true",), ("loss", "step")),
    # (full_vocab needs the teachers' LM-head input, which the fake models here do not have:
    # its consumption is the trainer-level test tests/test_train_layouts.py::test_kl_signal_*)
    "loss.signal": P(("loss.signal=topk",), ("step",)),
    "loss.topk": P(("loss.topk=4",), ("step",), ctx=("loss.signal=topk",)),
    # --- optimizer -----------------------------------------------------------------------------
    "optimizer.lr": P(("optimizer.lr=1e-4",), ("student",)),
    "optimizer.min_lr": P(("optimizer.min_lr=1e-5",), ("student",)),
    "optimizer.betas": P(("optimizer.betas=[0.9, 0.95]",), ("student",)),
    "optimizer.eps": P(("optimizer.eps=1e-6",), ("student",)),
    "optimizer.weight_decay": P(("optimizer.weight_decay=0.1",), ("student",)),
    "optimizer.clip_grad": P(("optimizer.clip_grad=0.5",), ("student",)),
    "optimizer.warmup_steps": P(("optimizer.warmup_steps=10",), ("student",)),
    "optimizer.schedule": P(("optimizer.schedule=linear",), ("student",)),
    "optimizer.decay_fraction": P(("optimizer.decay_fraction=0.5",), ("student",),
                                  ctx=("optimizer.schedule=wsd",)),
    "optimizer.steps_per_rollout": P(("optimizer.steps_per_rollout=2",), ("student", "step"),
                                     also=("parallel.global_batch_size=32",
                                           "parallel.micro_batch_size=32")),
    "optimizer.epochs_per_rollout": P(("optimizer.epochs_per_rollout=2",), ("student", "step")),
    "optimizer.distributed_optimizer": P(("optimizer.distributed_optimizer=true",), ("student", "plan")),
    # --- parallel (the layout fields on the 70B recipe: a one-rank trainer cannot take them) ---
    "parallel.tp": P(("parallel.tp=4",), ("megatron", "plan", "launch"), "70b"),
    "parallel.pp": P(("parallel.pp=2",), ("megatron", "plan", "launch"), "70b"),
    "parallel.vpp": P(("parallel.vpp=2",), ("megatron", "plan"), "70b"),
    "parallel.micro_batch_size": P(("parallel.micro_batch_size=32",), ("step", "plan")),
    "parallel.global_batch_size": P(("parallel.global_batch_size=32",), ("step", "plan"),
                                    also=("optimizer.steps_per_rollout=2",
                                          "parallel.micro_batch_size=32")),
    "parallel.max_tokens_per_microbatch": P(("parallel.max_tokens_per_microbatch=256",),
                                            ("step", "plan")),
    "parallel.pack_sequences": P(("parallel.pack_sequences=true",), ("step",),
                                 ctx=("parallel.max_tokens_per_microbatch=256",)),
    "parallel.sequence_parallel": P(("parallel.sequence_parallel=false",), ("megatron", "plan"), "70b"),
    "parallel.recompute": P(("parallel.recompute=full",), ("megatron", "plan"), "70b"),
    "parallel.overlap_p2p_comm": P(("parallel.overlap_p2p_comm=false",), ("megatron",), "70b"),
    # --- runtime -------------------------------------------------------------------------------
    "runtime.timeout_minutes": P(("runtime.timeout_minutes=90",), ("runtime",)),
    "runtime.phase_warn_minutes": P(("runtime.phase_warn_minutes=5",), ("runtime",)),
    # --- train ---------------------------------------------------------------------------------
    "train.steps": P(("train.steps=100",), ("student", "checkpoint", "logger")),
    "train.prompts_per_step": P(("train.prompts_per_step=8",), ("rollout",),
                                also=("parallel.global_batch_size=32",
                                      "parallel.micro_batch_size=32")),
    "train.seed": P(("train.seed=7",), ("runtime",)),
    "train.async_rollout": P(("train.async_rollout=false",), ("rollout",)),
    "train.eval_interval": P(("train.eval_interval=50",), ("eval",)),
    "train.cpu_threads": P(("train.cpu_threads=2",), ("runtime",)),
    # --- checkpoint ----------------------------------------------------------------------------
    "checkpoint.dir": P(("checkpoint.dir=runs/elsewhere",), ("checkpoint",)),
    "checkpoint.save_interval": P(("checkpoint.save_interval=500",), ("checkpoint",)),
    "checkpoint.keep_last": P(("checkpoint.keep_last=4",), ("checkpoint",)),
    "checkpoint.resume": P(("checkpoint.resume=none",), ("checkpoint",)),
    "checkpoint.hf_export_dir": P(("checkpoint.hf_export_dir=runs/student_hf",), ("checkpoint",)),
    # --- logging -------------------------------------------------------------------------------
    "logging.console": P(("logging.console=false",), ("logger",)),
    "logging.interval": P(("logging.interval=2",), ("logger",)),
    "logging.jsonl_path": P(("logging.jsonl_path=runs/elsewhere.jsonl",), ("logger",)),
    "logging.tensorboard_dir": P(("logging.tensorboard_dir=runs/tb",), ("logger",)),
    "logging.wandb_project": P(WANDB, ("logger",)),
    "logging.wandb_entity": P(("logging.wandb_entity=team",), ("logger",), ctx=WANDB),
    "logging.wandb_mode": P(("logging.wandb_mode=offline",), ("logger",), ctx=WANDB),
    "logging.wandb_run_name": P(("logging.wandb_run_name=run1",), ("logger",), ctx=WANDB),
}

# Fields read only by the memory planner (mopd_megatron/plan/) or the Slurm launcher
# (mopd_megatron/launch/slurm.py). None today: every field they read is also read by the
# trainer, and PERTURB checks the planner/launcher through the plan/launch probes as well.
PLANNER_OR_LAUNCHER_ONLY: dict[str, str] = {}

# Fields with a single accepted value: any other is refused when the recipe is loaded
# (config/systems.py::RolloutConfig.__post_init__, TRUNCATION_REFUSED), so no valid change
# exists. Checked: the change is refused naming the field, and the one value reaches the
# sampling parameters the Trainer sends to the engine (train.py::Trainer.__init__).
PINNED: dict[str, tuple[str, str]] = {
    "rollout.top_p": ("rollout.top_p=0.9", "top_p"),
    "rollout.top_k": ("rollout.top_k=50", "top_k"),
}


# --- demo inputs (no training: placeholders for the weights) -----------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}>{% endif %}")


def _demo_tool():
    spec = importlib.util.spec_from_file_location("_build_demo_teachers",
                                                  ROOT / "tools" / "build_demo_teachers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while it executes
    spec.loader.exec_module(mod)
    return mod


def _write_demo_inputs(d: Path) -> None:
    tool = _demo_tool()
    # The settings tests/train_helpers.py::TINY_FLAGS builds with, fewer rows.
    s = tool.DemoSettings(hidden=32, ffn=64, layers=2, unused_tokens=110, max_len=5,
                          train_prompts=40, eval_prompts=8)
    tok = tool.build_tokenizer(s)
    tok.chat_template = CHAT_TEMPLATE
    nobos = tool.build_tokenizer(s)
    nobos.chat_template = CHAT_TEMPLATE
    nobos.backend_tokenizer.post_processor = None  # same vocabulary, no BOS
    nobos.save_pretrained(str(d / "tok_nobos"))
    tok.save_pretrained(str(d / "tokenizer"))
    alt = dataclasses.replace(s, hidden=64, ffn=128, layers=4)
    for name, settings in (("student/hf", s), ("student/mcore", s), ("teacher_caesar/hf", s),
                           ("teacher_caesar/mcore", s), ("teacher_reversal/hf", s),
                           ("teacher_reversal/mcore", s), ("alt", alt)):
        p = d / name
        p.mkdir(parents=True)
        (p / "config.json").write_text(json.dumps(tool.hf_config(settings)))
        tok.save_pretrained(str(p))
        (p / "model.safetensors").write_bytes(b"")   # what preflight looks for (format hf)
        (p / "metadata.json").write_text("{}")       # (format megatron)
    train, evals = tool.make_splits(s)
    other, _ = tool.make_splits(dataclasses.replace(s, seed=1))
    bad = train + [{"domain": "caesar", "answer": "abc"}]  # no prompt: a bad row
    for fname, rows in (("prompts.jsonl", train), ("eval.jsonl", evals),
                        ("prompts_b.jsonl", other), ("prompts_bad.jsonl", bad)):
        (d / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("recipe_fields")
    _write_demo_inputs(d / "in")
    return d


def tiny_overrides(d: Path) -> list[str]:
    """The tiny recipe pointed at the demo inputs (like tests/train_helpers.py::recipe_overrides),
    everything else as the recipe ships but the loss signal (below). Its relative output paths
    (runs/...) land in the probe's scratch working directory."""
    return [f"model.hf_config={d}/student/hf", f"model.checkpoint={d}/student/hf",
            f"teachers[0].checkpoint={d}/teacher_caesar/mcore",
            f"teachers[0].hf_config={d}/teacher_caesar/hf",
            f"teachers[1].checkpoint={d}/teacher_reversal/mcore",
            f"teachers[1].hf_config={d}/teacher_reversal/hf",
            f"data.paths=[{d}/prompts.jsonl]", f"data.eval_paths=[{d}/eval.jsonl]",
            # The probes' fake models are logit tables without an output layer, which
            # loss.signal=full_vocab (the recipe's) reads teacher hidden states from; that
            # signal's consumption is proven on real models (tests/test_kl_signal.py,
            # tests/test_train_layouts.py::test_kl_signal_*).
            "loss.signal=sampled"]


def load(demo: Path, recipe: str, overrides=()):
    from mopd_megatron.config import load_recipe
    d = demo / "in"
    ov = [o.format(d=d) for o in overrides]
    if recipe == "tiny":
        return load_recipe(TINY, tiny_overrides(d) + ov)
    return load_recipe(BIG, ov)


# --- comparable artifacts ----------------------------------------------------------------------
def plain(x):
    """Plain, comparable data: dataclasses as dicts, tensors as rounded lists, callables by name."""
    import torch
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [plain(v) for v in x]
        return sorted(items, key=repr) if isinstance(x, (set, frozenset)) else items
    if isinstance(x, torch.Tensor):
        return plain(x.detach().double().tolist() if x.is_floating_point() else x.tolist())
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, (bool, int, str, type(None))):
        return x
    if isinstance(x, (torch.dtype, Path)):
        return str(x)
    if isinstance(x, re.Pattern):
        return f"re:{x.pattern}"
    return getattr(x, "__qualname__", type(x).__name__)


def _is_error(artifact) -> bool:
    return isinstance(artifact, dict) and "raised" in artifact


# --- the fake backend --------------------------------------------------------------------------
class FakeModel:
    """A model chunk as ``build_model_chunks`` returns it: the real TransformerConfig, and
    logits that are a fixed function of the tokens and of the loaded weights (their path)."""

    def __init__(self, hf, config, padded_vocab: int, frozen: bool):
        self.hf, self.config, self.padded_vocab, self.frozen = hf, config, padded_vocab, frozen
        self.weights = "random init"
        self._table = None

    def eval(self):
        return self

    def requires_grad_(self, flag=True):
        return self

    def parameters(self):
        return iter(())

    def logits(self, tokens):
        import torch
        if self._table is None:
            g = torch.Generator().manual_seed(zlib.crc32(str(self.weights).encode()))
            v = self.padded_vocab
            self._table = torch.randn(v, v, generator=g) * 2
        return self._table[tokens]


class FakeDDP:
    def __init__(self, config, module):
        self.config, self.module = config, module

    def zero_grad_buffer(self):
        pass


def _model(chunk) -> FakeModel:
    return getattr(chunk, "module", chunk)


class FakeOptimizer:
    def __init__(self, config):
        self.config = config
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def scale_loss(self, loss):
        return loss

    def zero_grad(self):
        pass

    def step(self):
        return True, 0.5, None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class RecordingEngine:
    """A rollout engine standing in for SGLang inside the trainer-method probes: records what
    the trainer asks of it; scores sequences 0.03 nats off the student (parity probe)."""

    collective, needs_weight_sync = False, True

    def __init__(self):
        self.calls: list = []
        self.clients = [types.SimpleNamespace(url="http://engine:0")]
        self.student = None

    def generate(self, prompts, n, sampling):
        from mopd_megatron.rollout.engine import Sample
        self.calls.append(("generate", [list(p) for p in prompts], n, plain(sampling)))
        out = []
        for pi, p in enumerate(prompts):
            for si in range(n):
                toks = [3 + (sum(p) + 7 * si + j) % 20 for j in range(3)]
                out.append(Sample(pi, si, list(p), toks, [-0.5, -1.5, -2.5], "stop", "v"))
        return out

    def update_weights(self, buckets, version):
        list(buckets)
        self.calls.append(("update_weights", version))
        from mopd_megatron.rollout.weight_sync import SyncStats
        return SyncStats(transport="shm")

    def score(self, sequences, server=None):
        import torch

        from mopd_megatron.models.builder import mask_padded_vocab_
        out = []
        for seq in sequences:
            logits = self.student.logits(torch.tensor([list(seq)]))[0, :-1].clone()
            lp = torch.log_softmax(mask_padded_vocab_(logits, self.student.hf.vocab_size, 0), -1)
            out.append([float(lp[i, seq[i + 1]]) + 0.03 for i in range(len(seq) - 1)])
        return out

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        pass

    def shutdown(self):
        pass


class Backend:
    """The fake backend (see the module docstring); ``events`` is what the code asked of it,
    tagged with the build phase (student, teachers, engines) it happened in."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []
        self.phase = "other"

    def record(self, kind, payload):
        self.events.append((self.phase, kind, plain(payload)))

    def of(self, phase=None, kinds=None):
        return [(k, p) for ph, k, p in self.events
                if (phase is None or ph == phase) and (kinds is None or k in kinds)]


def _tc_summary(tc) -> dict:
    from mopd_megatron.plan.build import MEGATRON_FIELDS
    keys = MEGATRON_FIELDS + ("num_layers", "hidden_size", "ffn_hidden_size",
                              "num_attention_heads", "num_query_groups")
    return {k: plain(getattr(tc, k)) for k in keys}


@contextlib.contextmanager
def _module(name: str, module):
    """sys.modules[name] = module for the duration (only that key is restored)."""
    old = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old


@contextlib.contextmanager
def fake_backend(workdir: Path):
    """Install the fake backend, in a fresh scratch working directory (same path every time,
    so that artifacts holding it compare equal)."""
    import megatron.core.distributed as mcore_dist
    import megatron.core.optimizer as mcore_opt
    import megatron.core.optimizer_param_scheduler as mcore_sched
    import torch
    import torch.distributed as dist

    import mopd_megatron.convert as convert
    import mopd_megatron.mcore.schedule as schedule
    import mopd_megatron.mcore.step as step_mod
    import mopd_megatron.runtime as runtime
    import mopd_megatron.train as train_mod
    from mopd_megatron.checkpoint import dist_ckpt
    from mopd_megatron.mcore import adamw_fallback
    from mopd_megatron.models import builder as model_builder
    from mopd_megatron.rollout import server, sglang_engine
    from mopd_megatron.teachers import TeacherPool
    from mopd_megatron.trainer import builders

    be = Backend()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    def build_model_chunks(hf, parallel, *, dtype, fp8=None, frozen=False, **kw):
        tc = model_builder.transformer_config(hf, parallel, dtype=dtype,
                                              fp8=None if frozen else fp8, frozen=frozen)
        be.record("model", {"frozen": frozen, "config": _tc_summary(tc)})
        v = model_builder.padded_vocab_size(hf.vocab_size, model_builder.MAKE_VOCAB_SIZE_DIVISIBLE_BY,
                                            parallel.tp)
        return [FakeModel(hf, tc, v, frozen) for _ in range(parallel.vpp or 1)]

    def ckpt_load(path, chunks, optimizer=None, **kw):
        source = f"megatron:{path}"
        for c in chunks:
            _model(c).weights = source
        be.record("load", source)

    def ckpt_save(path, chunks, optimizer=None, **kw):
        os.makedirs(path, exist_ok=True)
        be.record("save", os.path.relpath(path, workdir))

    def load_hf(chunks, path, hf=None):
        for c in chunks:
            _model(c).weights = f"hf:{path}"
        be.record("load_hf", {"src": path, "hf": getattr(hf, "architecture", None)})

    def hf_to_megatron(src, out, **kw):
        raise AssertionError(f"the trainer converted {src} at start-up: format hf is read "
                             "directly by every rank (convert.load_hf_weights)")

    def megatron_to_hf(src, out, hf_config=None, **kw):
        be.record("export_hf", {"src": os.path.relpath(src, workdir), "out": out,
                                "hf_config": hf_config})

    def export_hf_weights(chunks, hf, layout, bucket_mib, **kw):
        be.record("export_buckets", bucket_mib)
        return iter(())

    def forward_backward(model_chunks, microbatches, loss_fn, *, vocab_size, tp_rank,
                         forward_only=False, packed_format="mask"):
        be.record("schedule", {"microbatches": [tuple(mb["tokens"].shape) for mb in microbatches],
                               "packed": [mb.get("cu_seqlens") is not None for mb in microbatches],
                               "format": packed_format, "forward_only": forward_only})
        out = []
        for mb in microbatches:
            logits = _model(model_chunks[0]).logits(mb["tokens"])
            model_builder.mask_padded_vocab_(logits, vocab_size, tp_rank)
            out.append(loss_fn(mb, logits)[2])
        return out

    def ddp(config, ddp_config, module, **kw):
        be.record("ddp", ddp_config)
        return FakeDDP(config, module)

    def get_megatron_optimizer(config, model_chunks, *a, **kw):
        be.record("optimizer", config)
        return FakeOptimizer(config)

    real_scheduler = mcore_sched.OptimizerParamScheduler

    def scheduler(optimizer, **kw):
        be.record("scheduler", kw)
        return real_scheduler(optimizer, **kw)

    def init_runtime(tp=1, pp=1, vpp=None, seed=1234, timeout_minutes=30):
        be.record("init_runtime", {"tp": tp, "pp": pp, "vpp": vpp, "seed": seed,
                                   "timeout_minutes": timeout_minutes})
        return runtime.Layout(tp=tp, pp=pp, dp=1, vpp=vpp, tp_rank=0, pp_rank=pp - 1, dp_rank=0,
                              rank=0, world_size=1)

    def process_start(self):
        env = {k: v for k, v in self.env.items() if os.environ.get(k) != v}
        gone = sorted(k for k in os.environ if k not in self.env)
        be.record("process", {"name": self.name, "cmd": self.cmd, "env": env, "env_removed": gone,
                              "log": self.log_path})

    def all_gather_object(out, obj, group=None):
        out[:] = [obj] * len(out)

    def gather_object(obj, out=None, dst=0, group=None):
        if out is not None:
            out[:] = [obj] * len(out)

    def phase(name, fn):
        def run(*a, **kw):
            old, be.phase = be.phase, name
            try:
                return fn(*a, **kw)
            finally:
                be.phase = old
        return run

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **kw):  # the fake backend serves SGLang (its processes are faked)
        if name == "sglang":
            return importlib.machinery.ModuleSpec("sglang", None)
        return real_find_spec(name, *a, **kw)

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: (be.record("wandb_init", {k: v for k, v in kw.items() if k != "config"})
                               or types.SimpleNamespace(log=lambda *a, **k: None,
                                                        finish=lambda: None))

    def greedy_accuracy(chunks, rows, tokenizer, rewards, *, max_new_tokens, eos_id, pad_id,
                        vocab_size, domains=None):
        be.record("greedy", {"model": _model(chunks[0]).weights, "rows": [r.prompt_ids for r in rows],
                             "domains": domains, "max_new_tokens": max_new_tokens, "eos": eos_id,
                             "pad": pad_id, "vocab": vocab_size})
        return {d: 0.5 for d in sorted({r.domain for r in rows})}

    teacher_build = TeacherPool.build.__func__
    patches = [
        mock.patch.object(builders, "build_model_chunks", build_model_chunks),
        mock.patch.object(builders, "gpus_per_node", lambda: 0),
        mock.patch.object(builders, "build_student", phase("student", builders.build_student)),
        mock.patch.object(builders, "build_engines", phase("engines", builders.build_engines)),
        mock.patch.object(TeacherPool, "build",
                          classmethod(lambda cls, *a, **k: phase("teachers", teacher_build)(cls, *a, **k))),
        mock.patch.object(dist_ckpt, "load", ckpt_load),
        mock.patch.object(dist_ckpt, "save", ckpt_save),
        mock.patch.object(convert, "load_hf_weights", load_hf),
        mock.patch.object(convert, "convert_hf_to_megatron", hf_to_megatron),
        mock.patch.object(convert, "convert_megatron_to_hf", megatron_to_hf),
        mock.patch.object(convert, "export_hf_weights", export_hf_weights),
        mock.patch.object(schedule, "forward_backward", forward_backward),
        mock.patch.object(step_mod, "forward_backward", forward_backward),
        mock.patch.object(mcore_dist, "DistributedDataParallel", ddp),
        mock.patch.object(mcore_opt, "get_megatron_optimizer", get_megatron_optimizer),
        mock.patch.object(mcore_sched, "OptimizerParamScheduler", scheduler),
        mock.patch.object(adamw_fallback, "apply", lambda: None),
        mock.patch.object(runtime, "init_runtime", init_runtime),
        mock.patch.object(runtime, "device", lambda: torch.device("cpu")),
        mock.patch.object(torch, "set_num_threads", lambda n: be.record("set_num_threads", n)),
        mock.patch.object(dist, "get_rank", lambda group=None: 0),
        mock.patch.object(dist, "get_world_size", lambda group=None: 1),
        mock.patch.object(dist, "is_initialized", lambda: False),
        mock.patch.object(dist, "broadcast_object_list", lambda objs, src=0, group=None: None),
        mock.patch.object(dist, "all_gather_object", all_gather_object),
        mock.patch.object(dist, "gather_object", gather_object),
        mock.patch.object(dist, "barrier", lambda group=None, **kw: None),
        mock.patch.object(server.ManagedProcess, "start", process_start),
        mock.patch.object(server, "wait_healthy", lambda *a, **k: None),
        mock.patch.object(sglang_engine, "wait_healthy", lambda *a, **k: None),
        mock.patch.object(dist, "all_reduce", lambda t, op=None, group=None, **kw: None),
        mock.patch.object(server.SGLangRouter, "_wait_workers", lambda self: None),
        mock.patch.object(train_mod, "greedy_accuracy", greedy_accuracy),
        mock.patch.object(importlib.util, "find_spec", find_spec),
        _module("wandb", wandb),  # not patch.dict: that would also drop modules imported meanwhile
    ]

    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(contextlib.chdir(workdir))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        yield be


# --- fixed inputs for the trainer-method probes (independent of the recipe) --------------------
def _fixed_batch(demo: Path, prompts_per_domain: int, n: int, seed: int):
    """A RolloutBatch over the demo's prompts: half right answers (reward 1 by exact match),
    half wrong, with fixed log mu and advantages."""
    import torch
    from transformers import AutoTokenizer

    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    tok = AutoTokenizer.from_pretrained(str(demo / "in" / "tokenizer"))
    rows_src = [json.loads(x) for x in (demo / "in" / "prompts.jsonl").read_text().splitlines()]
    by_domain = [[r for r in rows_src if r["domain"] == d][:prompts_per_domain]
                 for d in ("caesar", "reversal")]
    picked = [r for pair in zip(*by_domain) for r in pair]  # domains interleaved
    g = torch.Generator().manual_seed(seed)
    rows, samples = [], []
    for pi, r in enumerate(picked):
        ids = tok(r["prompt"])["input_ids"]
        rows.append(PromptRow(r["domain"], r["prompt"], None, {"answer": r["answer"]},
                              f"fixed:{pi}", prompt_ids=ids))
        for si in range(n):
            text = r["answer"] if (pi + si) % 2 == 0 else r["answer"][::-1] + "a"
            resp = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            mu = (-torch.rand(len(resp), generator=g) * 3).tolist()
            samples.append(Sample(pi, si, ids, resp, mu, "stop", "v"))
    adv = torch.randn(len(samples), generator=g).tolist()
    rewards = [float((s.prompt_index + s.sample_index) % 2 == 0) for s in samples]
    return RolloutBatch(rows, samples, n, rewards=rewards, advantages=adv)


# Target ratios pi_theta / mu of the loss probe's tokens: inside and outside every band the
# PERTURB entries move (IcePop [0.5, 5] -> [0.3, 5] / [0.5, 2]; TIS cap 2 -> 3).
RATIOS = (0.2, 0.35, 0.45, 0.6, 0.9, 1.0, 1.2, 1.8, 2.5, 3.5, 4.5, 5.5, 8.0)


def _loss_inputs(demo: Path):
    import torch

    from mopd_megatron.models.builder import mask_padded_vocab_
    from mopd_megatron.trainer.microbatches import pack_microbatches
    batch = _fixed_batch(demo, 2, 2, seed=3)
    (mb,) = pack_microbatches(batch, list(range(len(batch))), len(batch), pad_id=0)
    b, s = mb["tokens"].shape
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(b, s, 256, generator=g) * 2
    mask_padded_vocab_(logits, 134, 0)
    lp = torch.log_softmax(logits, -1).gather(-1, mb["targets"][..., None])[..., 0]
    pos = mb["loss_mask"] > 0
    k = torch.arange(int(pos.sum())) % len(RATIOS)
    ratio = torch.tensor(RATIOS)[k]
    mb["rollout_logp"][pos] = lp[pos] - ratio.log()
    mb["teacher_logp"][pos] = lp[pos] + torch.randn(len(k), generator=g)
    return mb, logits


# --- probes ------------------------------------------------------------------------------------
class Run:
    """One probe evaluation: the fake backend, a Trainer when the probe needs one, cleanup."""

    def __init__(self, demo: Path):
        self.demo, self.workdir = demo, demo / "work"

    def __enter__(self):
        self._ctx = fake_backend(self.workdir)
        self.be = self._ctx.__enter__()
        self.trainer = None
        return self

    def build(self, cfg, engine=None):
        from mopd_megatron.train import Trainer
        self.trainer = Trainer(cfg, engine=engine)
        return self.trainer

    def __exit__(self, *exc):
        try:
            if self.trainer is not None:
                self.trainer.close()
        finally:
            self._ctx.__exit__(*exc)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.workdir)) for p in self.workdir.rglob("*")
                      if p.is_file() and "events.out.tfevents" not in p.name)


def probe_megatron(run: Run, cfg):
    from mopd_megatron.plan.build import student_transformer_config
    tc, _ = student_transformer_config(cfg)
    return {f.name: plain(getattr(tc, f.name)) for f in dataclasses.fields(tc)}


def probe_plan(run: Run, cfg):
    from mopd_megatron.plan.cli import inputs_from_config
    from mopd_megatron.plan.memory import plan_memory
    plan = plan_memory(inputs_from_config(cfg, nodes=8, gpus_per_node=8))
    return {"inputs": plain(plan.inputs), "stage": plan.stage, "terms": plain(plan.terms),
            "notes": plan.notes, "errors": plan.errors}


def probe_launch(run: Run, cfg):
    """The Slurm launcher's two outputs (what slurm/launch.sh evaluates, and the plan it
    prints) for the 70B recipe's allocation: 8 nodes x 8 GPUs."""
    from mopd_megatron.launch import slurm
    recipe = run.workdir / "recipe.yaml"
    recipe.write_text(cfg.dump_yaml())
    out = {}
    for mode in ("--emit-shell", "--dry-run"):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = slurm.main(["--recipe", str(recipe), "--nodes", "8", "--gpus-per-node", "8", mode])
        out[mode] = (rc, stdout.getvalue(), stderr.getvalue())
    if any(rc == 2 for rc, _, _ in out.values()):  # 1 (does not fit) is a plan, 2 a refusal
        raise RuntimeError(f"the launcher refused the recipe: {out}")
    return out


def probe_demo(run: Run, cfg):
    import subprocess

    from mopd_megatron.trainer import cli
    calls = []

    def record(cmd, **kw):
        calls.append({"cmd": [str(c) for c in cmd[1:]], "check": kw.get("check")})

    with mock.patch.object(subprocess, "run", record):
        cli.ensure_demo_inputs(cfg)
    return calls


def probe_runtime(run: Run, cfg):
    t = run.build(cfg)
    return {"calls": run.be.of(kinds=("init_runtime", "set_num_threads")),
            "watchdog_s": t.watchdog.warn_after_s}


def probe_student(run: Run, cfg):
    run.build(cfg)
    return run.be.of("student")


def probe_teachers(run: Run, cfg):
    t = run.build(cfg)
    pool = [(x.name, x.domains, x.vocab_size, x.offload, [_model(c).weights for c in x.chunks])
            for x in t.teachers.teachers]
    return {"built": run.be.of("teachers"), "pool": pool}


def _engine_summary(e):
    if e is None:
        return None
    out = {"type": type(e).__name__}
    for k in ("tp_sizes", "request_timeout_s", "samples_per_request", "seed", "vocab_size",
              "eos_id", "pad_id"):
        if hasattr(e, k):
            out[k] = plain(getattr(e, k))
    if hasattr(e, "clients"):
        out["clients"] = [(c.url, plain(getattr(c, "timeout_s", None))) for c in e.clients]
    if hasattr(e, "_pool"):
        out["workers"] = e._pool._max_workers  # concurrency x servers
    if getattr(e, "servers", None):
        out["startup_timeout_s"] = [s and s.startup_timeout_s for s in e.servers]
    if getattr(e, "router", None) is not None:
        out["router"] = e.router.spec.command()
    return out


def probe_engine(run: Run, cfg):
    t = run.build(cfg)
    eng = t.engines
    return {"launched": run.be.of("engines"), "driver": _engine_summary(eng.driver),
            "node": _engine_summary(eng.node), "placement": plain(eng.placement),
            "collective": t.engine_collective, "needs_sync": t.engine_needs_sync}


def probe_sampling(run: Run, cfg):
    return plain(run.build(cfg).sampling)


def probe_inputs(run: Run, cfg):
    t = run.build(cfg)
    inp = t.inputs
    verifiers = {d: (type(v).__name__, {k: plain(x) for k, x in sorted(vars(v).items()) if k != "pool"})
                 for d, v in inp.rewards.verifiers.items()}
    return {"hf": plain(inp.hf), "tokenizer": inp.tokenizer("abc=")["input_ids"],
            "rows": {d: [(r.prompt_ids, r.fields) for r in rows]
                     for d, rows in inp.dataset.rows_by_domain.items()},
            "bad": inp.dataset.bad_counts(), "verifiers": verifiers,
            "eos_pad": (inp.eos_id, inp.pad_id), "reward_workers": inp.rewards.max_workers}


def probe_logger(run: Run, cfg):
    t = run.build(cfg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for step in range(1, 5):
            t.logger.log(step, {"loss": 0.25 * step, "reward/caesar": 0.5})
    sinks = [type(s).__name__ for s in t.logger.sinks]
    t.logger.close()
    jsonl = {f: [{k: v for k, v in json.loads(line).items() if k != "time"}
                 for line in (run.workdir / f).read_text().splitlines()]
             for f in run.files() if f.endswith(".jsonl")}
    return {"sinks": sinks, "console": out.getvalue(), "files": run.files(), "jsonl": jsonl,
            "wandb": run.be.of(kinds=("wandb_init",))}


def _with_engine(run: Run, cfg):
    engine = RecordingEngine()
    t = run.build(cfg, engine=engine)
    engine.student = _model(t.chunks[0])
    return t, engine


def probe_rollout(run: Run, cfg):
    t, engine = _with_engine(run, cfg)
    batches = [t.rollout() for _ in range(3)]
    t._pool.shutdown(wait=True)
    return {"batches": [([r.prompt_ids for r in b.rows], b.n, len(b.samples)) for b in batches],
            "engine": engine.calls, "draws": t.sampler.draws}


def probe_reward(run: Run, cfg):
    t, _ = _with_engine(run, cfg)
    b = t.reward(_fixed_batch(run.demo, 2, 4, seed=5))
    return {"rewards": plain(b.rewards), "advantages": plain(b.advantages)}


def probe_loss(run: Run, cfg):
    t, _ = _with_engine(run, cfg)
    mb, logits = _loss_inputs(run.demo)
    loss_sum, count, m = t.loss_fn(mb, logits)
    return plain({"loss_sum": loss_sum, "count": count, "metrics": m})


def probe_step(run: Run, cfg):
    t, _ = _with_engine(run, cfg)
    batch = _fixed_batch(run.demo, 32, 4, seed=7)   # 256 sequences
    prep = t.teacher_scores(batch)
    packed = [[(mb["index"], tuple(mb["tokens"].shape), round(float(mb["teacher_logp"].sum()), 4))
               for mb in s] for s in prep.steps]
    results = t.student_update(prep.steps)
    metrics = t.metrics(batch, results, prep, 1.0)
    kl = prep.kl
    metrics = {k: round(v, 6) for k, v in metrics.items()
               if not k.startswith(("time/", "mem/")) and k != "tokens_per_s"}
    return {"packed": packed, "kl": plain(kl), "updates": len(results), "metrics": metrics}


def probe_sync(run: Run, cfg):
    t, engine = _with_engine(run, cfg)
    per_step = []
    for step in range(1, 13):
        try:
            m = t.sync_weights(step)
            per_step.append(sorted((k, round(v, 6)) for k, v in m.items() if k != "sync/seconds"))
        except Exception as e:  # noqa: BLE001 - the parity check refusing is an outcome
            per_step.append(type(e).__name__)
    return {"steps": per_step, "backend": run.be.of(kinds=("export_buckets",)),
            "engine": engine.calls}


def probe_eval(run: Run, cfg):
    t, engine = _with_engine(run, cfg)
    before = t.evaluate(teachers=True)
    periodic = [s for s in range(1, 401) if t.periodic_eval(s)]
    # The student's greedy answers come from the engine (trainer/eval_plan.py), the teachers'
    # from the in-trainer sampler ("greedy").
    return {"before": before, "periodic": periodic, "engine": engine.calls[:1],
            "greedy": run.be.of(kinds=("greedy",))[:3]}


def probe_checkpoint(run: Run, cfg):
    from mopd_megatron.checkpoint import resolve_resume
    t, _ = _with_engine(run, cfg)
    saved = [s for s in range(1, cfg.train.steps + 1) if t.should_save(s) and (t.save(s) or True)]
    resumed = resolve_resume(cfg)   # what a relaunch of this recipe continues from
    t.export_hf()
    return {"saved": saved, "files": [f for f in run.files() if "step_" in f or "latest" in f],
            "resume": str(resumed), "export": run.be.of(kinds=("export_hf",))}


PROBES = {name[len("probe_"):]: fn for name, fn in globals().items() if name.startswith("probe_")}
# The recipes each probe runs on: the Trainer probes need the tiny recipe's one-rank layout,
# the launcher the 70B recipe's cluster one.
RECIPES = {"megatron": ("tiny", "70b"), "plan": ("tiny", "70b"), "launch": ("70b",)}


def run_probe(demo: Path, name: str, cfg):
    """The probe's artifact, or {"raised": ...} when the consumer refused the recipe."""
    with Run(demo) as run:
        try:
            return PROBES[name](run, cfg)
        except Exception as e:  # noqa: BLE001 - compared, and checked by the test
            return {"raised": f"{type(e).__name__}: {e}"}


_BASE: dict = {}


def base_artifact(demo: Path, recipe: str, ctx: tuple, probe: str):
    key = (demo, recipe, ctx, probe)
    if key not in _BASE:
        _BASE[key] = run_probe(demo, probe, load(demo, recipe, ctx))
    return _BASE[key]


def _field_of(override: str) -> str:
    from mopd_megatron.config import parse_override
    key = re.sub(r"\[\d+\]", "[]", parse_override(override.format(d="D"))[0])
    return re.sub(r"^reward\.verifiers\.[^.]+\.", "reward.verifiers.<key>.", key)


# --- the tests ---------------------------------------------------------------------------------
def test_every_field_has_a_proof_of_consumption():
    from mopd_megatron.config import MOPDConfig, field_docs
    paths = [p for p, *_ in field_docs(MOPDConfig, "")]
    tables = [set(PERTURB), set(PLANNER_OR_LAUNCHER_ONLY), set(PINNED)]
    listed = set().union(*tables)
    assert sum(map(len, tables)) == len(listed), "a field is listed in two tables"
    missing = sorted(set(paths) - listed)
    assert not missing, (f"recipe fields with no proof that anything consumes them: {missing}; "
                         "add each to PERTURB (a value and the probe that must change)")
    stale = sorted(listed - set(paths))
    assert not stale, f"tables name fields that no longer exist: {stale}"


@pytest.mark.parametrize("field", sorted(PERTURB))
def test_table_entries_change_their_own_field(field):
    p = PERTURB[field]
    assert p.set and all(_field_of(o) == field for o in p.set), (field, p.set)
    assert not any(_field_of(o) == field for o in p.also)
    assert all(name in PROBES for name in p.probes), p.probes
    assert all(p.recipe in RECIPES.get(name, ("tiny",)) for name in p.probes), (
        f"a probe of {p.probes} does not run on the {p.recipe} recipe")


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probes_are_deterministic(demo, probe):
    """A probe that varied by itself would 'prove' every field; it must not."""
    for recipe in RECIPES.get(probe, ("tiny",)):
        first = base_artifact(demo, recipe, (), probe)
        assert not _is_error(first), f"{probe} fails on the {recipe} recipe: {first['raised']}"
        assert run_probe(demo, probe, load(demo, recipe)) == first


@pytest.mark.parametrize("field", sorted(PERTURB))
def test_field_changes_what_is_built(demo, field):
    p = PERTURB[field]
    changed = load(demo, p.recipe, p.ctx + p.also + p.set)
    # A valid recipe, as the recipe's own checks see it, at the layout it is meant for.
    changed.validate(world_size=BIG_WORLD if p.recipe == "70b" else 1, check_paths=False,
                     check_imports=False)
    control = load(demo, p.recipe, p.ctx + p.also) if p.also else None
    for name in p.probes:
        base = base_artifact(demo, p.recipe, p.ctx, name)
        assert not _is_error(base), f"probe {name} fails on the base recipe: {base['raised']}"
        new = run_probe(demo, name, changed)
        if p.raises is not None:
            assert _is_error(new) and p.raises in new["raised"], (
                f"{field}: expected the consumer to refuse ({p.raises!r}), got {new}")
            continue
        assert not _is_error(new), f"{field}: probe {name} failed: {new['raised']}"
        assert new != base, f"{field}: changing it left the {name} probe unchanged"
        if control is not None:
            ctrl = run_probe(demo, name, control)
            assert new != ctrl, (f"{field}: the {name} probe changed only because of "
                                 f"{p.also}, not because of the field")


@pytest.mark.parametrize("field", sorted(PINNED))
def test_pinned_field_is_refused_and_its_value_reaches_the_engine(demo, field):
    from mopd_megatron.config import ConfigError
    override, attr = PINNED[field]
    with pytest.raises(ConfigError) as e:
        load(demo, "tiny", (override,))
    assert e.value.path == field
    cfg = load(demo, "tiny")
    sampling = base_artifact(demo, "tiny", (), "sampling")   # the Trainer's SamplingParams
    assert sampling[attr] == getattr(cfg.rollout, attr)
