"""Run a function on N real processes (gloo on CPU), collect each rank's return value.

Every multi-rank test uses this: each scenario gets fresh processes (Megatron's parallel state
is per process), its own free port and a timeout, and a failure on any rank fails the test with
that rank's traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import torch
        torch.set_num_threads(1)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensors into the message. The queue's own pickler would share
        # their storage by file descriptor, which the parent can only open while this process
        # lives: a rank that exited first made the parent fail (FileNotFoundError, CI 0.19 lane).
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be a module-level function (it is pickled by reference). Returns the list of
    per-rank return values (which must be picklable), ordered by rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, val = results.get(timeout=timeout)
                val = pickle.loads(val) if ok else val
            except queue.Empty:
                alive = [i for i, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"ranks {alive} did not finish within {timeout:.0f}s") from None
            if ok:
                out[rank] = val
            else:
                errors.append(f"--- rank {rank} ---\n{val}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]


def count_all_reduces(dist) -> list[tuple]:
    """Wrap ``dist.all_reduce`` in this rank's process to record each call's tensor shape (the
    ops tests pin how many collectives a kernel takes); the list fills as calls happen."""
    calls = []
    real = dist.all_reduce

    def counting(tensor, *a, **k):
        calls.append(tuple(tensor.shape))
        return real(tensor, *a, **k)

    dist.all_reduce = counting
    return calls
