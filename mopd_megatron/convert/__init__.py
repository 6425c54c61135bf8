"""HF <-> Megatron conversion driven by one table per architecture (see ``tables``).

- ``convert_hf_to_megatron``: HF safetensors -> torch_dist checkpoint (streaming).
- ``load_hf_weights``: HF safetensors -> this rank's built model chunks (its shards only).
- ``convert_megatron_to_hf``: torch_dist checkpoint -> HF safetensors (streaming).
- ``export_hf_weights``: live TP/PP-sharded model -> HF-named buckets for weight sync.
"""
from .export import export_hf_weights
from .hf_load import load_hf_weights
from .hf_to_megatron import convert_hf_to_megatron
from .mappings import ConversionError
from .megatron_to_hf import convert_megatron_to_hf
from .tables import TABLES

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "export_hf_weights",
           "load_hf_weights", "ConversionError", "TABLES"]
