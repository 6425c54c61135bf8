"""The teacher pool: frozen Megatron teachers keyed by domain, scoring sampled responses.

Each teacher is built in the student's TP/PP layout (its own architecture and size), loaded
from its own checkpoint, and scores only the sequences of its domains, batched, through
Megatron's forward-only schedule and the ops' forward-only log-prob path (no graph, no saved
tensors). Results land where the student's loss needs them: the last pipeline stage.

    pool = TeacherPool.build(cfg.teachers, build_chunks, load_weights)
    logp = pool.score(batch, my_sequences, slots, batching, pad_id=..., vocab_size=...,
                      temperature=T, layout=layout)   # [response tokens] (last stage)

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
    def score(self, batch, indices: list[int], slots, batching, *, pad_id: int,
              vocab_size: int, temperature: float, layout,
              packed_format: str = "mask") -> torch.Tensor | None:
        """log pi_dom of every response token of ``indices`` (this rank's sequences), as a
        flat [slots.total] tensor in ``slots``' numbering (trainer/microbatches.py), on the
        last pipeline stage; None on the other stages.

        ``layout`` (runtime.Layout): this rank's TP group and rank.
        ``temperature``: the one log pi_theta and log mu are taken at (rollout.temperature);
        log pi_dom is log softmax(logits / T), so a teacher equal to the student gives A = 0.

        Each teacher scores the sequences of its domains in one forward-only schedule call,
        grouped by ``batching`` like the student's (token budget, packing), so that with PP
        its micro-batches fill the pipeline instead of running one at a time.
        """
        from .mcore.schedule import forward_backward
        from .runtime import device
        from .trainer.microbatches import build_microbatches, seq_len
        dev = device()
        out = torch.zeros(slots.total, device=dev)
        lengths = {i: seq_len(batch, i) for i in indices}
        last = None
        for teacher in self.teachers:
            mine = [i for i in indices if batch.domain(i) in teacher.domains]
            if not mine:
                continue
            mbs = build_microbatches(batch, batching.groups(lengths, mine, whole=False), pad_id,
                                     slots=slots, packed=batching.packed,
                                     pad_multiple=batching.pad_multiple, device=dev)
            teacher.onload(dev)
            res = forward_backward(teacher.chunks, mbs,
                                   score_loss_fn(layout.tp_group_or_none, temperature),
                                   vocab_size=vocab_size, tp_rank=layout.tp_rank,
                                   forward_only=True, packed_format=packed_format)
            teacher.offload_()
            last = bool(res)
            for mb, r in zip(mbs, res):  # the last stage: one result per micro-batch, in order
                out[mb["resp_slot"]] = r["logp"].reshape(-1)[mb["resp_pos"]].float()
        return out if last or (last is None and layout.is_last_stage) else None
