"""The temperature contract: log mu (the engine), log pi_theta (the student's loss) and
log pi_dom (the teachers) are all log softmax(logits / T) at the rollout temperature T.

Invariant: a teacher identical to the student gives the teacher term log pi_dom - log pi_theta
= 0 on every token, hence (alpha = 0) exactly zero gradient, at ANY temperature. Checked
through the trainer's own paths on real Megatron (gloo, CPU): TeacherPool.score with the
student's own chunks as the teacher, then make_mopd_loss_fn through mcore/schedule.py's
forward_backward into the DDP grad buffers; and once through Trainer.train_step itself. The
teacher scored at T = 1 while the student is at T != 1 (the old behaviour) must break it.

The other half of the sampling contract: log mu is of the untruncated tempered distribution,
so top-p/top-k sampling is refused (config: tests/test_config.py; LocalEngine: here).
"""
from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks
from megatron_helpers import VOCAB, tiny_config

TEMPS = (0.6, 1.0, 1.3)
MBS = 2  # sequences per micro-batch


def one_domain_batch(seed=0, prompts=3, n=2):
    """A RolloutBatch of one domain with ragged prompts and responses (log mu set later)."""
    from mopd_megatron.data import PromptRow
    from mopd_megatron.rollout.engine import Sample
    from mopd_megatron.trainer.batch import RolloutBatch
    g = torch.Generator().manual_seed(seed)
    rows, samples = [], []
    for p in range(prompts):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append(PromptRow("d", "x", None, {}, f"mem:{p}", prompt_ids=prompt))
        for k in range(n):
            resp = torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
            samples.append(Sample(p, k, prompt, resp, [0.0] * len(resp), "stop", "v"))
    return RolloutBatch(rows, samples, n, rewards=[0.0] * len(samples),
                        advantages=torch.randn(len(samples), generator=g).tolist())


def set_on_policy_logmu(chunks, batch, temperature):
    """log mu := the student's own log-probs at ``temperature`` (what the engine reports for a
    fresh sample): every ratio pi_theta/mu is ~1, so no token is IS-masked and a zero gradient
    can only come from a zero advantage."""
    from megatron_helpers import full_logits
    for s in batch.samples:
        full = torch.tensor([s.prompt_token_ids + s.token_ids])
        lp = torch.log_softmax(full_logits(chunks, full)[0, :, :VOCAB].double() / temperature, -1)
        P = len(s.prompt_token_ids)
        s.logprobs = lp[torch.arange(P - 1, P - 1 + len(s.token_ids)), torch.tensor(s.token_ids)].tolist()
    for c in chunks:
        c.train()


def teacher_equals_student(rank, world, tp, temps, stale_teacher_temperature=None):
    """Per temperature: the loss metrics and the largest |gradient| of one schedule pass, with
    the student's own chunks as the domain teacher scored by TeacherPool.score. With
    ``stale_teacher_temperature`` the teacher is scored at that temperature instead of T."""
    from megatron_helpers import build
    from mopd_megatron.config import LossConfig, OptimizerConfig
    from mopd_megatron.mcore.optimizer import wrap_ddp
    from mopd_megatron.mcore.schedule import forward_backward
    from mopd_megatron.teachers import Teacher, TeacherPool
    from mopd_megatron.trainer.microbatches import (Batching, ResponseSlots, build_microbatches,
                                                    fill_from_slots, per_domain_sums,
                                                    rollout_logp_slots)
    from mopd_megatron.trainer.objective import make_mopd_loss_fn
    layout, _, chunks = build(tiny_config("Qwen2ForCausalLM"), tp=tp)
    ddp = wrap_ddp(chunks, OptimizerConfig(distributed_optimizer=False))
    # The student's own chunks as the teacher (TeacherPool.build would freeze them: the trainer
    # builds teachers as separate models, here they must be the student's very weights).
    pool = TeacherPool([Teacher("self", ["d"], ddp, VOCAB)])
    loss_cfg = LossConfig(alpha=0.0)  # pure distillation: A_t is the teacher term alone
    report = {}
    for T in temps:
        batch = one_domain_batch()
        set_on_policy_logmu(chunks, batch, T)
        idx = list(range(len(batch)))
        slots = ResponseSlots(batch, idx)
        mbs = build_microbatches(batch, Batching(MBS).groups({}, idx), 0, slots=slots)
        t_teacher = T if stale_teacher_temperature is None else stale_teacher_temperature
        logp = pool.score(batch, idx, slots, Batching(MBS), pad_id=0, vocab_size=VOCAB,
                          temperature=t_teacher, layout=layout).logp
        fill_from_slots(mbs, "teacher_logp", logp)
        kl = per_domain_sums(batch, slots, rollout_logp_slots(batch, slots) - logp)
        for c in ddp:
            c.zero_grad_buffer()
        loss_fn = make_mopd_loss_fn(loss_cfg, loss_cfg.alpha, T, layout.tp_group_or_none)
        out = forward_backward(ddp, mbs, loss_fn, vocab_size=VOCAB, tp_rank=layout.tp_rank)
        tok = sum(float(m["response_tokens"]) for m in out)
        mean = {k: sum(float(m[k]) * float(m["response_tokens"]) for m in out) / tok
                for k in ("teacher_term_mean", "reverse_kl", "is_weight_mean")}
        grad = max(float(p.main_grad.abs().max()) for c in ddp for p in c.module.parameters())
        report[T] = dict(
            mean, tokens=tok, grad=grad, kl_sum=float(kl["d"][0]),
            term_std=max(float(m["teacher_term_std"]) for m in out),
            masked=sum(float(m["is_masked_frac"]) for m in out),
            loss=sum(float(m["loss_sum"]) for m in out))
    return report


