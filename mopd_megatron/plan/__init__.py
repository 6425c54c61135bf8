"""Memory planner: per-GPU memory of a recipe on a cluster layout (``mopd plan``)."""
from .arch import ArchSpec, PlanError, resolve_arch
from .memory import GIB, Plan, PlanInputs, TeacherSpec, Term, plan_memory

__all__ = ["ArchSpec", "PlanError", "resolve_arch", "GIB", "Plan", "PlanInputs", "TeacherSpec",
           "Term", "plan_memory"]
