"""Token-budget micro-batches, sequence packing and pipelined teacher scoring
(trainer/microbatches.py, mcore/schedule.py::packed_attention, teachers.py::TeacherPool.score).

The grouping must change nothing but speed: on a length-skewed batch (a few long responses,
many short ones, like MOPD's math / code / instruction-following mix), the MOPD loss, the
gradients and the teachers' log-probs of the token-budget and packed paths equal those of the
fixed micro-batch path (itself checked against a float64 reference in test_train_loss.py), on
real Megatron (gloo, CPU) at TP=1, TP=2, PP=2 and DP=2 with ranks holding different numbers of
sequences. Tolerances: fp32 models whose matmuls see different shapes (row counts, padding),
so agreement is to float32 rounding: 2e-5 on log-probs and the loss, 1e-5 relative (to the
largest gradient) on gradients.
"""
from __future__ import annotations

import random

import pytest
import torch

from dist_helpers import run_ranks
from megatron_helpers import VOCAB, max_diff, read, tiny_config

LOGP_ATOL = 2e-5
GRAD_RTOL = 1e-5


def skewed_batch(seed: int = 3, prompts: int = 8, n: int = 2):
    """Two domains; responses of 20-90 (``long``) or ~3 (``short``) tokens, interleaved so that
    the fixed grouping puts long and short rows together (the padding the budget removes)."""
    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    rng = random.Random(seed)
    rows, samples = [], []
    for p in range(prompts):
        dom = "long" if p % 3 == 0 else "short"
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 7))]
        rows.append(PromptRow(dom, "x", None, {}, f"mem:{p}", prompt_ids=prompt))
        for k in range(n):
            r = rng.randint(20, 90) if dom == "long" else rng.randint(2, 5)
            resp = [rng.randrange(3, VOCAB) for _ in range(r)]
            logp = [-rng.uniform(0.2, 3.0) for _ in range(r)]
            samples.append(Sample(p, k, prompt, resp, logp, "stop", "v"))
    adv = [rng.gauss(0, 1) for _ in samples]
    return RolloutBatch(rows, samples, n, rewards=[0.0] * len(samples), advantages=adv)


def lengths_of(batch):
    from mopd_megatron.trainer.microbatches import seq_len
    return {i: seq_len(batch, i) for i in range(len(batch))}


# --- grouping (no model) ----------------------------------------------------------------------
def test_split_by_tokens_balances_ranks_and_keeps_every_sequence():
    from mopd_megatron.trainer.microbatches import split_data_parallel
    batch = skewed_batch()
    lengths = lengths_of(batch)
    idx = list(range(len(batch)))
    fixed = split_data_parallel(lengths, idx, 2, by_tokens=False)
    assert fixed == [idx[:8], idx[8:]]
    shares = split_data_parallel(lengths, idx, 2, by_tokens=True)
    assert sorted(i for s in shares for i in s) == idx and all(s == sorted(s) for s in shares)
    tokens = [sum(lengths[i] for i in s) for s in shares]
    fixed_tokens = [sum(lengths[i] for i in s) for s in fixed]
    assert abs(tokens[0] - tokens[1]) <= max(lengths.values())
    assert abs(tokens[0] - tokens[1]) < abs(fixed_tokens[0] - fixed_tokens[1])
    assert len(shares[0]) != len(shares[1])  # balanced by tokens, not by count
    assert split_data_parallel(lengths, idx, 2, by_tokens=True) == shares  # every rank agrees


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_groups_respect_the_budget(packed):
    from mopd_megatron.trainer.microbatches import group_by_tokens
    batch = skewed_batch(1)
    lengths = lengths_of(batch)
    lengths[3] = 500  # over any budget below: alone in its micro-batch
    budget = 120
    groups = group_by_tokens(lengths, list(range(len(batch))), budget, packed)
    assert sorted(i for g in groups for i in g) == list(range(len(batch)))
    assert [3] in groups
    for g in groups:
        cost = sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g)
        assert cost <= budget or len(g) == 1