def assert_invariant(r):
    assert r["tokens"] >= 10 and r["masked"] == 0.0        # every response token takes part
    assert r["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)  # and has w > 0
    # mean 0 and spread 0: log pi_dom - log pi_theta is exactly 0 on every token...
    assert r["teacher_term_mean"] == 0.0 and r["term_std"] == 0.0 and r["reverse_kl"] == 0.0
    # ... so A_t = 0 and, with alpha = 0, nothing reaches any parameter.
    assert r["loss"] == 0.0 and r["grad"] == 0.0
    # The pool's reverse-KL sum(log mu - log pi_dom) compares like with like too (log mu was
    # computed in float64 and stored as float32: rounding only).
    assert abs(r["kl_sum"]) < 1e-4


@pytest.mark.slow
def test_teacher_equal_to_student_gives_zero_advantage_at_any_temperature():
    report = run_ranks(teacher_equals_student, 1, 1, TEMPS)[0]
    for T in TEMPS:
        assert_invariant(report[T])


@pytest.mark.slow
def test_teacher_equal_to_student_zero_at_tp2():
    # The vocabulary-sharded path: both TP ranks scale their shard by 1/T before the
    # cross-rank log-sum-exp; the last stage's metrics are replicated over TP.
    reports = run_ranks(teacher_equals_student, 2, 2, (0.6,))
    for r in reports:
        assert_invariant(r[0.6])


@pytest.mark.slow
def test_teacher_at_temperature_one_breaks_the_invariant():
    # The old behaviour (teacher at T = 1, student and log mu at 0.6): the same self-teacher
    # then shows a spurious teacher term and a gradient. So the checks above can fail.
    r = run_ranks(teacher_equals_student, 1, 1, (0.6,), 1.0)[0][0.6]
    assert r["masked"] == 0.0
    assert abs(r["teacher_term_mean"]) > 1e-4 and r["term_std"] > 1e-2  # measured 0.0018, 0.11
    assert r["grad"] > 1e-3                                               # measured 0.046
    assert abs(r["kl_sum"]) > 1e-2                                        # measured 0.052


# --- the same invariant through Trainer.train_step (train.py wiring) -----------------------------

def trainer_step_with_self_teacher(rank, world, overrides):
    from mopd_megatron.config import load_recipe
    from mopd_megatron.train import Trainer
    from train_helpers import RECIPE
    trainer = Trainer(load_recipe(RECIPE, overrides))
    try:
        before = [p.detach().clone() for c in trainer.chunks for p in c.module.parameters()]
        m = trainer.train_step(1)
        moved = max(float((p - b).abs().max())
                    for b, p in zip(before, (p for c in trainer.chunks for p in c.module.parameters())))
        return {k: m.get(k) for k in ("adv/teacher_term_mean", "adv/teacher_term_std", "kl/all",
                                      "kl/self", "is/masked_frac", "optim/grad_norm", "loss",
                                      "tokens/response")} | {"moved": moved}
    finally:
        trainer.close()


@pytest.mark.slow
def test_trainer_step_with_self_teacher_is_a_no_op_at_temperature(tmp_path):
    from train_helpers import recipe_overrides, tiny_inputs
    tiny = tiny_inputs(tmp_path / "tiny")
    # One teacher for both domains, loaded from the student's own checkpoint; alpha = 0.
    teacher = (f"teachers=[{{name: self, domains: [caesar, reversal], format: megatron, "
               f"checkpoint: {tiny}/student/mcore, hf_config: {tiny}/student/hf}}]")
    over = recipe_overrides(tiny, tmp_path / "run", steps=1, extra=[
        teacher, "loss.alpha=0.0", "rollout.temperature=0.6", "checkpoint.dir=null"])
    m = run_ranks(trainer_step_with_self_teacher, 1, over, timeout=600)[0]
    assert m["tokens/response"] > 0 and m["is/masked_frac"] == 0.0
    assert m["adv/teacher_term_mean"] == 0.0 and m["adv/teacher_term_std"] == 0.0
    assert m["kl/all"] == 0.0 and m["loss"] == 0.0
    assert abs(m["kl/self"]) < 1e-4  # log mu (the engine's, at 0.6) against the teacher at 0.6
    assert m["optim/grad_norm"] == 0.0 and m["moved"] == 0.0


# --- truncated sampling is refused (log mu would be of the wrong distribution) ----------------

@pytest.mark.parametrize("kw, needle", [(dict(top_p=0.9), "top_p=0.9"), (dict(top_k=5), "top_k=5")])
def test_local_engine_refuses_truncated_sampling(kw, needle):
    from mopd_megatron.rollout.engine import SamplingParams
    from mopd_megatron.rollout.local import LocalEngine
    engine = LocalEngine([], vocab_size=VOCAB, eos_id=0, pad_id=0, seed=0)
    with pytest.raises(ValueError, match=rf"untruncated only .*{needle}.*truncated sampling is "
                                         r"not supported"):
        engine.generate([[1, 2, 3]], 2, SamplingParams(temperature=0.7, **kw))
    assert engine.calls == 0  # refused before it drew anything (resume state untouched)
