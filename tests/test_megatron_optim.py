"""DDP + distributed optimizer steps, AdamW-fallback resume and bf16 on real gloo ranks."""
import pytest
import torch
from dist_helpers import run_ranks
from megatron_helpers import build, max_diff, microbatches, read, tiny_config, tmp

ARCH = "Qwen3ForCausalLM"
# adam_eps bounds Adam's sensitivity to gradient rounding: with the default 1e-8 a near-zero
# gradient entry (sum of cancelling terms) turns reduction-order noise of 1e-9 into a 1e-3
# relative change of its update; with 1e-4 any layout difference above 1e-7 is a real bug.
SETTINGS = dict(lr=1e-2, clip_grad=1.0, weight_decay=0.01, eps=1e-4)


def _optimizer(chunks, distributed=True, dtype=torch.float32):
    from mopd_megatron.config import OptimizerConfig
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    settings = OptimizerConfig(distributed_optimizer=distributed, **SETTINGS)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, 1, dtype)
    return ddp, optimizer, scheduler


def _dp_slice(batches):
    """This rank's share of each micro-batch of the global batch (split over samples)."""
    from megatron.core import parallel_state as ps
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out = []
    for mb in batches:
        b = mb["tokens"].shape[0] // dp
        out.append({k: v[r * b:(r + 1) * b] for k, v in mb.items()})
    return out


def _step(ddp, optimizer, scheduler, hf, batches):
    from mopd_megatron.mcore.cross_entropy import masked_token_ce
    from mopd_megatron.mcore.step import train_step
    from megatron.core import parallel_state as ps
    result = train_step(ddp, optimizer, scheduler, _dp_slice(batches), masked_token_ce,
                        vocab_size=hf.vocab_size, tp_rank=ps.get_tensor_model_parallel_rank())
    assert result.ok
    return result.grad_norm


def _steps_from(rank, world_size, base, steps, distributed, out):
    """``steps`` optimizer steps from the weights in ``base/init`` (written by the first call),
    then save the result to ``base/out``. World 1 + plain optimizer is the reference."""
    import os

    from mopd_megatron.checkpoint import dist_ckpt
    _, hf, chunks = build(tiny_config(ARCH), seed=5 + world_size)
    if os.path.exists(tmp(base, "init")):
        dist_ckpt.load(tmp(base, "init"), chunks)
    else:
        dist_ckpt.save(tmp(base, "init"), chunks)
    ddp, opt, sch = _optimizer(chunks, distributed=distributed)
    norms = [_step(ddp, opt, sch, hf, microbatches(n=2, b=4, seed=s)) for s in range(steps)]
    dist_ckpt.save(tmp(base, out), ddp)
    return norms


def test_distributed_optimizer_step_equals_single_rank(tmp_path):
    ref_norms = run_ranks(_steps_from, 1, str(tmp_path), 2, False, "single")[0]
    norms = run_ranks(_steps_from, 2, str(tmp_path), 2, True, "distopt")
    for rank_norms in norms:
        assert rank_norms == pytest.approx(ref_norms, rel=1e-5)
    init, single, dist = (read(tmp_path / n) for n in ("init", "single", "distopt"))
    moved = max_diff(init, single)
    assert min(moved.values()) > 0  # every tensor was updated by the optimizer
    diffs = max_diff(single, dist)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, f"{worst} differs by {diffs[worst]}"


def _resume(rank, world_size, base):
    """TP=2: step, save (model + optimizer), step -> reference. TP=1 x DP=2: load, step."""
    from mopd_megatron.checkpoint import dist_ckpt
    _, hf, chunks = build(tiny_config(ARCH), tp=2, seed=8)
    ddp, opt, sch = _optimizer(chunks)
    _step(ddp, opt, sch, hf, microbatches(n=2, b=4, seed=0))
    dist_ckpt.save(tmp(base, "after1"), ddp, opt)
    _step(ddp, opt, sch, hf, microbatches(n=2, b=4, seed=1))
    dist_ckpt.save(tmp(base, "continuous"), ddp)

    _, hf, chunks = build(tiny_config(ARCH), tp=1, seed=9)
    ddp, opt, sch = _optimizer(chunks)
    dist_ckpt.load(tmp(base, "after1"), ddp, opt)
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt.chained_optimizers[0].optimizer
    steps = [s["step"] for s in inner.state.values()]
    distinct = len({id(s) for s in steps}) == len(steps)
    loaded_steps = sorted({float(s) for s in steps})
    _step(ddp, opt, sch, hf, microbatches(n=2, b=4, seed=1))
    dist_ckpt.save(tmp(base, "resumed"), ddp)
    return distinct, loaded_steps, sorted({float(s["step"]) for s in inner.state.values()})


def test_adamw_fallback_resumes_exactly_at_another_tp(tmp_path):
    for distinct, loaded, after in run_ranks(_resume, 2, str(tmp_path)):
        assert distinct, "parameters share one AdamW step tensor after load"
        assert loaded == [1.0] and after == [2.0]
    diffs = max_diff(read(tmp_path / "continuous"), read(tmp_path / "resumed"))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, f"{worst} differs by {diffs[worst]} after resume"


def _bf16_step(rank, world_size):
    from megatron.core import parallel_state as ps
    _, hf, chunks = build(tiny_config(ARCH), tp=2, seed=3, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in chunks[0].parameters())
    ddp, opt, sch = _optimizer(chunks, dtype=torch.bfloat16)
    from mopd_megatron.mcore.cross_entropy import masked_token_ce
    from mopd_megatron.mcore.step import train_step
    losses = []
    for _ in range(3):
        r = train_step(ddp, opt, sch, microbatches(n=2, b=2, seed=0), masked_token_ce,
                       vocab_size=hf.vocab_size, tp_rank=ps.get_tensor_model_parallel_rank())
        total = sum(float(m["loss_sum"]) for m in r.metrics)
        count = sum(float(m["tokens"]) for m in r.metrics)
        losses.append(total / count)
    assert ps.get_tensor_model_parallel_world_size() == 2
    return losses


def test_bf16_forward_backward_trains():
    for losses in run_ranks(_bf16_step, 2):
        assert all(torch.isfinite(torch.tensor(losses)))
        assert abs(losses[0] - torch.log(torch.tensor(250.0)).item()) < 0.5  # near-uniform start
        assert losses[-1] < losses[0]  # same batch three times: the loss must go down


def _wsd_lrs(rank, world_size):
    """The learning rate of 12 optimizer steps under the wsd schedule."""
    from mopd_megatron.config import OptimizerConfig
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    _, hf, chunks = build(tiny_config(ARCH), seed=3)
    # 12 optimizer steps, the last third (4 steps) decaying
    settings = OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, schedule="wsd",
                               decay_fraction=1 / 3, distributed_optimizer=False)
    ddp = wrap_ddp(chunks, settings)
    opt, sch = build_optimizer(ddp, settings, 12, torch.float32)
    lrs = []
    for _ in range(12):
        sch.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_lr():
    lrs = run_ranks(_wsd_lrs, 1)[0]
    # Written out: steps 1-2 warm up (lr * n / 2), 3-8 hold lr, 9-12 go linearly from lr to
    # min_lr over the last 4 steps (the anneal starts after step decay_steps - 4 = 8).
    lr, lo = 1e-2, 1e-3
    expected = [lr / 2, lr] + [lr] * 6 + [lo + (lr - lo) * (1 - k / 4) for k in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-12), lrs
