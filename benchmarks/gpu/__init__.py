"""The GPU suite's checks (benchmarks/gpu_suite.py runs them), in their default order.

Importing this package imports no torch: ``--help``, ``--list`` and ``--dry-run`` run on any
machine. Each check is a module with ``run(rec, opts)`` (measures, raises ``Skip`` or
``CheckFailed``) and ``summary(figures) -> list[str]`` (markdown lines for RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CheckSpec", "CHECKS", "SUITE_BUDGET_S", "by_name"]

# The whole suite must end inside 8 minutes on one H100/H200 (a device lease is 15 minutes,
# machine start and transfers included). The budgets below add up to 480 s; the driver also
# caps each check by what is left of this total, so a hung check cannot push the suite past
# it (the probe, a stopped child's 10 s grace and the report writing fit in the rest).
SUITE_BUDGET_S = 440


@dataclass(frozen=True)
class CheckSpec:
    name: str
    module: str          # benchmarks.gpu.<module>
    budget_s: int        # the check's own timeout (its child process is stopped after it)
    needs: tuple[str, ...]  # top-level packages it needs beyond torch (else SKIPPED)
    measures: str        # what --dry-run prints


# Cheap checks first: a run cut short by the lease still leaves their figures.
CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "loss_kernel", "loss_kernel", 50, ("triton",),
        "fused MOPD loss (mopd_megatron.ops.mopd_loss, Triton backend): forward + backward of "
        "bf16 logits T=16384 x V_local in {152064 (TP=1), 19008 (TP=8)} with CUDA events "
        "(benchmarks/bench_loss.py's child: ours, naive fp32 log_softmax, Megatron's "
        "vocab_parallel_cross_entropy); bytes 3*T*V*2 (read logits fwd, read + write grad bwd), "
        "GB/s, fraction of the card's HBM peak and of a same-size copy, peak memory over the "
        "inputs. Numerics first on a small shape: Triton vs the op's PyTorch reference backend "
        "and a float64 log_softmax (fp32 and bf16; the tolerances of tests/test_ops_reference.py)."),
    CheckSpec(
        "te_parity", "te_parity", 50, ("megatron", "transformer_engine"),
        "Transformer Engine layer spec vs the local spec: both built by "
        "models/builder.py::build_model_chunks (use_te True / False) from one TransformerConfig "
        "(recipes/qwen3_8b_mopd.yaml and recipes/mopd_70b.yaml scaled to 2 layers, hidden 1024), "
        "TE weights copied into the local model under the layout-free names of "
        "convert/export.py::local_parameters; logits and target log-probs compared in fp32 "
        "(rel <= 2e-3, mean |dlogp| <= 1e-3 nats) and bf16 (rel <= 3e-2, mean |dlogp| <= "
        "rollout.parity_tolerance's default 0.05 nats)."),
    CheckSpec(
        "packed_thd", "packed_thd", 30, ("megatron", "transformer_engine"),
        "sequence packing (parallel.pack_sequences) on the TE spec: six sequences with "
        "responses in the Open-MOPD length ratio (/32) packed into one row by "
        "trainer/microbatches.py::build_microbatches and run through "
        "mcore/schedule.py::packed_attention in THD format (PackedSeqParams), against one padded "
        "row per sequence; target log-probs at the response positions and the gradients of "
        "their sum, fp32 (max |dlogp| <= 1e-3, grad rel <= 1e-2) and bf16 (0.05, 0.1). The "
        "local spec's mask path runs the same comparison on CPU in tests/test_gpu_suite_checks.py."),
    CheckSpec(
        "memory_plan", "memory_plan", 70, ("megatron", "transformer_engine"),
        "the planner (plan/memory.py via plan/cli.py::inputs_from_config, the `mopd plan` road) "
        "against torch.cuda memory of a small configuration (recipes/qwen3_8b_mopd.yaml at "
        "tp=pp=1, 8 layers, hidden 2048, its vocabulary, 4096-token micro-batches, both teachers "
        "resident) built like the trainer (build_chunks, wrap_ddp, build_optimizer) and trained "
        "2 steps with the trainer's MOPD loss: per term predicted vs measured (weights, grads, "
        "optimizer state, teachers, train-phase activations + logits, a teacher scoring pass, "
        "CUDA context / allocator overhead vs the 4 GiB reserve); FAILED if the measured peak "
        "exceeds the planned peak."),
    CheckSpec(
        "fp8_step", "fp8_step", 90, ("megatron", "transformer_engine"),
        "FP8 vs BF16 training steps through the trainer's road: TransformerConfig from "
        "recipes/qwen3_8b_mopd.yaml's model.fp8 via models/builder.py::transformer_config "
        "(scaled to 6 layers and a 32768 vocabulary, the recipe's hidden/FFN/heads kept, tp=pp=1), "
        "build_model_chunks(use_te=True), Megatron DDP + distributed optimizer, "
        "mcore/step.py::train_step on a learnable copy task; the same initial weights and "
        "batches for bf16, the recipe's FP8 recipe (tensorwise) and blockwise. Step time "
        "(median after warm-up), FP8/BF16 ratio, loss difference at the first and last step "
        "(<= 2% / 10%, as benchmarks/gpu_check_fp8.py), and both losses decreasing."),
    CheckSpec(
        "sglang_cuda", "sglang_cuda", 190, ("sglang", "megatron"),
        "SGLang on CUDA through the trainer's launcher: RolloutConfig(mode=colocated) -> "
        "rollout/sglang_engine.py::server_specs_from_config (--enable-memory-saver) -> "
        "rollout/server.py::SGLangServer driven by SGLangEngine (what SGLangEngine.launch does), "
        "a tiny Qwen2 checkpoint built locally (tools/make_tiny_hf.py). "
        "GPU memory in use (torch.cuda.mem_get_info) before the server, with it, after "
        "release_memory and after resume_memory, and the time of each call; then the trainer "
        "side (Megatron student of a second checkpoint, loaded with trainer/builders.py::"
        "load_weights) pushes its weights with convert.export_hf_weights -> "
        "SGLangEngine.update_weights -> rollout/weight_sync.py::push_tensor_buckets (CUDA-IPC "
        "handles of CUDA tensors): sync seconds, bytes, buckets; parity probe "
        "(rollout/parity.py) engine vs trainer_probe_logprobs before (must differ) and after "
        "(<= rollout.parity_tolerance) the sync."),
)


def by_name() -> dict[str, CheckSpec]:
    return {c.name: c for c in CHECKS}
