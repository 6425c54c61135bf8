"""mopd-megatron: Multi-Teacher On-Policy Distillation on Megatron-core.

Importing the package imports no GPU-only library (Transformer Engine, Apex, SGLang).
"""

__version__ = "0.1.0"
