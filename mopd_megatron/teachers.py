"""The teacher pool: frozen Megatron teachers keyed by domain, scoring sampled responses.

Each teacher is built in the student's TP/PP layout (its own architecture and size), loaded
from its own checkpoint, and scores only the sequences of its domains, batched, through
Megatron's forward-only schedule and the ops' forward-only log-prob path (no graph, no saved
tensors). Results land where the student's loss needs them: the last pipeline stage.

    pool = TeacherPool.build(cfg.teachers, student_hf, layout_opts, load_weights)
    kl = pool.score(microbatches, domains, vocab_size, mbs, fixed_length,
                    temperature=T)                     # fills mb["teacher_logp"] in place

Offload (``teachers[].offload``): on CUDA the parameters move to pinned CPU memory between
scoring passes; on CPU there is nowhere to move them, so it is a no-op.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError, TeacherConfig

__all__ = ["Teacher", "TeacherPool", "check_teacher_vocab", "score_loss_fn"]

log = logging.getLogger(__name__)


def _tokenizer_vocab(path: str | None) -> dict[str, int] | None:
    """The vocabulary of the HF tokenizer in ``path``, or None when it holds none."""
    if path is None or not os.path.isdir(path):
        return None
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path).get_vocab()


def check_teacher_vocab(teachers: list[TeacherConfig], student_vocab_size: int,
                        student_tokenizer_vocab: dict[str, int] | None) -> None:
    """Refuse, before anything is built, a teacher whose vocabulary differs from the student's:
    its log-probs would be of other tokens. Compares the config's vocab_size, and the
    tokenizers' token -> id maps when the teacher's directory ships one."""
    from .models.hf_config import load_hf_config
    for i, t in enumerate(teachers):
        hf = load_hf_config(t.hf_config)
        if hf.vocab_size != student_vocab_size:
            raise ConfigError(f"teachers[{i}].hf_config", t.hf_config,
                              f"teacher {t.name!r} has vocab_size {hf.vocab_size}, the student "
                              f"{student_vocab_size}: MOPD needs the same tokenizer vocabulary")
        tv = _tokenizer_vocab(t.hf_config)
        if tv is not None and student_tokenizer_vocab is not None and tv != student_tokenizer_vocab:
            diff = sorted(set(tv.items()) ^ set(student_tokenizer_vocab.items()))[:5]
            raise ConfigError(f"teachers[{i}].hf_config", t.hf_config,
                              f"teacher {t.name!r} tokenizer differs from the student's "
                              f"(first differing (token, id) pairs: {diff})")


@dataclass
class Teacher:
    name: str
    domains: list[str]
    chunks: list             # this rank's GPTModel chunk(s), eval mode, requires_grad False
    vocab_size: int
    offload: bool = False

    def _move(self, device: torch.device) -> None:
        for c in self.chunks:
            for p in c.parameters():
                if p.device != device:
                    host = device.type == "cpu"
                    p.data = p.data.to(device, non_blocking=True)
                    if host and torch.cuda.is_available():
                        p.data = p.data.pin_memory()

    def onload(self, device: torch.device) -> None:
        if self.offload and device.type == "cuda":
            self._move(device)

    def offload_(self) -> None:
        if self.offload and torch.cuda.is_available():
            self._move(torch.device("cpu"))


def score_loss_fn(tp_group, temperature: float = 1.0):
    """Forward-only 'loss': the per-token log-probs of the targets at ``temperature`` (log
    softmax(logits / T), tempered exactly as the student's loss does), returned as metrics.
    T = 1 is the raw model (the parity probe compares with the engine at T = 1)."""
    from .ops import score_logprobs
    from .trainer.objective import tempered_logits

    def loss_fn(batch, logits):  # logits [b, s, V/tp]
        b, s, v = logits.shape
        logp = score_logprobs(tempered_logits(logits, temperature), batch["targets"].reshape(-1),
                              tp_group)
        zero = logits.new_zeros(())
        return zero, torch.ones((), dtype=torch.int, device=logits.device), {"logp": logp.view(b, s)}
    return loss_fn


class TeacherPool:
    """Domain -> frozen teacher."""

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers
        self.by_domain = {d: t for t in teachers for d in t.domains}

    @classmethod
    def build(cls, configs: list[TeacherConfig], build_chunks: Callable[[str], tuple],
              load_weights: Callable[[list, TeacherConfig, int], None]) -> "TeacherPool":
        """``build_chunks(hf_config_dir) -> (hf, chunks)`` in the current layout;
        ``load_weights(chunks, teacher_cfg, index)`` fills them from the checkpoint."""
        teachers = []
        for i, t in enumerate(configs):
            hf, chunks = build_chunks(t.hf_config)
            load_weights(chunks, t, i)
            for c in chunks:
                c.eval()
                c.requires_grad_(False)
            teacher = Teacher(t.name, list(t.domains), chunks, hf.vocab_size, t.offload)
            teacher.offload_()
            teachers.append(teacher)
        return cls(teachers)

    @torch.no_grad()
    def score(self, microbatches: list[dict], domains: list[str], vocab_size: int,
              micro_batch_size: int, fixed_length: bool, *,
              temperature: float, layout) -> dict[str, torch.Tensor]:
        """Fill ``mb["teacher_logp"]`` of the student's micro-batches (last pipeline stage).

        ``layout`` (runtime.Layout): this rank's TP group and rank.
        ``temperature``: the one log pi_theta and log mu are taken at (rollout.temperature);
        log pi_dom is log softmax(logits / T), so a teacher equal to the student gives A = 0.

        ``domains[i]`` is the domain of rollout-batch sequence i (``mb["index"]`` rows). Each
        teacher sees only its domains' rows, regrouped into micro-batches of
        ``micro_batch_size`` (the last one padded by repeating a row). Returns per-domain sums
        for the reverse-KL estimate: {domain: tensor([sum(log mu - log pi_dom), tokens])}.
        """
        from .runtime import device
        from .mcore.schedule import forward_backward
        tp_group = layout.tp_group_or_none
        rows = [(m, r) for m, mb in enumerate(microbatches) for r in range(len(mb["index"]))]
        kl: dict[str, torch.Tensor] = {}
        for teacher in self.teachers:
            mine = [(m, r) for m, r in rows if domains[microbatches[m]["index"][r]] in teacher.domains]
            if not mine:
                continue
            teacher.onload(device())
            for lo in range(0, len(mine), micro_batch_size):
                group = mine[lo:lo + micro_batch_size]
                padded = group + [group[-1]] * (micro_batch_size - len(group))
                length = microbatches[0]["tokens"].shape[1] if fixed_length else \
                    max(microbatches[m]["tokens"].shape[1] for m, _ in group)
                mb = {k: _stack([microbatches[m][k][r] for m, r in padded], length)
                      for k in ("tokens", "targets")}
                mb["position_ids"] = torch.arange(length, device=mb["tokens"].device).expand_as(mb["tokens"])
                out = forward_backward(teacher.chunks, [mb], score_loss_fn(tp_group, temperature),
                                       vocab_size=vocab_size, tp_rank=layout.tp_rank,
                                       forward_only=True)
                if not out:
                    continue  # not the last pipeline stage: nothing to fill here
                logp = out[0]["logp"]  # [b, length]
                for j, (m, r) in enumerate(group):
                    dst = microbatches[m]
                    s = dst["tokens"].shape[1]
                    mask = dst["loss_mask"][r]
                    dst["teacher_logp"][r] = torch.where(mask > 0, logp[j, :s], 0.0)
                    dom = domains[dst["index"][r]]
                    acc = kl.setdefault(dom, torch.zeros(2, dtype=torch.float64))
                    acc[0] += float(((dst["rollout_logp"][r] - dst["teacher_logp"][r]) * mask).sum())
                    acc[1] += float(mask.sum())
            teacher.offload_()
        return kl


def _stack(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """[b, length] from 1-d rows of possibly different lengths, right-padded with id 0."""
    out = rows[0].new_zeros((len(rows), length))
    for i, r in enumerate(rows):
        n = min(len(r), length)
        out[i, :n] = r[:n]
    return out
