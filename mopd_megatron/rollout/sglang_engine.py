"""RolloutEngine on SGLang servers: launched by the job or already running, optionally behind
sglang-router, with bounded-concurrency generation, fault recovery and weight sync.

Fault model: a request that gets no answer (connection refused/reset, timeout) makes the
engine check that server. If the process is gone or /health_generate fails and the engine
launched it, the server is restarted on the same address (once, however many requests saw the
failure) and every unfinished request is resubmitted. Requests that the server answered with
an error are not retried: that is a bug or bad input, not a crash.

Samples go one per request by default; with samples_per_request = k > 1 they go in batched
requests of up to k samples (SGLang's list form of /generate, one rid per sample; not behind
sglang-router, which takes one rid per request). That is what a small model on CPU needs: there
the HTTP and tokenizer-manager overhead per request costs more than the forward. A batched
request fails or succeeds as a whole and is resubmitted as a whole.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from .client import ServerClient, ServerError, ServerUnreachable
from .engine import NamedTensorBucket, RolloutEngine, Sample, SamplingParams
from .server import RouterSpec, ServerSpec, SGLangRouter, SGLangServer, wait_healthy
from .weight_sync import DistributedWeightSync, Handles, SyncStats, push_tensor_buckets

__all__ = ["SGLangEngine", "RolloutError", "server_specs_from_config"]

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    pass


class SGLangEngine(RolloutEngine):
    """See module docstring. Build with launch(), connect() or from_config()."""

    def __init__(self, urls: Sequence[str], servers: Sequence[SGLangServer | None] = (),
                 router: SGLangRouter | None = None, tp_sizes: Sequence[int] | None = None,
                 concurrency: int = 64, request_timeout_s: float = 600.0, max_retries: int = 3,
                 health_timeout_s: float = 30.0, pause_mode: str = "retract",
                 samples_per_request: int = 1):
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        if samples_per_request < 1:
            raise ValueError(f"samples_per_request must be >= 1, got {samples_per_request}")
        if samples_per_request > 1 and router is not None:
            raise ValueError(f"samples_per_request={samples_per_request} needs direct server "
                             "URLs: sglang-router takes one rid per request, not a batch")
        self.samples_per_request = samples_per_request
        self.clients = [ServerClient(u, request_timeout_s) for u in urls]
        self.servers = list(servers) or [None] * len(urls)   # None: not ours to restart
        self.router = router
        self.router_client = ServerClient(router.url, request_timeout_s) if router else None
        self.tp_sizes = list(tp_sizes or [1] * len(urls))
        self.request_timeout_s, self.max_retries = request_timeout_s, max_retries
        self.health_timeout_s, self.pause_mode = health_timeout_s, pause_mode
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(urls),
                                        thread_name_prefix="sglang-rollout")
        self._abort = threading.Event()
        self._stopping = threading.Event()
        self._released: dict[int, int] = {}  # server index -> epoch it was released in
        # Servers someone else restarts (colocated engines on other nodes, restarted by their
        # node's watchdog): how long to wait for one to answer again before giving up.
        self.restart_wait_s = 0.0
        self._locks = [threading.Lock() for _ in urls]
        self._epochs = [0] * len(urls)      # bumped on each restart of server i
        self._rr = itertools.count()
        self.samples_served = [0] * len(urls)   # per server, over the engine's life
        self._api: str | None = None
        self._dist_sync: DistributedWeightSync | None = None
        self._group_stale = False
        self.version = "default"
        # Called with nothing, returns fresh buckets of the current trainer weights; used to
        # bring a restarted server (which reloads model_path from disk) back to self.version.
        self.weight_source: Callable[[], Iterable[NamedTensorBucket]] | None = None
        self.restarts = 0

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def launch(cls, specs: Sequence[ServerSpec], router_port: int | None = None,
               startup_timeout_s: float = 600.0, log_dir: str | None = None,
               **kwargs) -> "SGLangEngine":
        """Start the servers (in parallel), and a router in front when router_port is given."""
        servers = [SGLangServer(s, startup_timeout_s) for s in specs]
        router = None
        try:
            for s in servers:
                s.start(wait=False)
            for s in servers:
                s.wait_ready()
            if router_port is not None:
                router = SGLangRouter(RouterSpec(
                    tuple(s.url for s in servers), router_port, host=specs[0].host,
                    log_path=os.path.join(log_dir, "router.log") if log_dir else None)).start()
        except BaseException:
            for s in servers:
                s.stop()
            raise
        return cls([s.url for s in servers], servers, router, [s.tp_size for s in specs],
                   **kwargs)

    @classmethod
    def connect(cls, urls: Sequence[str], **kwargs) -> "SGLangEngine":
        """Use servers someone else runs (never restarted by us)."""
        return cls(list(urls), **kwargs)

    @classmethod
    def from_config(cls, cfg, model_path: str, log_dir: str | None = None,
                    device: str = "auto", extra_args: Sequence[str] = ()) -> "SGLangEngine":
        """From a RolloutConfig (mopd_megatron.config): external URLs or launched servers."""
        common = dict(concurrency=cfg.concurrency, request_timeout_s=cfg.request_timeout_s,
                      samples_per_request=cfg.samples_per_request)
        if cfg.external_urls:  # external, or dedicated engines the launcher started
            # The launcher starts dedicated engines beside the trainer: a large model takes
            # minutes to load, and the weight-update group needs every server up.
            for url in cfg.external_urls:
                log.info("waiting for %s (up to %.0f s)", url, cfg.startup_timeout_s)
                wait_healthy(url, cfg.startup_timeout_s)
            engine = cls.connect(cfg.external_urls, **common)
            if cfg.mode == "dedicated":  # the launcher's engine task restarts its server
                engine.restart_wait_s = cfg.startup_timeout_s
            return engine
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        specs = server_specs_from_config(cfg, model_path, log_dir, device, extra_args)
        return cls.launch(specs, cfg.router_port if cfg.router else None,
                          cfg.startup_timeout_s, log_dir, **common)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        self._abort.clear()
        batch = uuid.uuid4().hex[:12]
        # A prompt's n samples go to one server (its prefix is cached there once); prompts go
        # to the server with the fewest tokens assigned so far (prompt + n x max_new_tokens).
        per_server: list[list] = [[] for _ in self.clients]
        load = [0] * len(self.clients)
        for pi, p in enumerate(prompts_token_ids):
            idx = 0 if self.router_client else min(range(len(load)), key=load.__getitem__)
            load[idx] += len(p) + n * sampling.max_new_tokens
            per_server[idx] += [(list(p), pi, si, f"{batch}-{pi}-{si}") for si in range(n)]
        k = self.samples_per_request
        futures = [self._pool.submit(self._generate_chunk, items[i:i + k], sampling, idx)
                   for idx, items in enumerate(per_server) for i in range(0, len(items), k)]
        out = [s for f in futures for s in f.result()]
        for idx, items in enumerate(per_server):
            self.samples_served[idx] += len(items)
        return sorted(out, key=lambda s: (s.prompt_index, s.sample_index))

    def _generate_chunk(self, items: list[tuple[list[int], int, int, str]],
                        sampling: SamplingParams, server: int | None = None) -> list[Sample]:
        """One request for these samples: the plain form for one, the list form for several."""
        if self._abort.is_set():
            return [Sample(pi, si, p, [], [], "abort", self.version) for p, pi, si, _ in items]
        prompts, rids = [p for p, *_ in items], [rid for *_, rid in items]
        single = len(items) == 1
        body = {"input_ids": prompts[0] if single else prompts,
                "sampling_params": sampling.to_sglang(), "return_logprob": True}
        out, retries = self.call("/generate", body, rids[0] if single else rids, server)
        out = [out] if single else out
        if not isinstance(out, list) or len(out) != len(items):
            raise RolloutError(f"/generate: a batch of {len(items)} samples got "
                               f"{len(out) if isinstance(out, list) else type(out).__name__} "
                               "answers")
        samples = [_parse_sample(o, pi, si, p, retries) for o, (p, pi, si, _) in zip(out, items)]
        if server is not None:
            for s in samples:
                s.meta["server"] = server  # which engine of the fleet generated it
        return samples

    def score(self, sequences: Sequence[Sequence[int]],
              server: int | None = None) -> list[list[float]]:
        """log p(x_t | x_<t) for t = 1..L-1 of each sequence (prompt log-probs, no sampling),
        on server index ``server`` (None: any).

        Computed from the raw logits (temperature 1): the quantity the trainer computes.
        """
        def one(seq, i):
            body = {"input_ids": list(seq), "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
            out, _ = self.call("/generate", body, f"score-{uuid.uuid4().hex[:12]}-{i}", server)
            entries = out["meta_info"]["input_token_logprobs"]
            if len(entries) != len(seq) or [e[1] for e in entries] != list(seq):
                raise RolloutError(f"score: server returned log-probs for {len(entries)} tokens "
                                   f"of a {len(seq)}-token sequence, or for other token ids "
                                   f"(sent {list(seq)}, got {[e[1] for e in entries]})")
            return [float(e[0]) for e in entries[1:]]   # first token has no context: None
        futures = [self._pool.submit(one, s, i) for i, s in enumerate(sequences)]
        return [f.result() for f in futures]

    def call(self, path: str, body: dict, rid: str | list[str],
             server: int | None = None) -> tuple[dict | list, int]:
        """POST body (with rid, or one rid per sample of a batched body) to server index
        ``server`` (None: round robin), recovering from dead servers; (answer, retries)."""
        name = rid if isinstance(rid, str) else f"{rid[0]}..({len(rid)} samples)"
        for attempt in range(self.max_retries + 1):
            idx = next(self._rr) % len(self.clients) if server is None else server
            client = self.router_client or self.clients[idx]
            epoch = self._epochs[idx]
            try:
                # rids must be unique across resubmissions
                sent_rid = rid if attempt == 0 else (
                    f"{rid}-r{attempt}" if isinstance(rid, str)
                    else [f"{r}-r{attempt}" for r in rid])
                return client.post(path, {**body, "rid": sent_rid}), attempt
            except ServerUnreachable as exc:
                if self._abort.is_set():
                    raise RolloutError(f"{path} {name}: aborted while unreachable") from exc
                log.warning("request %s got no answer from %s: %s", name, client.url, exc)
                targets = range(len(self.clients)) if self.router_client else [idx]
                for i in targets:
                    self._recover(i, self._epochs[i] if self.router_client else epoch)
        raise RolloutError(f"{path} {name}: no answer after {self.max_retries} resubmissions")

    def _recover(self, idx: int, seen_epoch: int) -> None:
        """Make server idx usable again; one restart however many requests hit the failure."""
        with self._locks[idx]:
            if self._epochs[idx] != seen_epoch:
                return  # another request already restarted it
            server, client = self.servers[idx], self.clients[idx]
            dead = server is not None and not server.alive()
            if not dead and client.healthy(self.health_timeout_s):
                return  # transient (e.g. one slow request); resubmit as is
            if server is None:
                if self.restart_wait_s > 0 and self._wait_answering(client):
                    log.warning("%s answers again (restarted where it runs)", client.url)
                    self._epochs[idx] += 1
                    # A fresh process is in no weight-update group: re-create the group with
                    # every server before the next push (not here: others may be generating).
                    self._group_stale = self._dist_sync is not None
                    return
                raise RolloutError(f"server {client.url} is down and was not launched by this "
                                   "job's process, so it cannot be restarted here")
            log.warning("restarting SGLang server %s (process %s)", client.url,
                        "dead" if dead else "unresponsive")
            server.restart()
            self.restarts += 1
            self._group_stale = self._dist_sync is not None
            self._resync_restarted(idx)
            self._epochs[idx] += 1

    def _wait_answering(self, client: ServerClient) -> bool:
        deadline = time.monotonic() + self.restart_wait_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            if client.healthy(self.health_timeout_s):
                return True
            time.sleep(1.0)
        return False

    def watch(self, interval_s: float = 2.0) -> None:
        """Restart, from a background thread, every launched server whose process died. The
        node that runs a colocated engine restarts it: the driver on node 0 cannot, and waits
        for it (restart_wait_s)."""
        def loop():
            while not self._stopping.wait(interval_s):
                for idx, server in enumerate(self.servers):
                    if server is not None and not server.alive() and not self._stopping.is_set():
                        try:
                            self._recover(idx, self._epochs[idx])
                        except Exception:  # noqa: BLE001 - the next request reports it
                            log.exception("restarting %s failed", self.clients[idx].url)
        threading.Thread(target=loop, daemon=True, name="sglang-watchdog").start()

    def _resync_restarted(self, idx: int) -> None:
        # A fresh server holds model_path's weights. Without a weight source it samples from
        # the initial policy until the next sync: its samples carry weight_version "default"
        # and their own log mu, so the IS weight pi_theta/mu is still the right ratio.
        if self.version == "default":
            return
        if self.weight_source is None:
            log.warning("restarted %s has the initial weights until the next sync (version %s "
                        "elsewhere)", self.clients[idx].url, self.version)
            return
        push_tensor_buckets([self.clients[idx]], [self.tp_sizes[idx]], self.weight_source(),
                            self.version, self.weight_update_api(), self.pause_mode)

    def abort(self, rids: Sequence[str] | None = None) -> None:
        """Abort everything in flight (rids=None) or the given request ids, on every server."""
        if rids is None:
            self._abort.set()
        bodies = [{"abort_all": True}] if rids is None else [{"rid": r} for r in rids]
        for c in self.clients:
            for b in bodies:
                try:
                    c.post("/abort_request", b, timeout_s=30)
                except (ServerUnreachable, ServerError) as exc:
                    log.warning("abort on %s failed: %s", c.url, exc)

    # -- weights and memory ---------------------------------------------------------------
    def weight_update_api(self) -> str:
        if self._api is None:
            self._api = self.clients[0].weight_update_api()
        return self._api

    def connect_weight_group(self, master_address: str, master_port: int,
                             backend: str | None = None) -> None:
        """Switch update_weights to the dedicated-node path (process-group broadcast)."""
        self._dist_sync = DistributedWeightSync(self.clients, self.tp_sizes, master_address,
                                                master_port, backend,
                                                timeout_s=self.request_timeout_s)
        self._dist_sync.connect()
        self._group_stale = False

    def disconnect_weight_group(self) -> None:
        """Back to the colocated tensor path; destroys the process group on both sides."""
        if self._dist_sync is not None:
            self._dist_sync.close()
            self._dist_sync = None

    def _reconnect_weight_group(self) -> None:
        """A new group with every server (one of them restarted since the last), on a fresh
        port: the old group's store may still be held by the old one's peers."""
        from ..runtime import free_port
        old = self._dist_sync
        old.close()
        port = free_port()
        log.warning("re-creating the weight-update group with %d servers on %s:%d",
                    len(self.clients), old.master_address, port)
        self.connect_weight_group(old.master_address, port, old.backend)

    @property
    def restart_count(self) -> int:
        """How many times a server of this engine came back from the dead (restarted here, or
        seen answering again after its own node restarted it). A change across a weight sync
        means some server may hold partial or initial weights."""
        return sum(self._epochs)

    def update_weights(self, named_tensor_buckets: Iterable[NamedTensorBucket],
                       version: str, handles: Handles | None = None) -> SyncStats:
        """Load the buckets into every server: over the weight-update group when connected,
        else through same-node shared storage (``handles``: see push_tensor_buckets).

        A server that dies during the push is restarted before this returns, with the
        weights it was launched with; the caller sees ``restart_count`` change and pushes
        again (trainer/sync.py), since the buckets are produced collectively and cannot be
        replayed by this rank alone."""
        self._revive_dead()
        api = self.weight_update_api()
        epochs = list(self._epochs)
        if self._dist_sync is not None:
            stats = self._push_over_group(iter(named_tensor_buckets), version, api)
        else:
            stats = push_tensor_buckets(self.clients, self.tp_sizes, named_tensor_buckets,
                                        version, api, self.pause_mode, handles)
        for i in stats.lost:
            log.warning("%s missed buckets of the weight push (%s)",
                        self.clients[i].url, version)
            self._recover(i, epochs[i])
        self.version = version
        return stats

    def _push_over_group(self, buckets, version: str, api: str) -> SyncStats:
        if self._group_stale:
            self._reconnect_weight_group()
        try:
            return self._dist_sync.push(buckets, version, api)
        except (ServerUnreachable, RuntimeError) as exc:
            # A server died mid-broadcast (gloo/NCCL error or no answer). The rest of the
            # buckets still come from collectives every trainer rank takes part in: drain them.
            log.warning("weight push over the update group failed: %s", exc)
            for _ in buckets:
                pass
            self._group_stale = True
            return SyncStats(transport="broadcast", lost=tuple(range(len(self.clients))))

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {} if tags is None else {"tags": list(tags)}
        self._revive_dead()
        for i in range(len(self.clients)):
            # A server restarted on the way holds fresh memory: release that one instead.
            self._post_recovering(i, "/release_memory_occupation", body, retry=True)
            self._released[i] = self._epochs[i]

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-occupy what release_memory freed; a server restarted since never released."""
        body = {} if tags is None else {"tags": list(tags)}
        self._revive_dead()
        for i in range(len(self.clients)):
            if self._released.pop(i, None) == self._epochs[i]:
                self._post_recovering(i, "/resume_memory_occupation", body, retry=False)

    def _post_recovering(self, idx: int, path: str, body: dict, retry: bool) -> None:
        """POST to one server; if it does not answer, restart it (or wait for its node to) and,
        with ``retry``, post again to the new process."""
        epoch = self._epochs[idx]
        try:
            self.clients[idx].post(path, body)
        except ServerUnreachable as exc:
            log.warning("%s: %s", path, exc)
            self._recover(idx, epoch)
            if retry:
                self.clients[idx].post(path, body)

    def _revive_dead(self) -> None:
        """Restart launched servers whose process is gone, before calls that cannot retry."""
        for idx, server in enumerate(self.servers):
            if server is not None and not server.alive():
                self._recover(idx, self._epochs[idx])

    def health(self) -> dict[str, bool]:
        out = {}
        for c, s in zip(self.clients, self.servers):
            out[c.url] = (s is None or s.alive()) and c.healthy(self.health_timeout_s)
        return out

    def shutdown(self) -> None:
        self._stopping.set()
        self.disconnect_weight_group()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.router is not None:
            self.router.stop()
        for s in self.servers:
            if s is not None:
                s.stop()


