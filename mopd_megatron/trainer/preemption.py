"""Stopping cleanly when the scheduler asks: preemption, the end of the time limit, scancel.

Slurm sends SIGTERM before it kills a preempted or cancelled job (KillWait later, SIGKILL), and
``#SBATCH --signal=B:USR1@<seconds>`` sends SIGUSR1 to the batch script that long before the
time limit; slurm/launch.sh forwards it to the training step. Either signal only sets a flag
here: a rank cannot stop alone in the middle of a collective. After each step every rank takes
part in one all-reduce of the flag, so all of them stop after the same step, save a committed
checkpoint, shut their engines down and exit with REQUEUE_EXIT, which slurm/launch.sh turns
into ``scontrol requeue``; ``checkpoint.resume: auto`` continues the requeued job from there.

A second signal while stopping restores the default action and re-sends it: the operator
meant "now".
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

__all__ = ["REQUEUE_EXIT", "TERMINATED_EXIT", "Preempted", "StopSignals"]

# EX_TEMPFAIL: "temporary failure, try again"; slurm/launch.sh requeues the job on it.
REQUEUE_EXIT = 75
# What a process killed by SIGTERM reports: stopped, nothing saved to continue from.
TERMINATED_EXIT = 143
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised out of Trainer.train after a signal: the step it stopped after, whether a
    checkpoint of that step is committed, and the signal's name."""

    def __init__(self, step: int, saved: bool, signame: str):
        super().__init__(f"stopped by {signame} after step {step} "
                         + ("(checkpoint committed)" if saved else "(no checkpoint.dir: nothing saved)"))
        self.step, self.saved, self.signame = step, saved, signame

    @property
    def exit_code(self) -> int:
        return REQUEUE_EXIT if self.saved else TERMINATED_EXIT


class StopSignals:
    """The handlers for SIGTERM and SIGUSR1 of one rank (see the module docstring)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers need it
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"rank {os.environ.get('RANK', '0')}: got {signal.Signals(signum).name}; "
              "finishing the step, then saving and stopping", file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal any rank got (0: none), on every rank. Collective: call it on all ranks
        at the same point of the loop."""
        if not dist.is_initialized():
            return self.signum
        from ..runtime import device
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device())  # NCCL: on GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
