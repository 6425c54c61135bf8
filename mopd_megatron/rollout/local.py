"""Sampling from a Megatron model in the trainer process: greedy evaluation of student and
teachers, and ``LocalEngine``, a RolloutEngine for runs without SGLang (the CPU demo).

No KV cache: every new token re-runs the forward over the whole (right-padded) batch. Causal
attention makes padding after a sequence invisible to it, so each row's last real position
gives its next-token logits. Fine for the demo's ~20-token sequences; not a production sampler.
Pipeline parallelism is not supported here (a sampler would need the schedule's p2p).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .engine import NamedTensorBucket, RolloutEngine, Sample, SamplingParams

__all__ = ["sample_tokens", "LocalEngine"]


def _full_vocab_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, V_padded] logits gathered over TP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    out = model(tokens, pos, attention_mask=None)  # [b, s, V/tp]
    if ps.get_tensor_model_parallel_world_size() > 1:
        out = gather_from_tensor_model_parallel_region(out)
    return out


@torch.no_grad()
def sample_tokens(chunks: list, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float, eos_id: int, vocab_size: int, pad_id: int = 0,
                  generator: torch.Generator | None = None, batch_size: int = 256,
                  ) -> list[tuple[list[int], list[float], str]]:
    """(response ids, log-probs at ``temperature``, finish reason) per prompt.

    temperature 0 is greedy (log-probs then at temperature 1). Every TP rank must pass the same
    ``generator`` state so that all ranks draw the same tokens.
    """
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("in-trainer sampling needs parallel.pp=1 (use the sglang engine)")
    model = chunks[0]
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    results = []
    try:
        for lo in range(0, len(prompts), batch_size):
            results += _sample_block(model, prompts[lo:lo + batch_size], max_new_tokens,
                                     temperature, eos_id, vocab_size, pad_id, generator, dev)
    finally:
        model.train(was_training)
    return results


def _sample_block(model, prompts, max_new, temperature, eos_id, vocab_size, pad_id, gen, dev):
    seqs = [list(p) for p in prompts]
    toks: list[list[int]] = [[] for _ in prompts]
    lps: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        lens = torch.tensor([len(seqs[i]) for i in active])
        tokens = torch.full((len(active), int(lens.max())), pad_id, dtype=torch.long)
        for r, i in enumerate(active):
            tokens[r, :len(seqs[i])] = torch.tensor(seqs[i])
        logits = _full_vocab_logits(model, tokens.to(dev))  # [b, s, V_padded]
        last = logits[torch.arange(len(active)), (lens - 1).to(dev), :vocab_size].float().cpu()
        if temperature > 0:
            logp = torch.log_softmax(last / temperature, dim=-1)  # [b, V]
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        else:
            logp = torch.log_softmax(last, dim=-1)
            nxt = logp.argmax(dim=-1)
        chosen = logp.gather(1, nxt[:, None]).squeeze(1)
        for r, i in enumerate(active):
            t = int(nxt[r])
            seqs[i].append(t)
            toks[i].append(t)
            lps[i].append(float(chosen[r]))
            if t == eos_id:
                done[i] = True
    return [(t, lp, "stop" if d else "length") for t, lp, d in zip(toks, lps, done)]


class InProcessEngine(RolloutEngine):
    """Engine without servers: no memory to release, nothing to abort or shut down; its only
    state is how many ``generate`` calls it has served (checkpointed for exact resume)."""

    health_name = "in-process"
    calls = 0
    version = "default"

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def update_weights(self, named_tensor_buckets: Iterable[NamedTensorBucket], version: str) -> None:
        self.version = version

    def release_memory(self) -> None:
        pass

    def resume_memory(self) -> None:
        pass

    def health(self) -> dict[str, bool]:
        return {self.health_name: True}

    def abort(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class LocalEngine(InProcessEngine):
    """The student samples its own rollouts inside the trainer (rollout.engine=local).

    log mu is the student's own log-prob at sampling time, so fresh samples have ratio 1 up
    to the forward's numerical noise. Sampling draws from a generator seeded by (seed, call
    number): ``state_dict`` holds the call number, so a resumed run draws what the
    uninterrupted run would have. Every rank calls ``generate`` (TP ranks share the forward).
    """

    collective = True          # every rank takes part in generate()
    needs_weight_sync = False  # it samples from the trainer's live weights
    health_name = "local"

    def __init__(self, chunks: list, *, vocab_size: int, eos_id: int, pad_id: int, seed: int):
        self.chunks, self.vocab_size, self.eos_id, self.pad_id = chunks, vocab_size, eos_id, pad_id
        self.seed, self.calls, self.version = seed, 0, "local"

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        # It samples the full tempered distribution; silently ignoring a truncation would hand
        # back samples (and log mu) of another distribution than the one asked for.
        if sampling.top_p != 1.0 or sampling.top_k != -1:
            raise ValueError(
                f"LocalEngine samples untruncated only (top_p=1, top_k=-1), got top_p="
                f"{sampling.top_p}, top_k={sampling.top_k}: MOPD's importance weight "
                "pi_theta/mu needs log mu of the distribution the tokens were drawn from, and "
                "truncated sampling is not supported (see rollout.top_p)")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        flat = [list(p) for p in prompts_token_ids for _ in range(n)]
        out = sample_tokens(self.chunks, flat, max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, eos_id=self.eos_id,
                            vocab_size=self.vocab_size, pad_id=self.pad_id, generator=gen)
        return [Sample(k // n, k % n, flat[k], t, lp, reason, self.version)
                for k, (t, lp, reason) in enumerate(out)]

