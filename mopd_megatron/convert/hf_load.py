"""HF safetensors directory -> this rank's already-built Megatron chunks, directly.

Every rank fills its own parameters from the files: for each of them the architecture table
gives the HF tensor(s), and the mapping's ``shard`` (the function the offline converter writes
whole tensors with) reads only this rank's rows or columns (``safe_open``/``get_slice``). No
collective, no rank waits on another, nothing is written anywhere.

The result is bitwise what the offline path gives (convert to torch_dist in the parameters'
dtype, then load that): same mapping code, same casts (``tests/test_direct_hf_load.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.builder import MAKE_VOCAB_SIZE_DIVISIBLE_BY, padded_vocab_size
from ..models.hf_config import HFModelConfig, load_hf_config
from .export import TIED_HEAD, local_parameters
from .hf_to_megatron import open_checked
from .mappings import WHOLE, ConversionError, Split
from .tables import context, items

EMBEDDING = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class LoadStats:
    tensors: int      # parameters this rank filled
    bytes_read: int   # from the safetensors files (this rank's shards, not the model)


def _split(p: torch.nn.Parameter, tp_rank: int, tp: int) -> Split:
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return WHOLE
    return Split(p.partition_dim, tp_rank, tp)


def load_hf_weights(chunks: list, hf_dir: str, hf_cfg: HFModelConfig | None = None) -> LoadStats:
    """Fill this rank's ``chunks`` (in the layout of Megatron's parallel state) from the HF
    checkpoint ``hf_dir``. ``hf_cfg``: the architecture the chunks were built from (default:
    ``hf_dir``'s config.json). Every parameter is overwritten; a parameter the table does not
    know, or a shard whose shape differs from the parameter's, is an error."""
    from megatron.core import parallel_state as ps
    cfg = hf_cfg if hf_cfg is not None else load_hf_config(hf_dir)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ckpt = open_checked(hf_dir, cfg)
    # The vocabulary padding the model was built with (models/builder.py), not the file's.
    ctx = context(cfg, padded_vocab_size(cfg.vocab_size, MAKE_VOCAB_SIZE_DIVISIBLE_BY, tp))
    table = {(it.key, it.layer): it for it in items(cfg)}
    if cfg.tie_word_embeddings:  # the last stage's copy of the embedding (PP > 1)
        table[(TIED_HEAD, None)] = table[(EMBEDDING, None)]
    local = local_parameters(chunks)
    unknown = sorted(f"{k}[{i}]" for k, i in set(local) - set(table))
    if unknown:
        raise ConversionError(f"model parameters not in the {cfg.architecture} table: {unknown}")
    with torch.no_grad():
        for key, p in local.items():
            it = table[key]
            t = it.row.mapping.shard(ckpt.source(it.hf_names), ctx, _split(p, tp_rank, tp))
            if tuple(t.shape) != tuple(p.shape):
                raise ConversionError(f"{it}: {hf_dir} gives this rank a shard of shape "
                                      f"{tuple(t.shape)}, the model's parameter is "
                                      f"{tuple(p.shape)}")
            p.copy_(t)  # casts to the parameter's dtype, as loading a converted checkpoint does
    return LoadStats(len(local), ckpt.bytes_read)
