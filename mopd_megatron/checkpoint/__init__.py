"""Checkpoints, one module per job:

- ``steps``: atomic ``step_<N>`` directories under a root, the ``latest`` pointer and pruning,
  so that a crash at any instant leaves the previous checkpoint complete and selected;
- ``dist_ckpt``: Megatron dist-checkpoint (torch_dist) save/load of model chunks and optimizer
  state, reshardable to another TP/PP/DP on load;
- ``state``: what a training run's checkpoint holds (weights and optimizer, RNG, trainer
  state), saving and loading it, and which checkpoint a run resumes from.

Offline reading of a torch_dist checkpoint, one tensor chunk at a time, is the converter's
(convert/dcp_io.py).
"""
from . import dist_ckpt
from .state import load_checkpoint, resolve_resume, save_checkpoint
from .steps import LATEST, MARKER, find_latest, prune, read_marker, save_atomic, step_of

__all__ = ["dist_ckpt", "save_checkpoint", "load_checkpoint", "resolve_resume", "MARKER",
           "LATEST", "save_atomic", "find_latest", "prune", "step_of", "read_marker"]