def test_packed_microbatch_layout_and_slots():
    """Every field of a packed row against a construction written here, padding poisoned by
    the builder's own fill values being checked position by position."""
    from mopd_megatron.trainer.microbatches import (ResponseSlots, build_microbatches,
                                                    fill_from_slots, slot_values)
    batch = skewed_batch(2)
    idx = [0, 5, 9]
    slots = ResponseSlots(batch, idx)
    (mb,) = build_microbatches(batch, [idx], pad_id=1, slots=slots, packed=True, pad_multiple=8)
    seqs = [batch.samples[i] for i in idx]
    full = [s.prompt_token_ids + s.token_ids for s in seqs]
    total = sum(map(len, full))
    t = -(-total // 8) * 8
    assert mb["tokens"].shape == (1, t) and mb["real_tokens"] == total
    assert mb["cu_seqlens"].tolist() == [0, len(full[0]), len(full[0]) + len(full[1]), total] + \
        ([t] if t > total else [])
    exp_tok, exp_tgt, exp_pos, exp_mask, exp_seq, exp_lp, exp_adv = [], [], [], [], [], [], []
    for i, s, f in zip(idx, seqs, full):
        p = len(s.prompt_token_ids)
        exp_tok += f
        exp_tgt += f[1:] + [1]                       # never across a sequence boundary
        exp_pos += list(range(len(f)))               # restart per sequence
        exp_mask += [0.0] * (p - 1) + [1.0] * len(s.token_ids) + [0.0]
        exp_lp += [0.0] * (p - 1) + list(s.logprobs) + [0.0]
        exp_adv += [0.0] * (p - 1) + [batch.advantages[i]] * len(s.token_ids) + [0.0]
        exp_seq += [i] * len(f)
    pad = t - total
    assert mb["tokens"][0].tolist() == exp_tok + [1] * pad
    assert mb["targets"][0].tolist() == exp_tgt + [1] * pad
    assert mb["position_ids"][0].tolist() == exp_pos + [0] * pad
    assert mb["loss_mask"][0].tolist() == exp_mask + [0.0] * pad
    assert mb["seq_ids"][0].tolist() == exp_seq + [-1] * pad
    assert torch.allclose(mb["rollout_logp"][0], torch.tensor(exp_lp + [0.0] * pad))
    assert torch.allclose(mb["orm_adv"][0], torch.tensor(exp_adv + [0.0] * pad))
    # Slots: every response token once, in order; a scatter through them lands on the mask.
    assert sorted(mb["resp_slot"].tolist()) == list(range(slots.total))
    mb["orm_adv"].fill_(float("nan"))                # poison: every response slot rewritten
    fill_from_slots([mb], "orm_adv", slot_values(slots, batch.advantages))
    got = mb["orm_adv"][0][mb["loss_mask"][0] > 0]
    assert torch.allclose(got, torch.tensor([a for a in exp_adv if a != 0.0]))


def test_interleaved_schedule_gets_whole_groups_of_pp():
    from mopd_megatron.trainer.microbatches import Batching, build_microbatches
    batch = skewed_batch(3)
    b = Batching(2, max_tokens=100, packed=True, pipeline=2, interleaved=True)
    groups = b.groups(lengths_of(batch), list(range(len(batch))))
    assert len(groups) % 2 == 0
    fillers = [g for g in groups if not g]
    mbs = build_microbatches(batch, groups, 0, packed=True)
    for mb, g in zip(mbs, groups):
        if not g:  # a filler: one masked token, no sequence
            assert mb["loss_mask"].sum() == 0 and mb["tokens"].numel() == 1
    assert sum(mb["real_tokens"] for mb in mbs) == sum(lengths_of(batch).values())
    assert fillers is not None


def test_config_refuses_packing_without_a_budget_and_small_batches():
    from mopd_megatron.config import ConfigError, ParallelConfig
    with pytest.raises(ConfigError, match="parallel.pack_sequences"):
        ParallelConfig(pack_sequences=True)
    with pytest.raises(ConfigError, match="parallel.max_tokens_per_microbatch"):
        ParallelConfig(max_tokens_per_microbatch=0)


# --- real Megatron: the paths agree ------------------------------------------------------------
def _paths(layout):
    """name -> Batching of the three paths compared."""
    from mopd_megatron.trainer.microbatches import Batching
    pp, inter = layout.get("pp", 1), layout.get("vpp") is not None
    return {"fixed": Batching(2, pipeline=pp, interleaved=inter),
            "budget": Batching(2, max_tokens=160, pipeline=pp, interleaved=inter),
            "packed": Batching(2, max_tokens=160, packed=True, pipeline=pp, interleaved=inter)}


def compare_paths(rank, world, layout, ckpt_root):
    """For each path: this rank's sequences, the teacher log-probs (student's weights as the
    teacher, scored through TeacherPool.score), the global loss, and the gradients (saved)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_helpers import build
    from mopd_megatron.checkpoint import dist_ckpt
    from mopd_megatron.config import LossConfig, OptimizerConfig
    from mopd_megatron.mcore import schedule
    from mopd_megatron.mcore.optimizer import wrap_ddp
    from mopd_megatron.teachers import Teacher, TeacherPool
    from mopd_megatron.trainer.microbatches import fill_from_slots, rank_microbatches
    from mopd_megatron.trainer.objective import make_mopd_loss_fn
    tp, pp, vpp = layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp")
    lay, hf, chunks = build(tiny_config("Qwen2ForCausalLM", layers=4 if vpp else 2), tp=tp,
                            pp=pp, vpp=vpp)
    ddp = wrap_ddp(chunks, OptimizerConfig(distributed_optimizer=False))
    pool = TeacherPool([Teacher("t", ["long", "short"], ddp, VOCAB)])
    batch = skewed_batch()
    loss_cfg = LossConfig(alpha=0.5)
    calls = []
    real_fb = schedule.forward_backward

    def counting(*a, **kw):
        calls.append(len(a[1]))
        return real_fb(*a, **kw)
    schedule.forward_backward = counting
    out = {}
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    params = [p for c in ddp for p in c.module.parameters()]
    saved = [p.detach().clone() for p in params]
    for name, batching in _paths(layout).items():
        steps, mine, slots = rank_microbatches(
            batch, batching, global_batch_size=len(batch), optimizer_steps=1, dp=lay.dp,
            dp_rank=lay.dp_rank, pad_id=0, fixed_length=pp > 1 and name == "fixed", device="cpu")
        calls.clear()
        sig = pool.score(batch, mine, slots, batching, pad_id=0, vocab_size=VOCAB,
                         temperature=1.0, layout=lay)
        logp = None if sig is None else sig.logp
        teacher_calls = list(calls)
        mbs = steps[0]
        if logp is not None:
            fill_from_slots(mbs, "teacher_logp", logp)
        for c in ddp:
            c.zero_grad_buffer()
        metrics = real_fb(ddp, mbs, make_mopd_loss_fn(loss_cfg, loss_cfg.alpha, 1.0,
                                                     lay.tp_group_or_none),
                          vocab_size=VOCAB, tp_rank=lay.tp_rank)
        stats = torch.zeros(2, dtype=torch.float64)
        if last and lay.tp_rank == 0:
            stats[0] = sum(float(m["loss_sum"]) for m in metrics)
            stats[1] = sum(float(m["units"]) for m in metrics)
        dist.all_reduce(stats)
        with torch.no_grad():
            for c in ddp:
                for p in c.module.parameters():
                    p.copy_(p.main_grad)
        dist_ckpt.save(f"{ckpt_root}/{name}", ddp)
        padded = sum(mb["tokens"].numel() - mb["real_tokens"] for mb in mbs) / \
            sum(mb["tokens"].numel() for mb in mbs)
        out[name] = dict(mine=mine, loss=float(stats[0] / stats[1]), teacher_calls=teacher_calls,
                         logp={i: logp[slots.offset[i]:slots.offset[i] + slots.length[i]].tolist()
                               for i in mine} if logp is not None else None,
                         microbatches=len(mbs), padded=padded)
        with torch.no_grad():  # the next path starts from the same weights
            for p, w in zip(params, saved):
                p.copy_(w)
    schedule.forward_backward = real_fb
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout, world", [({}, 1), ({"tp": 2}, 2), ({"pp": 2}, 2), ({}, 2),
                                           ({"pp": 2, "vpp": 2}, 2)],
                         ids=["tp1", "tp2", "pp2", "dp2", "vpp2"])
def test_budget_and_packing_equal_fixed_microbatches(tmp_path, layout, world):
    out = run_ranks(compare_paths, world, layout, str(tmp_path))
    if "vpp" in layout:  # the interleaved schedule: counts made a multiple of pp by fillers
        for rank in out:
            assert all(rank[p]["microbatches"] % 2 == 0 for p in ("fixed", "budget", "packed"))
    grads = {name: read(str(tmp_path / name)) for name in ("fixed", "budget", "packed")}
    scale = max(float(g.abs().max()) for g in grads["fixed"].values())
    for rank in out:
        fixed = rank["fixed"]
        for name in ("budget", "packed"):
            got = rank[name]
            assert got["loss"] == pytest.approx(fixed["loss"], abs=LOGP_ATOL)
            if fixed["logp"] is not None:  # last pipeline stage: same teacher log-probs
                assert set(got["logp"]) == set(got["mine"])
                for i, lp in got["logp"].items():
                    ref = fixed_logp(out, i)
                    assert max(abs(a - b) for a, b in zip(lp, ref)) < LOGP_ATOL
            # one forward-only schedule call per teacher, holding all its micro-batches
            assert len(got["teacher_calls"]) == 1 and got["teacher_calls"][0] >= 1
        assert len(fixed["teacher_calls"]) == 1
        assert rank["packed"]["padded"] == 0.0 < fixed["padded"]  # pad_multiple 1: none at all
    for name in ("budget", "packed"):
        diffs = max_diff(grads[name], grads["fixed"])
        assert max(diffs.values()) <= GRAD_RTOL * scale, diffs
    if world == 2 and not layout:  # DP=2 by tokens: different numbers of sequences per rank
        assert len(out[0]["budget"]["mine"]) != len(out[1]["budget"]["mine"])
        assert len(out[0]["fixed"]["mine"]) == len(out[1]["fixed"]["mine"])


def fixed_logp(out, i):
    """Sequence i's teacher log-probs on the fixed path (whichever rank held it there)."""
    for rank in out:
        if rank["fixed"]["logp"] is not None and i in rank["fixed"]["logp"]:
            return rank["fixed"]["logp"][i]
    raise KeyError(i)
