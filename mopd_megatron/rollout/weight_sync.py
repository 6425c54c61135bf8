"""Pushing trainer weights (HF names, streamed in buckets) into running SGLang servers.

Two transports, one bracket:
- colocated (same node/GPUs): each bucket is flattened into one uint8 tensor
  (FlattenedTensorBucket) and sent through /update_weights_from_tensor. The serializer shares
  storage rather than copying bytes over HTTP: CUDA IPC handles on GPU, shared-memory files on
  CPU (see use_file_system_sharing).
- dedicated (engines on other nodes): /init_weights_update_group once, then per bucket the
  trainer broadcasts each tensor from rank 0 of a custom process group (NCCL on GPU, gloo on
  CPU) while the servers' /update_weights_from_distributed receives it.
Both must be bracketed by /begin_weight_update and /end_weight_update on SGLang >= 0.5.23
(HTTP 400 otherwise) and followed by /post_process_weights on older releases; which one a
server speaks is probed once (ServerClient.weight_update_api), never pinned by version.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .client import ServerClient, ServerUnreachable, WeightUpdateAPI
from .engine import NamedTensorBucket

__all__ = ["SyncStats", "weight_update_session", "push_tensor_buckets", "DistributedWeightSync",
           "serialize_bucket", "use_file_system_sharing"]


@dataclass
class SyncStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transport: str = ""     # "shm", "cuda_ipc" or "broadcast"
    # Indices of servers that stopped answering during the push: they missed buckets and hold
    # partial weights, so the caller must restart and load them again.
    lost: tuple[int, ...] = ()


def use_file_system_sharing() -> None:
    """CPU tensors are shared through file descriptors by default, which only works between
    processes that share torch's multiprocessing authkey; the SGLang scheduler does not, and
    crashes unpickling them. The file_system strategy names a shared-memory file instead."""
    import torch.multiprocessing as tmp
    if tmp.get_sharing_strategy() != "file_system":
        tmp.set_sharing_strategy("file_system")


def serialize_bucket(bucket: NamedTensorBucket) -> tuple[str, torch.Tensor]:
    """One bucket -> (the base64 string SGLang's load_format="flattened_bucket" expects, the
    flattened tensor it points to).

    The string names shared storage (a shared-memory file on CPU, a CUDA IPC handle on GPU),
    not the bytes: keep the tensor referenced until every server has loaded the string. Freed
    after the first server's load, the second server failed to open it ("unable to open shared
    memory object", two CPU servers)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if not bucket:
        raise ValueError("serialize_bucket: empty bucket (the exporter yielded no tensors)")
    if any(t.device.type == "cpu" for _, t in bucket):
        use_file_system_sharing()
    # The flattened bucket packs raw bytes without padding and the receiver views each slice as
    # its dtype, which needs the slice offset to be a multiple of the element size: a 7-element
    # bf16 tensor followed by an fp32 one would land at an odd offset and fail to load.
    # Widest elements first keeps every offset aligned (sizes are powers of two); the server
    # loads by name, so the order is free.
    ordered = sorted(bucket, key=lambda nt: -nt[1].element_size())
    flat = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in ordered])
    tensor = flat.get_flattened_tensor()
    payload = {"flattened_tensor": tensor, "metadata": flat.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True), tensor


@contextlib.contextmanager
def weight_update_session(clients: Sequence[ServerClient], api: str):
    """Open the server-side update session (0.5.23+) or finish with post-processing (older).
    A push that fails (a server died, even while the sessions were being opened) still closes
    the session on every server it opened it on: the next push must be able to open one."""
    opened: list[ServerClient] = []
    try:
        if api == WeightUpdateAPI.BEGIN_END:
            for c in clients:
                c.post_ok("/begin_weight_update", {})
                opened.append(c)
        yield
    except BaseException:
        for c in opened:
            with contextlib.suppress(Exception):  # the original error is the one to see
                c.post("/end_weight_update", {}, 60)
        raise
    if api == WeightUpdateAPI.BEGIN_END:
        for c in clients:
            c.post_ok("/end_weight_update", {})
    elif api == WeightUpdateAPI.POST_PROCESS:
        for c in clients:
            c.post_ok("/post_process_weights", {})


# handles(bucket) -> (per server: one serialized handle per server TP rank, release): where the
# servers' TP ranks map the bucket from; release() runs once every server has loaded it.
Handles = Callable[[NamedTensorBucket], tuple[list[list[str]], Callable[[], None]]]


