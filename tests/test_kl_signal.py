"""loss.signal = full_vocab | topk: the trainer's KL objective (trainer/objective.py::kl_objective)
against a float64 reference written here, forward and backward.

    l_t = w_t KL_t(pi_theta || pi_dom) - alpha w_t A_ORM log pi_theta(y_t),
    loss = mean over sequences of (1/|y|) sum_t l_t          (seq_mean)

with w_t the IcePop weight of the sampled token. The teachers' signal is what TeacherPool.score
leaves: final hidden states and LM-head shards (full_vocab), or top-k ids and log-probs (topk).
Tolerances: fp32 op vs float64 formula, 1e-5 relative on the loss and on the logits' gradient.
The layouts (TP=2, PP=2 against TP=1) run the whole trainer: tests/test_train_layouts.py.
"""
from __future__ import annotations

import pytest
import torch

V, H, T_SEQ = 37, 8, 3          # vocabulary (odd: one padding column below), hidden, sequences
EPS_LOW, EPS_HIGH, ALPHA, TEMP = 0.5, 2.0, 0.3, 0.8


def _inputs(seed=0, same_teacher=False):
    """A micro-batch of three sequences in one packed row, two teachers (by sequence)."""
    from mopd_megatron.teachers import TeacherSignal
    g = torch.Generator().manual_seed(seed)
    lengths, resp = [7, 5, 9], [4, 2, 6]
    T = sum(lengths)
    mask = torch.zeros(T)
    seq = torch.zeros(T, dtype=torch.long)
    pos, start = [], 0
    for i, (n, r) in enumerate(zip(lengths, resp)):
        seq[start:start + n] = i
        p = n - r
        mask[start + p - 1:start + p - 1 + r] = 1
        pos += list(range(start + p - 1, start + p - 1 + r))
        start += n
    resp_pos = torch.tensor(pos)
    resp_slot = torch.arange(len(pos))
    heads = [torch.randn(V + 1, H, generator=g) for _ in range(2)]
    hidden = torch.randn(len(pos), H, generator=g)
    teacher_of_slot = (seq[resp_pos] >= 1).long()          # sequence 0: teacher 0, else 1
    student_hidden = torch.randn(T, H, generator=g)
    if same_teacher:  # the student's logits are the teacher's: KL = 0 everywhere
        student_hidden[resp_pos] = hidden
        heads[1] = heads[0]
    logits = (student_hidden @ heads[0].t()).requires_grad_(False)
    logits[:, V:] = float("-inf")                           # padding, as mask_padded_vocab_ does
    logp_true = torch.log_softmax(logits[:, :V].double() / TEMP, -1)
    targets = torch.randint(0, V, (T,), generator=g)
    lp_y = logp_true.gather(1, targets[:, None]).squeeze(1)
    rollout = (lp_y + torch.empty(T).uniform_(-1.2, 1.2, generator=g).double()).float()
    adv = torch.randn(T_SEQ, generator=g)[seq]
    sig = TeacherSignal("full_vocab", torch.zeros(len(pos)), hidden=hidden,
                        teacher_of_slot=teacher_of_slot, heads=heads,
                        kl=torch.full((len(pos),), float("nan")))
    batch = dict(loss_mask=mask[None], targets=targets[None], rollout_logp=rollout[None],
                 orm_adv=adv[None] * mask[None], seq_ids=seq[None], resp_pos=resp_pos,
                 resp_slot=resp_slot, signal=sig)
    return batch, logits[None], sig


