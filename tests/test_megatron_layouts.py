"""Real megatron-core under TP/PP/VPP/DP on gloo: layouts must agree with TP=1, PP=1.

Tolerances (fp32): logits 2e-5 absolute, loss 1e-5 relative, gradients 1e-5 absolute; they
cover reduction-order differences of split matmuls and nothing more.
"""
import pytest
import torch
from dist_helpers import run_ranks
from megatron_helpers import build, full_logits, loss_and_grads, max_diff, microbatches, read, \
    tiny_config, tmp

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def _allreduce_settings():
    # Gradient comparisons need the full reduced gradient on every rank: with the distributed
    # optimizer each rank's buffer is only valid for its own shard after the reduce-scatter.
    from mopd_megatron.config import OptimizerConfig
    return OptimizerConfig(distributed_optimizer=False)


def _tp_logits(rank, world_size):
    out = {}
    tokens = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    for arch in ARCHS:
        _, _, ref = build(tiny_config(arch), tp=1, seed=7)
        want = full_logits(ref, tokens)
        _, _, chunks = build(tiny_config(arch), tp=2, seed=7)
        got = full_logits(chunks, tokens)
        out[arch] = float((got - want).abs().max())
    return out


def test_tp2_logits_equal_tp1():
    for rank_result in run_ranks(_tp_logits, 2):
        for arch, diff in rank_result.items():
            assert diff < 2e-5, f"{arch}: TP=2 logits differ from TP=1 by {diff}"


def _layout_vs_reference(rank, world_size, arch, layers, layout, base):
    """Reference (TP=1, PP=1) and ``layout`` start from the same weights (a dist-checkpoint)
    and must give the same loss and gradients."""
    from mopd_megatron.checkpoint import dist_ckpt
    from mopd_megatron.mcore.optimizer import wrap_ddp
    ALLREDUCE = _allreduce_settings()
    hf_dict = tiny_config(arch, layers=layers)
    batches = microbatches(n=4)
    _, hf, ref = build(hf_dict, seed=11)
    dist_ckpt.save(tmp(base, "weights"), ref)
    ref_loss = loss_and_grads(wrap_ddp(ref, ALLREDUCE), hf, batches, tmp(base, "ref_grads"))
    _, hf, chunks = build(hf_dict, seed=99, **layout)
    dist_ckpt.load(tmp(base, "weights"), chunks)
    loss = loss_and_grads(wrap_ddp(chunks, ALLREDUCE), hf, batches, tmp(base, "grads"))
    return ref_loss, loss


def _check_layout(world, arch, layers, layout, tmp_path):
    results = run_ranks(_layout_vs_reference, world, arch, layers, layout, str(tmp_path))
    for ref_loss, loss in results:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (layout, ref_loss, loss)
    diffs = max_diff(read(tmp_path / "ref_grads"), read(tmp_path / "grads"))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, f"{layout}: gradient of {worst} differs by {diffs[worst]}"
    # The gradients must be real: a zero gradient everywhere would also "match".
    assert all(v.abs().sum() > 0 for v in read(tmp_path / "ref_grads").values())


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_pp2_loss_and_grads_equal_pp1(arch, tmp_path):
    # Llama's tiny config ties embeddings: PP=2 must all-reduce the two copies' gradients.
    _check_layout(2, arch, 4, dict(pp=2), tmp_path)


def test_virtual_pp_loss_and_grads_equal_pp1(tmp_path):
    _check_layout(2, "Qwen2ForCausalLM", 4, dict(pp=2, vpp=2), tmp_path)


@pytest.mark.slow
def test_tp2_pp2_on_four_ranks(tmp_path):
    _check_layout(4, "Qwen3ForCausalLM", 4, dict(tp=2, pp=2), tmp_path)


def _ckpt_tp2_to_tp1(rank, world_size, base):
    from mopd_megatron.checkpoint import dist_ckpt
    tokens = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(5))
    _, _, chunks = build(tiny_config("Qwen2ForCausalLM"), tp=2, seed=21)
    want = full_logits(chunks, tokens)
    dist_ckpt.save(tmp(base, "tp2"), chunks)
    _, _, fresh = build(tiny_config("Qwen2ForCausalLM"), tp=1, seed=22)  # other weights
    before = float((full_logits(fresh, tokens) - want).abs().max())
    dist_ckpt.load(tmp(base, "tp2"), fresh)
    return before, float((full_logits(fresh, tokens) - want).abs().max())


def test_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    for before, after in run_ranks(_ckpt_tp2_to_tp1, 2, str(tmp_path)):
        assert before > 1e-2  # the fresh model really was different
        assert after < 2e-5
