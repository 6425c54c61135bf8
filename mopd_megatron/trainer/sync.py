"""Weight sync to server engines (SGLang) after each update, and the parity probe metric.

The converter (``mopd_megatron.convert.export_hf_weights``) gathers this rank's Megatron shards
into HF-named buckets; every rank iterates the export (it is collective over TP/PP), rank 0
pushes the buckets. Afterwards a fixed probe sequence (the first prompt of the data) is scored by
the engine and by the trainer: the mean |difference| (nats/token) is logged as ``rollout/parity_mean_abs`` and a value
above ``rollout.parity_tolerance`` stops the run (every importance weight would be wrong).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["push_weights", "trainer_probe_logprobs"]


def trainer_probe_logprobs(trainer, tokens: list[int]) -> list[float]:
    """log pi_theta(x_{t+1} | x_<=t), t = 0..L-2, through the forward-only schedule (any
    layout); the result is broadcast from the last pipeline stage to every rank."""
    from megatron.core import parallel_state as ps

    from ..teachers import _score_loss_fn
    from ..training.schedule import forward_backward
    t = torch.tensor([tokens], dtype=torch.long, device=trainer.device)
    mb = dict(tokens=t, position_ids=torch.arange(t.shape[1], device=t.device)[None],
              targets=torch.roll(t, -1, 1))
    out = forward_backward(trainer.chunks, [mb], _score_loss_fn(trainer._tp_group()),
                           vocab_size=trainer.inputs.hf.vocab_size, forward_only=True)
    vals = out[0]["logp"][0, :-1].double().cpu() if out else torch.zeros(len(tokens) - 1, dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage holds the values: sum with zeros from the other stages.
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            vals.zero_()
        dist.all_reduce(vals, group=ps.get_pipeline_model_parallel_group())
    return vals.tolist()


def push_weights(trainer, step: int, probe: list[int] | None) -> float | None:
    """``probe``: a fixed real token sequence (a prompt of the data), the same on every rank;
    random ids could include special tokens a server treats differently. None: push only."""
    from ..rollout import check_parity
    try:
        from ..convert import export_hf_weights
    except ImportError as e:
        raise RuntimeError(f"weight sync to the rollout engine needs mopd_megatron.convert ({e}); "
                           "use rollout.engine=local on a machine without it") from None
    cfg, rank0 = trainer.cfg, dist.get_rank() == 0
    buckets = export_hf_weights(trainer.chunks, trainer.inputs.hf, cfg.rollout.weight_sync_bucket_mib)
    if rank0:
        trainer.engine.update_weights(buckets, f"step_{step}")
    else:
        for _ in buckets:  # take part in the export's collectives
            pass
    if probe is None:
        return None
    ours = trainer_probe_logprobs(trainer, probe)
    result = [None]
    if rank0:
        try:
            result[0] = check_parity(trainer.engine, [probe], [ours],
                                     cfg.rollout.parity_tolerance).mean_abs_diff
        except Exception:
            body = {"input_ids": probe, "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
            out, _ = trainer.engine.call("/generate", body, f"probe-debug-{step}")
            got = [e[1] for e in out["meta_info"]["input_token_logprobs"]]
            raise RuntimeError(f"parity probe at step {step}: sent {probe}, the server scored {got}")
    dist.broadcast_object_list(result, src=0)
    return result[0]
