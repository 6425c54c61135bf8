"""Where things run: the rollout engine, the training parallel layout and the process groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import check, doc

__all__ = ["RolloutConfig", "ParallelConfig", "RuntimeConfig"]


# Flags SGLangServer derives from the config; a second value in rollout.server_args would
# silently win (argparse keeps the last one) and break the trainer's view of its servers.
TRAINER_OWNED_SERVER_FLAGS = frozenset({
    "--model-path", "--model", "--host", "--port", "--tp-size", "--tp", "--device",
    "--mem-fraction-static", "--max-total-tokens", "--enable-memory-saver"})


# Why rollout.top_p / rollout.top_k are refused (the fields stay so a recipe may spell out 1 / -1).
TRUNCATION_REFUSED = (
    "{} truncates the sampling distribution, which MOPD does not support: the engine's log mu "
    "is the log-prob under the untruncated tempered distribution, not under the truncated one "
    "the tokens are drawn from, so the importance weight pi_theta/mu would not be the "
    "behaviour-policy ratio; sample untruncated (top_p 1, top_k -1) and lower "
    "rollout.temperature instead")


@dataclass
class RolloutConfig:
    """Sampling y ~ mu with log mu(y_t) from SGLang engines."""

    SECTION: ClassVar[str] = "rollout"

    engine: Literal["sglang", "local"] = doc(
        "sglang", "Rollout engine: sglang (servers, the production path) or local (the trainer's "
                  "own Megatron student samples; no weight sync; tp/dp only, pp = 1; for the "
                  "CPU demo and debugging).")
    mode: Literal["colocated", "dedicated", "external"] = doc(
        "colocated", "colocated: engines share the training GPUs and alternate with training; "
                     "dedicated: engines on their own nodes; external: already-running servers "
                     "at rollout.external_urls.")
    external_urls: list[str] = doc(
        help="Base URLs (http://host:port) of engines the trainer does not start: mode=external "
             "(someone else's servers, never restarted), or mode=dedicated engines that "
             "slurm/launch.sh started on engine nodes (weights then go over a weight-update "
             "process group: NCCL on GPU, gloo on CPU). dedicated without URLs: global rank 0 "
             "launches rollout.num_engines servers on its own node.",
        factory=list)
    num_engines: int = doc(1, "Engine servers of a dedicated mode: on the launcher's engine "
                              "nodes (Slurm), or launched by global rank 0 outside Slurm.")
    engines_per_node: int | None = doc(
        None, "colocated: engines on every training node, each on server_tp_size of the node's "
              "GPUs and started by the node's local rank 0; null: GPUs per node / "
              "server_tp_size on GPU, 1 on CPU.")
    n_samples_per_prompt: int = doc(8, "Responses sampled per prompt (the GRPO group size).")
    temperature: float = doc(
        1.0, "Sampling temperature T. log mu, log pi_theta and the teachers' log pi_dom are all "
             "log softmax(logits / T) at this T, so a teacher equal to the student gives a zero "
             "teacher advantage at any temperature.")
    top_p: float = doc(
        1.0, "Nucleus sampling mass; must stay 1 (untruncated): log mu from the engine is the "
             "untruncated tempered distribution, so with truncation w = pi_theta/mu would not be "
             "the behaviour ratio.")
    top_k: int = doc(
        -1, "Top-k sampling; must stay -1 (untruncated), for the same reason as rollout.top_p.")
    max_new_tokens: int = doc(1024, "Maximum response length in tokens.")
    concurrency: int = doc(256, "In-flight generate requests per engine.")
    samples_per_request: int = doc(
        1, "Samples sent in one /generate request (a batched request). 1: one request per "
           "sample, the finest load balancing and retry; larger values cut the per-request "
           "overhead that dominates small models on CPU. A failed request resubmits its samples.")
    request_timeout_s: float = doc(600.0, "Timeout of one generate request.")
    startup_timeout_s: float = doc(600.0, "Time allowed for an engine to become healthy.")
    server_tp_size: int = doc(1, "Tensor-parallel size of each SGLang server.")
    mem_fraction_static: float = doc(0.6, "SGLang's static GPU memory fraction (weights + KV cache).")
    max_total_tokens: int | None = doc(
        None, "KV-cache size in tokens of each launched server; null: SGLang sizes it from "
              "mem_fraction_static (on CPU that is a fraction of host RAM, so cap it there).")
    server_cpu_threads: int | None = doc(
        None, "CPU servers only: OMP threads of each launched server; null: torch's default.")
    server_log_dir: str | None = doc(
        None, "Launched servers (and the router) write sglang_<i>.log / router.log here; "
              "null: their output goes to the trainer's.")
    host: str = doc("127.0.0.1", "Address launched servers bind to.")
    base_port: int = doc(30000, "First port for launched servers (one port per engine).")
    router: bool = doc(False, "Put sglang-router in front of the engines.")
    router_port: int = doc(30100, "Port of the router when rollout.router is true.")
    parity_tolerance: float = doc(
        0.05, "Parity probe after a weight sync: max allowed mean |log mu - log pi_theta| per "
              "token (nats) on a probe sequence; larger means the engine and trainer disagree "
              "(weights, dtype, template) and stops the run.")
    parity_interval: int = doc(
        1, "Run the parity probe after every this many weight syncs, and always after the "
           "first sync of a run or resume (each probe: one trainer forward, one engine request).")
    weight_sync_bucket_mib: int = doc(512, "Size of a weight-sync bucket in MiB.")
    server_args: list[str] = doc(
        help="Extra `sglang.launch_server` flags for launched servers, passed as is, e.g. "
             "[--disable-radix-cache]. Flags the trainer sets itself (model path, host, port, "
             "tp size, device, memory) are refused: set their rollout fields instead.",
        factory=list)

    def __post_init__(self):
        if self.mode == "external":
            check(len(self.external_urls) > 0, self, "external_urls", "mode=external needs server URLs")
        elif self.mode == "colocated":
            check(len(self.external_urls) == 0, self, "external_urls",
                  "colocated engines are started by the trainer on its own nodes; URLs are for "
                  "mode=external or launcher-started dedicated engines")
        check(self.num_engines >= 1, self, "num_engines", "must be >= 1")
        check(self.engines_per_node is None or self.engines_per_node >= 1, self,
              "engines_per_node", "must be >= 1 or null")
        check(self.n_samples_per_prompt >= 1, self, "n_samples_per_prompt", "must be >= 1")
        check(self.temperature > 0, self, "temperature", "must be > 0 (on-policy sampling needs a "
              "proper distribution mu)")
        # Truncated sampling draws from a renormalised distribution, but the engine reports
        # log mu of the untruncated tempered one: w = pi_theta/mu would be the wrong ratio.
        check(0 < self.top_p <= 1, self, "top_p", "must be in (0, 1]")
        check(self.top_p == 1.0, self, "top_p", TRUNCATION_REFUSED.format("top_p < 1 (nucleus sampling)"))
        check(self.top_k == -1 or self.top_k >= 1, self, "top_k", "must be -1 or >= 1")
        check(self.top_k == -1, self, "top_k", TRUNCATION_REFUSED.format("top_k >= 1 (top-k sampling)"))
        check(self.max_new_tokens >= 1, self, "max_new_tokens", "must be >= 1")
        check(self.concurrency >= 1, self, "concurrency", "must be >= 1")
        check(self.samples_per_request >= 1, self, "samples_per_request", "must be >= 1")
        check(self.samples_per_request == 1 or not self.router, self, "samples_per_request",
              "batched requests need direct server URLs (rollout.router: false): "
              "sglang-router takes one rid per request")
        check(self.max_total_tokens is None or self.max_total_tokens >= 1, self,
              "max_total_tokens", "must be >= 1 or null")
        check(self.server_cpu_threads is None or self.server_cpu_threads >= 1, self,
              "server_cpu_threads", "must be >= 1 or null")
        check(self.request_timeout_s > 0, self, "request_timeout_s", "must be > 0")
        check(self.startup_timeout_s > 0, self, "startup_timeout_s", "must be > 0")
        check(self.server_tp_size >= 1, self, "server_tp_size", "must be >= 1")
        check(0 < self.mem_fraction_static < 1, self, "mem_fraction_static", "must be in (0, 1)")
        check(1 <= self.base_port <= 65535, self, "base_port", "must be a TCP port")
        check(1 <= self.router_port <= 65535, self, "router_port", "must be a TCP port")
        check(self.parity_tolerance > 0, self, "parity_tolerance", "must be > 0")
        check(self.parity_interval >= 1, self, "parity_interval", "must be >= 1")
        check(self.weight_sync_bucket_mib >= 1, self, "weight_sync_bucket_mib", "must be >= 1")
        check(not self.server_args or self.mode != "external", self, "server_args",
              "mode=external launches no servers to pass flags to")
        owned = sorted({a.split("=", 1)[0] for a in self.server_args} & TRAINER_OWNED_SERVER_FLAGS)
        check(not owned, self, "server_args", f"{', '.join(owned)} set by the trainer from the "
              "rollout fields (model path, host, base_port, server_tp_size, mem_fraction_static, "
              "max_total_tokens, mode)")


@dataclass
class ParallelConfig:
    """Megatron parallel layout of student and teachers. DP = world_size / (tp * pp)."""

    SECTION: ClassVar[str] = "parallel"

    tp: int = doc(1, "Tensor-parallel size.")
    pp: int = doc(1, "Pipeline-parallel size.")
    vpp: int | None = doc(None, "Virtual pipeline stages per rank (interleaved schedule); null = off.")
    micro_batch_size: int = doc(1, "Sequences per micro-batch.")
    global_batch_size: int = doc(64, "Sequences per optimizer step, over all data-parallel ranks.")
    max_tokens_per_microbatch: int | None = doc(
        None, "Token budget of one micro-batch (student update and teacher scoring); null = "
              "fixed micro-batches of micro_batch_size sequences. Set: each optimizer step's "
              "sequences are dealt to data-parallel ranks by tokens (ranks may hold different "
              "numbers of sequences) and grouped, longest first, into micro-batches of at most "
              "this many tokens (padded: runs of lengths within 2x of each other, rows x longest "
              "row; packed: first-fit decreasing on the row's length); "
              "micro_batch_size is then unused. A longer sequence gets a micro-batch of its own. "
              "The loss stays the mean over the global batch's sequences (slime: "
              "--use-dynamic-batch-size --max-tokens-per-gpu).")
    pack_sequences: bool = doc(
        False, "Pack each token-budget micro-batch into one row: position ids restart per "
               "sequence, attention stays inside each sequence (Transformer Engine THD format "
               "on GPU, a block-diagonal causal mask on the local layer spec). Needs "
               "max_tokens_per_microbatch.")
    sequence_parallel: bool = doc(False, "Megatron sequence parallelism "
                                         "(TransformerConfig.sequence_parallel): activations "
                                         "outside attention/MLP split over TP ranks. Needs tp > 1 "
                                         "and Transformer Engine norms (GPU).")
    recompute: Literal["none", "selective", "full"] = doc(
        "none", "Activation recomputation of the student (TransformerConfig.recompute_granularity; "
                "full recomputes every layer, one at a time). Teachers run forward-only.")
    overlap_p2p_comm: bool = doc(
        True, "Pipeline send/recv as separate isend/irecv, overlapped with compute in the "
              "interleaved schedule (TransformerConfig.overlap_p2p_comm, vpp only; required "
              "there); false batches them instead (TransformerConfig.batch_p2p_comm, "
              "Megatron-LM's pairing).")

    def __post_init__(self):
        check(self.tp >= 1, self, "tp", "must be >= 1")
        check(self.pp >= 1, self, "pp", "must be >= 1")
        if self.vpp is not None:
            check(self.vpp >= 2, self, "vpp", "must be >= 2 or null")
            check(self.pp >= 2, self, "pp", "parallel.vpp needs pp >= 2")
            # Measured on megatron-core 0.16 (ENVIRONMENT.md): the interleaved schedule with
            # overlap_p2p_comm=False gives silently wrong losses; Megatron-LM's argument checks
            # forbid the combination, megatron-core does not.
            check(self.overlap_p2p_comm, self, "overlap_p2p_comm",
                  "parallel.vpp requires overlap_p2p_comm=true (the interleaved schedule without "
                  "it gives wrong results in megatron-core)")
        check(self.micro_batch_size >= 1, self, "micro_batch_size", "must be >= 1")
        check(self.global_batch_size >= 1, self, "global_batch_size", "must be >= 1")
        check(self.global_batch_size % self.micro_batch_size == 0, self, "global_batch_size",
              f"must be divisible by parallel.micro_batch_size={self.micro_batch_size}")
        check(not self.sequence_parallel or self.tp > 1, self, "sequence_parallel", "needs parallel.tp > 1")
        check(self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch >= 1,
              self, "max_tokens_per_microbatch", "must be >= 1 or null")
        check(not self.pack_sequences or self.max_tokens_per_microbatch is not None, self,
              "pack_sequences", "needs parallel.max_tokens_per_microbatch (the packed row's "
                                "token budget)")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class RuntimeConfig:
    """The trainer's process groups, and what a rank says when it waits too long."""

    SECTION: ClassVar[str] = "runtime"

    timeout_minutes: int = doc(
        30, "Collective timeout of every trainer process group (torch.distributed's default "
            "group, Megatron's TP/PP/DP groups, the node groups): a rank waiting longer on its "
            "peers fails instead of hanging. Ranks wait on global rank 0 for a whole rollout "
            "and reward phase, so keep it above the longest of those.")
    phase_warn_minutes: float | None = doc(
        None, "A rank still in one phase (start-up builds, rollout, reward, teacher, student, "
              "sync, eval, save, ...) after this many minutes prints, once, which phase and "
              "step it is in: the rank a hung collective waits on is the one that names "
              "another phase. null: half of runtime.timeout_minutes; 0: off.")

    def __post_init__(self):
        check(self.timeout_minutes >= 1, self, "timeout_minutes", "must be >= 1")
        check(self.phase_warn_minutes is None or self.phase_warn_minutes >= 0, self,
              "phase_warn_minutes", "must be >= 0 (0: off) or null")

    @property
    def phase_warn_seconds(self) -> float:
        """The watchdog's threshold in seconds (0: off)."""
        minutes = self.timeout_minutes / 2 if self.phase_warn_minutes is None else self.phase_warn_minutes
        return 60.0 * minutes