def push_tensor_buckets(clients: Sequence[ServerClient], tp_sizes: Sequence[int],
                        buckets: Iterable[NamedTensorBucket], version: str, api: str,
                        pause_mode: str = "retract", handles: Handles | None = None) -> SyncStats:
    """Same-node sync: pause, load every bucket into every server, resume.

    By default this process serializes each bucket once and every TP rank of every server maps
    that one copy (each takes its own shard). ``handles`` overrides where each server TP rank
    maps it from (trainer/sync.py: the copy on that rank's own GPU). Buckets are consumed one
    at a time, so at most one bucket of extra memory is alive on the trainer side.

    A server that stops answering is dropped for the rest of the push (listed in
    ``SyncStats.lost``) and every bucket is still consumed: ``handles`` runs collectives over
    the node's ranks, which must all see the same number of buckets, or they would hang.
    """
    stats, t0 = SyncStats(), time.perf_counter()
    live = list(range(len(clients)))

    def each(path: str, body: dict, ok: bool = True) -> None:
        for i in list(live):
            try:
                (clients[i].post_ok if ok else clients[i].post)(path, body)
            except ServerUnreachable:
                live.remove(i)

    each("/pause_generation", {"mode": pause_mode}, ok=False)
    try:
        if api == WeightUpdateAPI.BEGIN_END:
            each("/begin_weight_update", {})
        for bucket in buckets:
            if handles is None:
                blob, shared = serialize_bucket(bucket)
                per_server, release = [[blob] * tp for tp in tp_sizes], (lambda: None)
            else:
                per_server, release = handles(bucket)
            for i in list(live):
                body = {"serialized_named_tensors": per_server[i],
                        "load_format": "flattened_bucket",
                        "flush_cache": True,  # stale KV from old weights must not be reused
                        "weight_version": version}
                try:
                    clients[i].post_ok("/update_weights_from_tensor", body)
                except ServerUnreachable:
                    live.remove(i)
            release()  # every server copied out of the shared storage: free it
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if not stats.transport:
                stats.transport = "cuda_ipc" if any(t.is_cuda for _, t in bucket) else "shm"
        if api == WeightUpdateAPI.BEGIN_END:
            each("/end_weight_update", {})
        elif api == WeightUpdateAPI.POST_PROCESS:
            each("/post_process_weights", {})
    finally:
        each("/continue_generation", {}, ok=False)
    stats.lost = tuple(i for i in range(len(clients)) if i not in live)
    stats.seconds = time.perf_counter() - t0
    return stats


class DistributedWeightSync:
    """Dedicated-node sync through a process group shared by the trainer (rank 0) and every
    server TP rank (ranks 1..). Call connect() once, push() after each step, close() at end."""

    def __init__(self, clients: Sequence[ServerClient], tp_sizes: Sequence[int],
                 master_address: str, master_port: int, backend: str | None = None,
                 group_name: str = "mopd_weight_sync", timeout_s: float = 600.0):
        self.clients, self.tp_sizes = list(clients), list(tp_sizes)
        self.master_address, self.master_port = master_address, master_port
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_name, self.timeout_s = group_name, timeout_s
        self.world_size = 1 + sum(self.tp_sizes)
        self._group = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def connect(self) -> None:
        from sglang.srt.utils import init_custom_process_group

        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.clients))]
        bodies = [dict(master_address=self.master_address, master_port=self.master_port,
                       rank_offset=off, world_size=self.world_size, group_name=self.group_name,
                       backend=self.backend) for off in offsets]
        # The servers' calls block in the rendezvous until the trainer joins: run them aside.
        threads = _call_all(self.clients, "/init_weights_update_group", bodies, self.timeout_s)
        # The trainer hosts the group's store itself. Through init_method=tcp://, a trainer
        # started by torchrun (TORCHELASTIC_USE_AGENT_STORE=True) would join torchrun's agent
        # store as a client instead of serving this one, and the servers would wait forever.
        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = torch.distributed.TCPStore(self.master_address, self.master_port,
                                           self.world_size, is_master=True, timeout=timeout)
        self._group = init_custom_process_group(
            backend=self.backend, store=torch.distributed.PrefixStore(self.group_name, store),
            world_size=self.world_size, rank=0, group_name=self.group_name, timeout=timeout)
        self._store = store
        _join_all(threads)

    def push(self, buckets: Iterable[NamedTensorBucket], version: str, api: str) -> SyncStats:
        if self._group is None:
            raise RuntimeError("DistributedWeightSync.push before connect()")
        stats, t0 = SyncStats(transport="broadcast"), time.perf_counter()
        with weight_update_session(self.clients, api):
            for bucket in buckets:
                body = {"names": [n for n, _ in bucket],
                        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket],
                        "group_name": self.group_name, "flush_cache": True,
                        "weight_version": version}
                threads = _call_all(self.clients, "/update_weights_from_distributed",
                                    [body] * len(self.clients), self.timeout_s)
                # Servers receive in `names` order: broadcast in the same order.
                for _, tensor in bucket:
                    torch.distributed.broadcast(tensor.detach().to(self.device).contiguous(),
                                                src=0, group=self._group)
                _join_all(threads)
                stats.buckets += 1
                stats.tensors += len(bucket)
                stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        stats.seconds = time.perf_counter() - t0
        return stats

    def close(self) -> None:
        if self._group is None:
            return
        for c in self.clients:
            try:
                c.post("/destroy_weights_update_group", {"group_name": self.group_name}, 60)
            except Exception:  # noqa: BLE001 - a dead server has no group left to destroy
                pass
        torch.distributed.destroy_process_group(self._group)
        self._group = None


class _Call(threading.Thread):
    def __init__(self, client: ServerClient, path: str, body: dict, timeout_s: float):
        super().__init__(daemon=True)
        self.client, self.path, self.body, self.timeout_s = client, path, body, timeout_s
        self.error: BaseException | None = None

    def run(self):
        try:
            self.client.post_ok(self.path, self.body, self.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc


def _call_all(clients, path, bodies, timeout_s) -> list[_Call]:
    threads = [_Call(c, path, b, timeout_s) for c, b in zip(clients, bodies)]
    for t in threads:
        t.start()
    return threads


def _join_all(threads: list[_Call]) -> None:
    for t in threads:
        t.join()
    errors = [t.error for t in threads if t.error is not None]
    if errors:
        raise errors[0]
