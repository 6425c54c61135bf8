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

__all__ = ["Teacher", "TeacherPool", "TeacherSignal", "check_teacher_vocab", "score_loss_fn",
           "lm_head_weight"]

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


def score_loss_fn(tp_group, temperature: float = 1.0, topk: int | None = None):
    """Forward-only 'loss': the per-token log-probs of the targets at ``temperature`` (log
    softmax(logits / T), tempered exactly as the student's loss does), returned as metrics.
    T = 1 is the raw model (the parity probe compares with the engine at T = 1).
    ``topk``: also the teacher's top-k ids and log-probs at the batch's response positions
    (``resp_pos``), for loss.signal=topk."""
    from .ops import score_logprobs
    from .trainer.objective import tempered_logits

    def loss_fn(batch, logits):  # logits [b, s, V/tp]
        b, s, v = logits.shape
        flat = tempered_logits(logits, temperature)
        logp = score_logprobs(flat, batch["targets"].reshape(-1), tp_group)
        out = {"logp": logp.view(b, s)}
        if topk is not None:
            out["topk_ids"], out["topk_logp"] = vocab_parallel_topk(flat[batch["resp_pos"]],
                                                                    topk, tp_group)
        zero = logits.new_zeros(())
        return zero, torch.ones((), dtype=torch.int, device=logits.device), out
    return loss_fn


