"""Where colocated SGLang engines run: one function for ``--dry-run`` and for the run.

Every training node n runs ``engines_per_node`` engines on its own GPUs (engine i on GPUs
[i * tp, (i + 1) * tp) of the node, SGLang TP within the node), started by the node's local
rank 0; ports are ``base_port + n * engines_per_node + i``, distinct across nodes so that
several emulated nodes can share one host. ``format_placement`` is what both print.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineSlot", "NodePlacement", "engines_per_node", "colocated_placement",
           "format_placement"]


@dataclass(frozen=True)
class EngineSlot:
    node: int
    index: int                  # engine index on its node
    port: int
    gpus: tuple[int, ...]       # node-local GPU ids; () on CPU
    local_ranks: tuple[int, ...]  # node-local trainer ranks whose GPUs it shares (its TP ranks)


@dataclass(frozen=True)
class NodePlacement:
    node: int
    ranks: tuple[int, ...]      # global trainer ranks on the node
    engines: tuple[EngineSlot, ...]


def engines_per_node(rollout, gpus_per_node: int) -> int:
    if rollout.engines_per_node is not None:
        return rollout.engines_per_node
    return max(1, gpus_per_node // rollout.server_tp_size) if gpus_per_node > 0 else 1


def colocated_placement(rollout, nodes: int, ranks_per_node: int,
                        gpus_per_node: int) -> list[NodePlacement]:
    """The engines of ``rollout.mode=colocated`` on ``nodes`` training nodes. Ranks are
    numbered node-major (node n holds ranks n * ranks_per_node ...), as torchrun and srun do."""
    k, tp = engines_per_node(rollout, gpus_per_node), rollout.server_tp_size
    if gpus_per_node > 0 and k * tp > gpus_per_node:
        raise ValueError(f"rollout.engines_per_node={k} x rollout.server_tp_size={tp} needs "
                         f"{k * tp} GPUs per node; the nodes have {gpus_per_node}")
    out = []
    for n in range(nodes):
        slots = []
        for i in range(k):
            gpus = tuple(range(i * tp, (i + 1) * tp)) if gpus_per_node > 0 else ()
            local = tuple(r for r in range(i * tp, (i + 1) * tp) if r < ranks_per_node) or (0,)
            slots.append(EngineSlot(n, i, rollout.base_port + n * k + i, gpus, local))
        out.append(NodePlacement(n, tuple(range(n * ranks_per_node, (n + 1) * ranks_per_node)),
                                 tuple(slots)))
    return out


def _span(xs) -> str:
    xs = list(xs)
    return f"{xs[0]}-{xs[-1]}" if len(xs) > 1 else str(xs[0])


def format_placement(placement: list[NodePlacement]) -> list[str]:
    """One line per node: its ranks, and each engine's port and GPUs."""
    lines = []
    for p in placement:
        engines = ", ".join(f"engine {e.index} on port {e.port} "
                            + (f"(GPUs {_span(e.gpus)})" if e.gpus else "(CPU)")
                            for e in p.engines)
        lines.append(f"node {p.node}: ranks {_span(p.ranks)}; {engines}")
    return lines
