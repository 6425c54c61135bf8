"""Start-up checks of the recipe against the models' own configs, made before anything is built:
the layout Megatron must split each model into, and the context every sequence must fit.

Without them a bad ``parallel.tp`` surfaces as Megatron tracebacks on every rank after the
model build starts, and a too-long ``data.max_prompt_len + rollout.max_new_tokens`` as an HTTP
400 from SGLang mid-run, once a prompt that long is drawn.

Each model's config is resolved as the planner does (plan/arch.py::resolve_hf_config: its
``config.json``, else the known config of the directory's name), so ``--dry-run`` checks a
cluster recipe on a machine without its files. A config that cannot be read is reported by the
checks that read it (preflight's path and config checks), not again here.
"""
from __future__ import annotations

import re

from ..config import ConfigError, MOPDConfig
from ..models.hf_config import HFModelConfig, layout_problems
from ..plan.arch import PlanError, resolve_hf_config

__all__ = ["model_problems"]


def _models(cfg: MOPDConfig) -> list[tuple[str, HFModelConfig, str]]:
    """(what, config, source) of the student and every teacher whose config resolves; a
    teacher sharing a config file with a model before it is that model (one report, not
    three)."""
    out, seen = [], set()
    wanted = [("student", cfg.model.hf_config)]
    wanted += [(f"teacher {t.name} (teachers[{i}])", t.hf_config) for i, t in enumerate(cfg.teachers)]
    for what, hf_dir in wanted:
        try:
            hf, source = resolve_hf_config(hf_dir, what)
        except (PlanError, OSError, ValueError):
            continue
        if source not in seen:
            seen.add(source)
            out.append((what, hf, source))
    return out


def _server_context_length(args: list[str]) -> int | None:
    """--context-length of rollout.server_args: the launched servers' limit when it is set."""
    for i, a in enumerate(args):
        m = re.fullmatch(r"--context-length(?:=(\d+))?", a)
        if m:
            value = m.group(1) or (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else None
    return None


def model_problems(cfg: MOPDConfig) -> list[ConfigError]:
    """Every mismatch between the recipe and the models, each naming the field to change."""
    out: list[ConfigError] = []
    par = cfg.parallel
    longest = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    span = (f"data.max_prompt_len + rollout.max_new_tokens = {cfg.data.max_prompt_len} + "
            f"{cfg.rollout.max_new_tokens} = {longest} tokens")
    for what, hf, source in _models(cfg):
        for knob, value, reason in layout_problems(hf, par.tp, par.pp, par.vpp, what, source):
            out.append(ConfigError(f"parallel.{knob}", value, reason))
        # Every sequence (prompt + response) goes through the student and its teacher.
        if longest > hf.max_position_embeddings:
            out.append(ConfigError(
                "rollout.max_new_tokens", cfg.rollout.max_new_tokens,
                f"{span} exceed the {what}'s context of {hf.max_position_embeddings} tokens "
                f"(max_position_embeddings, {source}); lower one of them"))
    ctx = _server_context_length(cfg.rollout.server_args)
    if cfg.rollout.engine == "sglang" and ctx is not None and longest > ctx:
        out.append(ConfigError("rollout.max_new_tokens", cfg.rollout.max_new_tokens,
                               f"{span} exceed the SGLang servers' --context-length {ctx} "
                               "(rollout.server_args); lower one of them"))
    return out
