"""Peak memory of each phase of a step (``mem/<phase>_max_gib``), and, once, the memory
planner's prediction beside it.

CUDA: the caching allocator's peak, reset as each phase starts: ``mem/<phase>_max_gib`` is the
most allocated by tensors, ``mem/<phase>_reserved_max_gib`` the most the allocator held (what
an out-of-memory error counts). Memory of other processes (SGLang servers) is not in either.

CPU: the process's peak resident set (VmHWM), reset as each phase starts by writing 5 to
/proc/self/clear_refs (Linux). Where that reset is refused, VmHWM (or getrusage's ru_maxrss)
can only grow, and ``mem/<phase>_max_gib`` is the peak of the process up to the end of the
phase (the step-1 report says which of the two a run measures).
"""
from __future__ import annotations

import re
import resource
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["PhaseMemory", "memory_report", "GIB"]

GIB = 2 ** 30


def _vm_hwm() -> int | None:
    """Peak resident set of this process in bytes (VmHWM), or None without /proc."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    hwm = _vm_hwm()
    # ru_maxrss is in kB on Linux; it is the lifetime peak and cannot be reset.
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMemory:
    """``with mem("teacher"): ...`` records that phase's peak; ``pop()`` returns the step's
    ``mem/`` metrics (the largest of a phase run more than once) and starts the next step."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.resettable = True if self.cuda else _reset_vm_hwm()
        self._peaks: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self.resettable = _reset_vm_hwm()
        try:
            yield
        finally:
            if self.cuda:
                self._keep(f"mem/{name}_max_gib", torch.cuda.max_memory_allocated() / GIB)
                self._keep(f"mem/{name}_reserved_max_gib", torch.cuda.max_memory_reserved() / GIB)
            else:
                self._keep(f"mem/{name}_max_gib", host_peak_bytes() / GIB)

    def _keep(self, key: str, gib: float) -> None:
        self._peaks[key] = max(gib, self._peaks.get(key, 0.0))

    def pop(self) -> dict[str, float]:
        out, self._peaks = self._peaks, {}
        return out


# Which planner phase (plan/memory.py: terms of phase "all" are always resident) a measured
# trainer phase corresponds to.
PLAN_PHASE = {"student": "train", "teacher": "score"}


def memory_report(cfg, layout, measured: dict[str, float], meter: PhaseMemory, step: int) -> str:
    """The planner's terms for this rank's pipeline stage beside the phases' measured peaks."""
    from ..plan.arch import PlanError
    from ..plan.cli import engine_nodes, inputs_from_config
    from ..plan.memory import stage_terms, with_changes
    cuda, stage = meter.cuda, layout.pp_rank
    head = (f"memory at step {step}, rank {layout.rank} (pipeline stage {stage + 1} of "
            f"{layout.pp}): planned per GPU (mopd plan) and measured")
    lines = [head]
    try:
        per_node = layout.local_world_size
        card = (torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
                if cuda else 80.0)
        x = inputs_from_config(cfg, nodes=layout.nodes + engine_nodes(cfg, per_node),
                               gpus_per_node=per_node, gpu_mem_gib=card)
        x = with_changes(x, train_gpus=layout.world_size)  # the trainer's own ranks
        terms = stage_terms(x, stage)
    except (PlanError, ValueError, OSError) as e:
        lines.append(f"  plan unavailable: {e}")
        terms = []
    for t in terms:
        lines.append(f"  plan  {t.name:36s} {t.phase:8s} {t.bytes / GIB:9.3f} GiB  {t.note}")
    resident = sum(t.bytes for t in terms if t.phase == "all")
    what = "max allocated" if cuda else "host RSS peak"
    for key in [k for k in measured if k.endswith("_max_gib") and "_reserved_" not in k]:
        phase = key[len("mem/"):-len("_max_gib")]
        planned = resident + sum(t.bytes for t in terms if t.phase == PLAN_PHASE.get(phase))
        extra = (f", reserved {measured[f'mem/{phase}_reserved_max_gib']:.3f} GiB"
                 if f"mem/{phase}_reserved_max_gib" in measured else "")
        plan_txt = f"plan {planned / GIB:9.3f} GiB" if terms else "plan         -"
        lines.append(f"  phase {phase:8s} {plan_txt}   measured {what} {measured[key]:.3f} GiB"
                     f"{extra}")
    if not cuda:
        lines.append("  note: the plan is GPU memory of a CUDA run; on CPU the measurement is the "
                     "whole process's resident memory (Python, torch, tokenizer, data), so the "
                     "two are not comparable; " + (
                         "the peak is reset as each phase starts" if meter.resettable else
                         "/proc/self/clear_refs is refused here, so each phase's figure is the "
                         "process's peak so far"))
    return "\n".join(lines)