def vocab_parallel_topk(logits: torch.Tensor, k: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of vocab-parallel rows [T, V/tp] (padding already -inf): global ids [T, k]
    and log-probs [T, k] (fp32). Each rank's own top-k and log-sum-exp are all-gathered over
    the TP group: O(T x k x tp) exchanged, never a row of the full vocabulary."""
    import torch.distributed as dist
    x = logits.float()
    v_local = x.shape[1]
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vals, ids = x.topk(min(k, v_local), dim=1)                       # [T, k']
    ids = ids + rank * v_local
    lse = torch.logsumexp(x, dim=1, keepdim=True)                    # [T, 1]
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if size > 1:
        parts = [torch.empty_like(t) for t in (vals, ids, lse) for _ in range(size)]
        for j, t in enumerate((vals, ids, lse)):
            dist.all_gather(parts[j * size:(j + 1) * size], t.contiguous(), group=tp_group)
        vals, ids = torch.cat(parts[:size], 1), torch.cat(parts[size:2 * size], 1)
        lse = torch.logsumexp(torch.cat(parts[2 * size:], 1), dim=1, keepdim=True)
        vals, j = vals.topk(min(k, vals.shape[1]), dim=1)
        ids = ids.gather(1, j)
    return ids, vals - lse


def lm_head_weight(chunk) -> torch.Tensor:
    """This rank's shard [V/tp, hidden] of a last-stage model chunk's LM head."""
    from .mcore.optimizer import unwrap_ddp
    m = unwrap_ddp(chunk)
    return m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights \
        else m.output_layer.weight


@dataclass
class TeacherSignal:
    """What the teachers leave for the student's loss, per response slot of this rank
    (trainer/microbatches.py), on the last pipeline stage.

    ``logp`` [S]: log pi_dom(y_t), always (the sampled signal and the kl_sampled metric).
    full_vocab: ``hidden`` [S, H] the teachers' final normed hidden states (the LM head's
    input), ``teacher_of_slot`` [S] and ``heads`` (each teacher's LM-head shard [V/tp, H]): the
    loss makes the teacher logits chunk by chunk from them, so O(S x H) is held, not
    O(S x V/tp). topk: ``topk_ids``/``topk_logp`` [S, k], O(S x k). ``kl`` [S]: the exact KL
    the loss measured at each slot's first pass (NaN until then), for the kl/<teacher> metric.
    """

    kind: str
    logp: torch.Tensor
    hidden: torch.Tensor | None = None
    teacher_of_slot: torch.Tensor | None = None
    heads: list | None = None
    topk_ids: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def teacher_rows(self, slot_of_pos: torch.Tensor, dtype: torch.dtype):
        """``reverse_kl``'s teacher callable for one micro-batch: rows [a, b) of its flat
        positions -> teacher logits [b - a, V/tp] (zeros where no response token is)."""
        def rows(a: int, b: int) -> torch.Tensor:
            sl = slot_of_pos[a:b]
            valid = sl >= 0
            h = self.hidden[sl.clamp(min=0)]
            tid = self.teacher_of_slot[sl.clamp(min=0)]
            out = h.new_zeros((b - a, self.heads[0].shape[0]), dtype=dtype)
            for t, w in enumerate(self.heads):
                sel = valid & (tid == t)
                if w is not None and bool(sel.any()):
                    out[sel] = (h[sel] @ w.t()).to(dtype)
            return out
        return rows


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
              vocab_size: int, temperature: float, layout, packed_format: str = "mask",
              signal: str = "sampled", topk: int = 64) -> "TeacherSignal | None":
        """The teachers' signal for every response token of ``indices`` (this rank's
        sequences), in ``slots``' numbering (trainer/microbatches.py), on the last pipeline
        stage; None on the other stages.

        ``layout`` (runtime.Layout): this rank's TP group and rank.
        ``temperature``: the one log pi_theta and log mu are taken at (rollout.temperature);
        log pi_dom is log softmax(logits / T), so a teacher equal to the student gives A = 0.
        ``signal`` (loss.signal): what is kept besides log pi_dom(y_t) (TeacherSignal).

        Each teacher scores the sequences of its domains in one forward-only schedule call,
        grouped by ``batching`` like the student's (token budget, packing), so that with PP
        its micro-batches fill the pipeline instead of running one at a time.
        """
        from .mcore.schedule import forward_backward
        from .runtime import device
        from .trainer.microbatches import build_microbatches, seq_len
        dev = device()
        sig = TeacherSignal(signal, torch.zeros(slots.total, device=dev))
        if signal == "full_vocab":
            sig.teacher_of_slot = torch.zeros(slots.total, dtype=torch.long, device=dev)
            sig.heads = [None] * len(self.teachers)
        lengths = {i: seq_len(batch, i) for i in indices}
        last = None
        for t_index, teacher in enumerate(self.teachers):
            mine = [i for i in indices if batch.domain(i) in teacher.domains]
            if not mine:
                continue
            mbs = build_microbatches(batch, batching.groups(lengths, mine, whole=False), pad_id,
                                     slots=slots, packed=batching.packed,
                                     pad_multiple=batching.pad_multiple, device=dev)
            teacher.onload(dev)
            captured, hook = [], None
            if signal == "full_vocab" and layout.is_last_stage:
                head = unwrap_last(teacher.chunks)
                hook = head.output_layer.register_forward_hook(
                    lambda mod, args, out: captured.append(_gathered_hidden(head, args[0])))
            try:
                res = forward_backward(teacher.chunks, mbs,
                                       score_loss_fn(layout.tp_group_or_none, temperature,
                                                     topk if signal == "topk" else None),
                                       vocab_size=vocab_size, tp_rank=layout.tp_rank,
                                       forward_only=True, packed_format=packed_format)
            finally:
                if hook is not None:
                    hook.remove()
            last = bool(res)
            for j, (mb, r) in enumerate(zip(mbs, res)):  # last stage: one per micro-batch, in order
                slot = mb["resp_slot"]
                sig.logp[slot] = r["logp"].reshape(-1)[mb["resp_pos"]].float()
                if signal == "topk":
                    if sig.topk_ids is None:
                        k = r["topk_ids"].shape[1]
                        sig.topk_ids = torch.zeros(slots.total, k, dtype=torch.long, device=dev)
                        sig.topk_logp = torch.full((slots.total, k), -1.0, device=dev)
                    sig.topk_ids[slot], sig.topk_logp[slot] = r["topk_ids"], r["topk_logp"]
                if signal == "full_vocab":
                    h = captured[j]                             # [b*s, H]
                    if sig.hidden is None:
                        sig.hidden = h.new_zeros((slots.total, h.shape[1]))
                    sig.hidden[slot] = h[mb["resp_pos"]]
                    sig.teacher_of_slot[slot] = t_index
            if signal == "full_vocab" and last:
                sig.heads[t_index] = lm_head_weight(teacher.chunks[-1]).detach()
            teacher.offload_()  # (full_vocab on CUDA: the head shard stays referenced)
        if signal != "sampled":
            sig.kl = torch.full((slots.total,), float("nan"), device=dev)
        return sig if last or (last is None and layout.is_last_stage) else None


def unwrap_last(chunks):
    from .mcore.optimizer import unwrap_ddp
    return unwrap_ddp(chunks[-1])


def _gathered_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's input [s(/tp), b, H] -> [b*s, H] in the micro-batch's flat order; with
    sequence parallelism the sequence shards are gathered first (the head gathers them itself)."""
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
        hidden = gather_from_sequence_parallel_region(hidden)
    s, b, h = hidden.shape
    return hidden.detach().transpose(0, 1).reshape(b * s, h)