def _reference(batch, logits, teacher_logits):
    """float64: the loss and d loss / d logits, written from the formula."""
    x = logits[0].double().clone().requires_grad_(True)
    mask = batch["loss_mask"][0] > 0
    a = x[:, :V] / TEMP
    lp = torch.log_softmax(a, -1)
    lq = torch.log_softmax(teacher_logits[:, :V].double() / TEMP, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    logp = lp.gather(1, batch["targets"][0][:, None]).squeeze(1)
    ratio = torch.exp(logp.detach() - batch["rollout_logp"][0].double())
    w = torch.where((ratio >= EPS_LOW) & (ratio <= EPS_HIGH), ratio, 0.0)
    seq = batch["seq_ids"][0]
    loss = x.new_zeros(())
    for s in seq[mask].unique():
        on = mask & (seq == s)
        per = w[on] * kl[on] - ALPHA * w[on] * batch["orm_adv"][0][on].double() * logp[on]
        loss = loss + per.sum() / on.sum()
    loss = loss / len(seq[mask].unique())
    loss.backward()
    return float(loss), x.grad


def _teacher_logits(batch, sig, T):
    out = torch.zeros(T, V + 1)
    for p, s in zip(batch["resp_pos"].tolist(), batch["resp_slot"].tolist()):
        out[p] = sig.hidden[s] @ sig.heads[int(sig.teacher_of_slot[s])].t()
    return out


def _run(batch, logits, signal, alpha=ALPHA):
    from mopd_megatron.config import LossConfig
    from mopd_megatron.trainer.objective import make_mopd_loss_fn
    cfg = LossConfig(alpha=alpha, eps_low=EPS_LOW, eps_high=EPS_HIGH, signal=signal, topk=V)
    fn = make_mopd_loss_fn(cfg, alpha, TEMP, None, vocab_size=V)
    x = logits.clone().requires_grad_(True)
    loss_sum, count, m = fn(batch, x)
    (loss_sum / count).backward()
    return float(loss_sum / count), x.grad[0], m


def test_full_vocab_loss_and_gradient_match_float64_reference():
    batch, logits, sig = _inputs()
    ref_loss, ref_grad = _reference(batch, logits, _teacher_logits(batch, sig, logits.shape[1]))
    loss, grad, m = _run(batch, logits, "full_vocab")
    assert m["is_masked_frac"] > 0                        # some tokens outside the band
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    scale = float(ref_grad[:, :V].abs().max())
    assert float((grad[:, :V].double() - ref_grad[:, :V]).abs().max()) <= 1e-5 * scale
    assert float(grad[:, V:].abs().max()) == 0.0          # padding column: no gradient
    off = batch["loss_mask"][0] == 0
    assert float(grad[off].abs().max()) == 0.0            # prompt tokens: no gradient
    assert not torch.isnan(sig.kl).any()                  # every slot's exact KL recorded


def test_topk_with_the_whole_vocabulary_equals_full_vocab():
    from mopd_megatron.teachers import vocab_parallel_topk
    batch, logits, sig = _inputs(1)
    teacher = _teacher_logits(batch, sig, logits.shape[1])
    teacher[:, V:] = float("-inf")
    ids, lq = vocab_parallel_topk(teacher[batch["resp_pos"]] / TEMP, V, None)
    sig.kind, sig.topk_ids, sig.topk_logp = "topk", ids, lq
    sig.kl = torch.full_like(sig.kl, float("nan"))
    ref_loss, ref_grad = _reference(batch, logits, teacher)
    loss, grad, _ = _run(batch, logits, "topk")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    scale = float(ref_grad[:, :V].abs().max())
    assert float((grad[:, :V].double() - ref_grad[:, :V]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("signal", ["full_vocab", "topk"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(signal):
    from mopd_megatron.teachers import vocab_parallel_topk
    batch, logits, sig = _inputs(2, same_teacher=True)
    if signal == "topk":
        t = logits[0][batch["resp_pos"]] / TEMP
        sig.kind, (sig.topk_ids, sig.topk_logp) = "topk", vocab_parallel_topk(t, V, None)
    loss, grad, m = _run(batch, logits, signal, alpha=0.0)
    assert abs(loss) < 1e-6 and float(grad.abs().max()) < 1e-6
    assert abs(float(m["reverse_kl"])) < 1e-6
