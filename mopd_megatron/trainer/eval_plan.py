"""Which held-out eval a recipe runs: one answer for the trainer (Trainer.evaluate follows it)
and for both dry-runs (``mopd train --dry-run``, ``slurm/launch.sh --dry-run``), so what a
dry-run says is what the run does. Reads the config only (no torch: the launcher imports it).

- The student: greedy on the rollout engine (KV-cached, any training layout), or in the
  trainer (no KV cache, pp = 1) when the trainer samples itself (rollout.engine=local, whose
  engine *is* that in-trainer sampler).
- The teachers, before training only: they are Megatron models in the trainer and no engine
  serves them (rollout.ServedTeacher scores sequences, it does not generate, and no recipe field
  starts one), so their answers come from the in-trainer sampler, which needs pp = 1. Under
  pipeline parallelism their accuracy is not measured, and the plan says so.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EvalPlan", "eval_plan"]


@dataclass(frozen=True)
class EvalPlan:
    paths: tuple[str, ...]        # data.eval_paths; empty: no eval at all
    interval: int                 # train.eval_interval; 0: before and after training only
    on_engine: bool               # the student's answers come from the rollout engine
    engine: str                   # rollout.engine
    max_new_tokens: int           # rollout.max_new_tokens, as the rollouts
    teachers_skipped: str | None  # why teacher accuracy is not measured; None: it is

    @property
    def enabled(self) -> bool:
        return bool(self.paths)

    def describe(self) -> str:
        """One line, after the dry-run's label."""
        if not self.enabled:
            return "none (data.eval_paths is empty)"
        where = (f"on the rollout engine ({self.engine})" if self.on_engine else
                 "in the trainer (rollout.engine=local: no KV cache, pp = 1)")
        when = (f"every {self.interval} steps and before/after training" if self.interval else
                "before/after training (train.eval_interval 0)")
        teachers = (f"teachers: not measured ({self.teachers_skipped})" if self.teachers_skipped
                    else "teachers: in the trainer, before training, on their own domains")
        return (f"greedy student (temperature 0, max_new_tokens {self.max_new_tokens}) {where}, "
                f"{when}, prompts from data.eval_paths [{', '.join(self.paths)}]; {teachers}")


def eval_plan(cfg) -> EvalPlan:
    pp = cfg.parallel.pp
    skipped = None if pp == 1 else (
        f"parallel.pp={pp}: teachers are decoded in the trainer, which needs pp = 1, and the "
        "rollout engine serves only the student")
    return EvalPlan(tuple(cfg.data.eval_paths), cfg.train.eval_interval,
                    on_engine=cfg.rollout.engine != "local", engine=cfg.rollout.engine,
                    max_new_tokens=cfg.rollout.max_new_tokens, teachers_skipped=skipped)
