"""Shared pieces of the GPU suite's checks. Importing this module imports no torch."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 2 ** 30

# Peak HBM bandwidth in TB/s from NVIDIA's datasheets, matched on the device name (first
# match wins, so the more specific names come first). Anything else is "unknown": a guessed
# peak would make the kernel's fraction of it a made-up figure.
HBM_PEAK_TBPS = (
    ("H200", 4.8),          # H200 SXM and H200 NVL
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),         # H100 SXM ("NVIDIA H100 80GB HBM3")
)

# Everything the single-GPU checks override in a cluster recipe so that it builds on one GPU.
SINGLE_GPU = ("parallel.tp=1", "parallel.pp=1", "parallel.vpp=null",
              "parallel.sequence_parallel=false", "rollout.server_tp_size=1")


class Skip(Exception):
    """The check cannot run on this machine (missing package, GPU too old): SKIPPED."""


class CheckFailed(Exception):
    """The check ran and a figure is outside its stated tolerance: FAILED."""


def hbm_peak_tbps(device_name: str) -> float | None:
    for key, tbps in HBM_PEAK_TBPS:
        if key in device_name:
            return tbps
    return None


class Recorder:
    """The check's figures, written to ``path`` on every change, so that a check stopped at its
    time budget still leaves what it measured (and the process groups of the servers it
    started, which the driver then stops)."""

    def __init__(self, path: str | None, budget_s: float | None = None):
        self.path, self.figures, self.pgids = path, {}, []
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def set(self, key: str, value) -> None:
        self.figures[key] = value
        self.flush()

    def update(self, values: dict) -> None:
        self.figures.update(values)
        self.flush()

    def add_pgid(self, pgid: int | None) -> None:
        if pgid:
            self.pgids.append(int(pgid))
            self.flush()

    def flush(self, **extra) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"figures": self.figures, "pgids": self.pgids, **extra}, fh, indent=1,
                      default=str)
        os.replace(tmp, self.path)


def load_file(name: str, relpath: str):
    """A module of the checkout by its path (benchmarks/bench_loss.py, tools/make_tiny_hf.py):
    by package name, an installed ``tools`` or ``benchmarks`` package could shadow it."""
    import importlib.util
    import sys
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def require(module: str, what: str) -> None:
    """Import ``module`` or SKIP the check, naming what it is for."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install (CUDA mismatch) is also "absent"
        raise Skip(f"{what} needs {module}, which does not import here "
                   f"({type(e).__name__}: {str(e)[:200]}); install with `pip install -e .[gpu]`"
                   ) from None


def require_cuda():
    import torch
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 1234):
    """This process as a one-rank job (NCCL on the GPU), through the trainer's own start-up
    (runtime.init_runtime): torch.distributed plus Megatron's parallel state."""
    require("megatron.core", "this check")
    for k in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        os.environ.pop(k)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from mopd_megatron.runtime import init_runtime
    return init_runtime(tp=tp, pp=pp, vpp=None, seed=seed)


def recipe_config(recipe: str, overrides=()):
    """A cluster recipe with the single-GPU layout (and ``overrides``) applied, as ``mopd
    train --set`` would; paths are not checked (the model files are not here)."""
    from mopd_megatron.config import load_recipe
    return load_recipe(ROOT / recipe, [*SINGLE_GPU, *overrides])


def scaled_hf(cfg, **shape):
    """The recipe's student architecture (its config.json, or the planner's known config of
    the same name) with HF fields replaced, e.g. num_hidden_layers=4: a small model of the
    same family (attention layout, norms, rope) that fits one GPU next to the others."""
    from mopd_megatron.models.hf_config import hf_config_dict, load_hf_config
    from mopd_megatron.plan.arch import resolve_hf_config
    hf, source = resolve_hf_config(cfg.model.hf_config, "student")
    raw = hf_config_dict(hf)
    raw.update(shape)
    return load_hf_config(raw), source


def shape_of(hf) -> dict:
    keys = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "kv_channels", "vocab_size", "qk_layernorm", "qkv_bias",
            "tie_word_embeddings")
    return {k: getattr(hf, k) for k in keys}


def write_hf_config(hf, directory: str) -> str:
    from mopd_megatron.models.hf_config import hf_config_dict
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf_config_dict(hf), fh, indent=1)
    return directory


def copy_parameters(src_chunks, dst_chunks) -> int:
    """dst <- src under the layout-free names the converter uses (convert/export.py), which
    are the same for the TE and the local layer spec (the local spec maps its separate norms
    onto TE's fused-module names). Both must hold exactly the same parameters."""
    import torch

    from mopd_megatron.convert.export import local_parameters
    src, dst = local_parameters(src_chunks), local_parameters(dst_chunks)
    if set(src) != set(dst):
        raise CheckFailed(f"the two builds hold different parameters: only in the source "
                          f"{sorted(set(src) - set(dst))[:6]}, only in the destination "
                          f"{sorted(set(dst) - set(src))[:6]}")
    with torch.no_grad():
        for k, p in dst.items():
            if p.shape != src[k].shape:
                raise CheckFailed(f"{k}: shape {tuple(src[k].shape)} vs {tuple(p.shape)}")
            p.copy_(src[k])
    return len(dst)


def cpu_state(chunks) -> dict:
    from mopd_megatron.convert.export import local_parameters
    return {k: p.detach().to("cpu", copy=True) for k, p in local_parameters(chunks).items()}


def load_state(chunks, state: dict) -> None:
    import torch

    from mopd_megatron.convert.export import local_parameters
    with torch.no_grad():
        for k, p in local_parameters(chunks).items():
            p.copy_(state[k])


def release_cuda() -> None:
    """Give freed blocks back so that the next build (or the next check) starts clean."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def device_used_bytes() -> int:
    """Memory in use on the whole device (every process: SGLang servers too), settled: the
    value read twice 0.5 s apart without change, or after 5 s."""
    import torch
    last, deadline = None, time.monotonic() + 5.0
    while True:
        free, total = torch.cuda.mem_get_info()
        used = total - free
        if used == last or time.monotonic() > deadline:
            return used
        last = used
        time.sleep(0.5)


def fmt_gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def dataclass_dict(x) -> dict:
    return {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
            for k, v in dataclasses.asdict(x).items()}