def server_specs_from_config(cfg, model_path: str, log_dir: str | None = None,
                             device: str = "auto", extra_args: Sequence[str] = ()) -> list[ServerSpec]:
    """One ServerSpec per engine of a RolloutConfig: consecutive ports from base_port, all
    bound to cfg.host; memory saver only when colocated (and only where the device has it)."""
    if cfg.mode == "external" or cfg.external_urls:
        raise ValueError("rollout.mode=external launches no servers (it uses external_urls)")
    return [ServerSpec(model_path=model_path, port=cfg.base_port + i, host=cfg.host,
                       tp_size=cfg.server_tp_size, mem_fraction_static=cfg.mem_fraction_static,
                       max_total_tokens=cfg.max_total_tokens,
                       cpu_threads=cfg.server_cpu_threads, device=device,
                       colocated=cfg.mode == "colocated",
                       extra_args=(*cfg.server_args, *extra_args),
                       log_path=os.path.join(log_dir, f"sglang_{i}.log") if log_dir else None)
            for i in range(cfg.num_engines)]


def _parse_sample(out: dict, pi: int, si: int, prompt: list[int], retries: int) -> Sample:
    """One /generate answer -> Sample. output_token_logprobs entries are [logprob, id, text]."""
    meta = out["meta_info"]
    token_ids = list(out.get("output_ids") or [])
    entries = meta.get("output_token_logprobs") or []
    if [e[1] for e in entries] != token_ids:
        raise RolloutError(f"/generate rid {meta.get('id')}: output_token_logprobs ids do not "
                           "match output_ids")
    reason = meta.get("finish_reason")
    reason = reason.get("type", "stop") if isinstance(reason, dict) else str(reason or "stop")
    return Sample(pi, si, prompt, token_ids, [float(e[0]) for e in entries], reason,
                  str(meta.get("weight_version", "default")), retries,
                  meta={k: meta[k] for k in ("id", "e2e_latency", "cached_tokens") if k in meta})
