"""Weight sync to server engines (SGLang) after each update, and the parity probe.

The converter (``mopd_megatron.convert.export_hf_weights``) gathers this rank's Megatron shards
into HF-named buckets; every rank iterates the export (it is collective over TP/PP) and ends up
holding every full tensor. Then:

- colocated engines (``Engines.placement`` set): each node's ranks load their own node's
  engines and no other. Every rank serializes its copy of the bucket (a CUDA-IPC handle to its
  own GPU, or a shared-memory file on CPU), the node's local rank 0 gathers the handles over
  the node group and gives SGLang TP rank i the handle of the copy on that rank's own GPU
  (slime's design). Nothing crosses a node, and no rank funnels another node's weights.
- dedicated/external engines: global rank 0 loads them (same-node shared storage, or the
  weight-update group when connected).

Afterwards a fixed probe sequence (the first prompt of the data) is scored by every engine
and by the trainer: the worst mean |difference| (nats/token) is logged as
``rollout/parity_mean_abs`` and a value above ``rollout.parity_tolerance`` stops the run
(every importance weight would be wrong).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from ..runtime import broadcast_object

__all__ = ["push_weights", "trainer_probe_logprobs"]

log = logging.getLogger(__name__)


def trainer_probe_logprobs(chunks: list, layout, vocab_size: int, tokens: list[int]) -> list[float]:
    """log pi_theta(x_{t+1} | x_<=t), t = 0..L-2, at temperature 1, through the forward-only
    schedule (any layout); the result is broadcast from the last pipeline stage to every rank."""
    from ..runtime import device
    from ..teachers import score_loss_fn
    from ..mcore.schedule import forward_backward
    t = torch.tensor([tokens], dtype=torch.long, device=device())
    mb = dict(tokens=t, position_ids=torch.arange(t.shape[1], device=t.device)[None],
              targets=torch.roll(t, -1, 1))
    out = forward_backward(chunks, [mb], score_loss_fn(layout.tp_group_or_none),
                           vocab_size=vocab_size, tp_rank=layout.tp_rank, forward_only=True)
    # On the device: with NCCL the collective below takes no CPU tensor.
    vals = out[0]["logp"][0, :-1].double() if out else \
        torch.zeros(len(tokens) - 1, dtype=torch.float64, device=device())
    if layout.pp > 1:
        # Only the last stage holds the values: sum with zeros from the other stages.
        if not layout.is_last_stage:
            vals.zero_()
        dist.all_reduce(vals, group=layout.pp_group)
    return vals.tolist()


# A sync during which an engine restarts is pushed again; more restarts in a row than this
# mean the engine cannot stay up, and the run stops with the parity error it would cause.
MAX_RESYNCS = 2


def push_weights(engines, chunks: list, hf, layout, rollout, step: int,
                 probe: list[int] | None) -> dict[str, float]:
    """Push the live weights into the engines, then probe parity; the sync metrics.

    ``engines``: builders.Engines; ``rollout``: the rollout section (bucket size, parity
    tolerance). ``probe``: a fixed real token sequence (a prompt of the data), the same on
    every rank; random ids could include special tokens a server treats differently. None:
    push only.

    An engine restarted while this runs (by its node's watchdog, or here after it stopped
    answering mid-push) came back with the weights it was launched with, or with only some
    buckets. Every rank learns of it (one all-reduce) and the whole export and push run again,
    so that the step never samples from a half-loaded engine or fails its parity probe."""
    for attempt in range(MAX_RESYNCS + 1):
        before = _restarts(engines)
        t0 = time.perf_counter()
        loads, lost = _push_once(engines, chunks, hf, layout, rollout, step)
        metrics: dict[str, float] = {}
        if layout.rank == 0:
            metrics = _sync_metrics(engines.driver, loads, time.perf_counter() - t0)
        parity = None
        if probe is not None:
            ours = trainer_probe_logprobs(chunks, layout, hf.vocab_size, probe)
            if layout.rank == 0:
                parity = _probe_every_engine(engines.driver, probe, ours,
                                             rollout.parity_tolerance, step)
        again = torch.tensor([float(lost or _restarts(engines) != before)], device=_device())
        dist.all_reduce(again, op=dist.ReduceOp.MAX)
        if again.item() == 0:
            break
        if attempt == MAX_RESYNCS:
            raise RuntimeError(
                f"step {step}: the weight sync did not reach every engine in "
                f"{MAX_RESYNCS + 1} attempts (an engine kept dying or stopped answering "
                "mid-push); see the warnings above and the servers' logs")
        if layout.rank == 0:
            log.warning("step %d: an engine restarted or missed buckets during the weight "
                        "sync; pushing again", step)
    metrics["sync/attempts"] = float(attempt + 1)
    if probe is not None:
        parity = broadcast_object(parity)
        if isinstance(parity, Exception):
            raise parity
        metrics.update(parity)
    return metrics


def _device():
    from ..runtime import device
    return device()  # NCCL collectives take device tensors


def _restarts(engines) -> int:
    return sum(getattr(e, "restart_count", 0) for e in (engines.node, engines.driver)
               if e is not None)


def _push_once(engines, chunks, hf, layout, rollout, step: int) -> tuple[list, bool]:
    """One export and push: per rank (rank, transport, [(engine url, bytes)]) of its loads,
    and whether an engine this rank loaded missed buckets."""
    from ..convert import export_hf_weights
    version = f"step_{step}"
    buckets = export_hf_weights(chunks, hf, layout, rollout.weight_sync_bucket_mib)
    if engines.placement is not None:
        stats = _push_node_local(engines, buckets, layout, version)
    elif layout.rank == 0:
        stats = engines.node.update_weights(buckets, version)
    else:
        for _ in buckets:  # take part in the export's collectives
            pass
        stats = None
    # Who loaded which engine, for the metrics (and the multi-node tests that check them).
    mine = ([(c.url, stats.bytes) for c in engines.node.clients]
            if stats is not None and engines.node is not None else [])
    loads = [None] * layout.world_size
    dist.all_gather_object(loads, (layout.rank, stats.transport if stats else None, mine))
    return loads, bool(stats is not None and stats.lost)


def _push_node_local(engines, buckets, layout, version: str):
    """Colocated: this node's ranks load this node's engines (see the module docstring)."""
    from ..rollout.weight_sync import serialize_bucket
    leader, group, src = layout.local_rank == 0, layout.node_group, layout.node_leader
    if not leader:
        for bucket in buckets:
            blob, shared = serialize_bucket(bucket)  # noqa: F841 - alive until loaded
            dist.gather_object(blob, None, dst=src, group=group)
            dist.barrier(group=group)
        return None
    slots = engines.placement[layout.node_rank].engines

    def handles(bucket):
        blob, shared = serialize_bucket(bucket)
        blobs = [None] * layout.local_world_size
        dist.gather_object(blob, blobs, dst=src, group=group)
        # SGLang TP rank i of an engine maps the copy of the trainer rank on its own GPU; a CPU
        # engine with more TP ranks than the node has trainer ranks maps the leader's copy.
        per_server = [[blobs[r] for r in s.local_ranks] if len(s.local_ranks) == tp else [blob] * tp
                      for s, tp in zip(slots, engines.node.tp_sizes)]

        def release():
            nonlocal shared
            dist.barrier(group=group)  # every server of the node has loaded: all may free
            shared = None
        return per_server, release
    return engines.node.update_weights(buckets, version, handles=handles)


def _sync_metrics(driver, loads, seconds: float) -> dict[str, float]:
    index = {c.url: i for i, c in enumerate(driver.clients)}
    m: dict[str, float] = {"sync/seconds": seconds, "sync/bytes": 0.0}
    for rank, transport, pushed in loads:
        for url, nbytes in pushed:
            m[f"sync/loader_rank/engine{index[url]}"] = float(rank)
            m[f"sync/bytes/engine{index[url]}"] = float(nbytes)
            m["sync/bytes"] += nbytes
            key = f"sync/transport/{transport}"
            m[key] = m.get(key, 0.0) + nbytes
    return m


def _probe_every_engine(driver, probe: list[int], ours: list[float], tolerance: float,
                        step: int) -> dict[str, float] | Exception:
    """Every engine's parity metrics, or the error of the first engine that failed (returned,
    not raised: push_weights first asks every rank whether an engine restarted meanwhile)."""
    from ..rollout import ParityError, check_parity
    out: dict[str, float] = {}
    for i, client in enumerate(driver.clients):
        try:
            r = check_parity(_OneServer(driver, i), [probe], [ours], tolerance,
                             where=f" on {client.url} at step {step}")
        except ParityError as e:
            return e
        except Exception as e:  # noqa: BLE001 - returned: a restart may explain it
            return RuntimeError(f"parity probe at step {step} on {client.url}: {e}")
        out[f"rollout/parity_mean_abs/engine{i}"] = r.mean_abs_diff
    out["rollout/parity_mean_abs"] = max(out.values())
    return out


class _OneServer:
    """``engine.score`` pinned to one server of the fleet."""

    def __init__(self, engine, index: int):
        self.engine, self.index = engine, index

    def score(self, sequences):
        return self.engine.score(sequences, server=self.index)
