"""Fixes for megatron-core's torch.optim.AdamW fallback (no Transformer Engine, no Apex).

Not CPU-specific: any machine without TE/Apex fused Adam runs DistributedOptimizer on top of
torch's AdamW, whose per-parameter ``step`` tensor megatron-core 0.16 mishandles in three
places. Applied once, from ``mcore.optimizer.build_optimizer``, and only when
``HAVE_APEX_OR_TE`` is false.

fresh_state  DistributedOptimizer.state_dict() asserts that every parameter has one ``step``;
             a freshly built optimizer (the resume path) has none. Initialise the state with
             megatron's own zero-gradient dummy step before a loading state dict is built.
step_key     The fully-reshardable load path hands per-parameter tensors without ``step`` to
             ``_set_main_param_and_optimizer_states`` (KeyError: 'step'). Keep the current one.
step_alias   load_state_dict gives every parameter the *same* ``step`` tensor object; torch's
             AdamW increments it in place once per parameter, so after a resume the bias
             correction uses step + n_params. Give each parameter its own copy.
"""
from __future__ import annotations

import torch

APPLIED: list[str] = []


def _fresh_state(cls):
    real = cls.sharded_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        return real(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    cls.sharded_state_dict = sharded_state_dict


def _step_key(cls):
    real = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return real(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states


def _step_alias(cls):
    real = cls.load_state_dict

    def load_state_dict(self, state_dict):
        out = real(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return out

    cls.load_state_dict = load_state_dict


FIXES = {"fresh_state": _fresh_state, "step_key": _step_key, "step_alias": _step_alias}


def apply() -> list[str]:
    from megatron.core.optimizer import distrib_optimizer
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return []
    for name, fix in FIXES.items():
        if name not in APPLIED:
            fix(distrib_optimizer.DistributedOptimizer)
            APPLIED.append(name)
    return list(APPLIED)
