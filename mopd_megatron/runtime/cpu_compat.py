"""Lets megatron-core run on a CPU-only torch build (tests, CI, the embedded CPU demo).

megatron-core assumes CUDA in a handful of places. Rather than editing ~40 call sites, every
``megatron.core.*`` module gets a ``torch`` global whose CUDA entry points resolve to CPU
equivalents (the "torch view"); a few further patches cover what a module-global swap cannot
reach. ``apply()`` is the single entry point, it is called by ``runtime.init_runtime`` and does
nothing when CUDA is available, so GPU runs execute megatron-core unmodified.

Each patch names the megatron-core calls it covers. ``MOPD_CPU_COMPAT_SKIP=name,name`` switches
patches off (the tests use it to show that each one is needed).

Patches
-------
torch_view            megatron.core modules see ``torch.cuda.current_device()`` -> "cpu"
                      (RotaryEmbedding.__init__, _ParamAndGradBuffer.__init__, dist-checkpoint
                      loading), ``torch.cuda.synchronize()`` -> no-op (p2p_communication,
                      parallel_state.initialize_model_parallel, timers, dist-checkpoint
                      finalize), ``torch.cuda.{get,set}_rng_state/manual_seed`` -> CPU generator
                      (CudaRNGStatesTracker.add/fork), ``torch.cuda.{current_stream,Stream,Event,
                      stream}`` -> null objects (param/grad buffer comm streams in >= 0.17), and
                      tensor factories called with ``device="cuda"`` -> CPU
                      (_ParamAndGradBuffer warm-up tensor, schedules' loss bookkeeping).
rng_state_funcs       tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state index
                      ``torch.cuda.default_generators`` (empty on a CPU build) -> CPU generator.
                      Covers model_parallel_cuda_manual_seed and activation recompute.
tensor_cuda_noop      ``Tensor.cuda()`` -> identity (LanguageModule tied embeddings with PP>1,
                      tensor_parallel.broadcast_data, optimizer state loading).
tensor_type_string    ``Tensor.type()`` reports CPU tensors as 'torch.cuda.*' because the
                      optimizers assert legacy type strings (clip_grads, Float16Optimizer,
                      DistributedOptimizer param grouping).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import os
import sys
import types

import torch

_REAL_TORCH = torch
APPLIED: list[str] = []

# Imported eagerly so their `torch` global is swapped before any of them runs; modules imported
# later are covered by the import hook.
_EAGER_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.utils",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")


def _skipped() -> set[str]:
    return set(filter(None, os.environ.get("MOPD_CPU_COMPAT_SKIP", "").split(",")))


def _cpu(device):
    """Map a CUDA device (string, torch.device or ordinal) to the CPU; leave others alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cuda" else device


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver
        return factory(*args, **kwargs)
    return wrapper


class _NullEvent:
    """torch.cuda.Event on CPU: every operation is already complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    """torch.cuda.Stream on CPU: work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


def _torch_view() -> types.ModuleType:
    """A module that is `torch` except for the CUDA entry points listed in the module doc."""
    cuda = types.ModuleType("torch.cuda")
    cuda.__dict__.update(torch.cuda.__dict__)
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = cuda.current_stream
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.manual_seed_all = cuda.manual_seed

    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    view.__getattr__ = lambda name: getattr(_REAL_TORCH, name)  # attributes torch adds lazily
    view.cuda = cuda
    for name in _FACTORIES:
        setattr(view, name, _on_cpu(getattr(torch, name)))
    return view


class _ViewImportHook:
    """sys.meta_path finder: once a megatron.core module has executed, swap its `torch` global
    for the view, so modules megatron imports lazily are covered too."""

    def __init__(self, view):
        self.view = view

    def find_spec(self, name, path, target=None):
        if not name.startswith("megatron.core"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, view = spec.loader.exec_module, self.view

        def exec_and_swap(module):
            exec_module(module)
            if getattr(module, "torch", None) is _REAL_TORCH:
                module.torch = view

        spec.loader.exec_module = exec_and_swap
        return spec


def _patch_torch_view():
    view = _torch_view()
    sys.meta_path.insert(0, _ViewImportHook(view))
    for name in _EAGER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # module moved in another megatron-core release
            pass
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is _REAL_TORCH:
            module.torch = view


def _patch_rng_state_funcs():
    from megatron.core.tensor_parallel import random as mrandom
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


def _patch_tensor_cuda_noop():
    # On a CPU build Tensor.cuda() can only raise, so the identity changes no working program.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_tensor_type_string():
    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = real_type(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


PATCHES = {
    "torch_view": _patch_torch_view,
    "rng_state_funcs": _patch_rng_state_funcs,
    "tensor_cuda_noop": _patch_tensor_cuda_noop,
    "tensor_type_string": _patch_tensor_type_string,
}


def apply() -> list[str]:
    """Apply every patch once per process; inert when CUDA is available. Returns the names."""
    if torch.cuda.is_available():
        return []
    skip = _skipped()
    for name, patch in PATCHES.items():
        if name not in skip and name not in APPLIED:
            patch()
            APPLIED.append(name)
    return list(APPLIED)
