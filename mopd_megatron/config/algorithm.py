"""What is learned from: data, rewards, the MOPD loss and the optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .base import ConfigError, check, doc

__all__ = ["DataConfig", "VerifierSpec", "RewardConfig", "LossConfig", "OptimizerConfig"]


@dataclass
class DataConfig:
    """Prompt datasets. Each row has a ``domain``, a ``prompt`` (string) or ``messages`` (chat
    list), and whatever fields its domain's verifier needs (``answer``, ``tests``, ...)."""

    SECTION: ClassVar[str] = "data"

    paths: list[str] = doc(help="Prompt files (.jsonl or .parquet), read in order.")
    domain_weights: dict[str, float] = doc(
        help="Sampling weight per domain; the keys are the run's domains (each needs a teacher "
             "and a verifier). Weights are normalised.")
    chat_template: bool = doc(
        True, "Render prompts with the tokenizer's chat template (add_generation_prompt=True); "
              "false tokenizes the prompt string as is.")
    bad_rows: Literal["skip", "fail"] = doc(
        "fail", "What a malformed row does: fail (error naming file:line) or skip (reported, counted).")
    max_prompt_len: int = doc(1024, "Prompts longer than this many tokens are bad rows. Responses "
                                    "are bounded by rollout.max_new_tokens.")
    seed: int = doc(0, "Seed of the domain-weighted sampler (independent of train.seed).")
    eval_paths: list[str] = doc(
        help="Held-out prompt files: greedy per-domain accuracy of the student before and after "
             "training (on the rollout engine; in the trainer with rollout.engine=local), and of "
             "each teacher on its domains before training (in the trainer: parallel.pp = 1 only; "
             "otherwise reported as not measured). The dry-runs print the eval line. Empty: no eval.",
        factory=list)
    build_demo_inputs: bool = doc(
        False, "Build the embedded demo's tokenizer, prompts, teachers and student with "
               "tools/build_demo_teachers.py into the directory the recipe's paths point at "
               "(model.hf_config must be `<dir>/student/hf`), when missing or built with other "
               "settings; `mopd train` does it before start-up. True in recipes/tiny_cpu.yaml.")

    def __post_init__(self):
        for p in self.eval_paths:
            if not p.endswith((".jsonl", ".parquet")):
                raise ConfigError("data.eval_paths", p, "unsupported file type (use .jsonl or .parquet)")
        check(len(self.paths) > 0, self, "paths", "list at least one .jsonl or .parquet file")
        for p in self.paths:
            if not p.endswith((".jsonl", ".parquet")):
                raise ConfigError("data.paths", p, "unsupported file type (use .jsonl or .parquet)")
        check(len(self.domain_weights) > 0, self, "domain_weights", "name at least one domain")
        for dom, w in self.domain_weights.items():
            if not w > 0:
                raise ConfigError(f"data.domain_weights.{dom}", w, "weights must be > 0 "
                                  "(drop the domain instead of giving it weight 0)")
        check(self.max_prompt_len > 0, self, "max_prompt_len", "must be > 0")
        check(self.seed >= 0, self, "seed", "must be >= 0")


@dataclass
class VerifierSpec:
    """A verifier from the rewards registry (``type``) and its keyword arguments (``params``)."""

    SECTION: ClassVar[str] = "reward.verifiers[]"

    type: str = doc(help="Verifier name in the rewards registry (e.g. exact_match, math, code).")
    params: dict[str, Any] = doc(help="Keyword arguments passed to the verifier.", factory=dict)

    def __post_init__(self):
        check(bool(self.type), self, "type", "name a verifier")


@dataclass
class RewardConfig:
    """Outcome rewards (ORM) per domain and the GRPO advantage A_ORM made from them (its
    weight in the MOPD advantage is ``loss.alpha``)."""

    SECTION: ClassVar[str] = "reward"

    verifiers: dict[str, VerifierSpec] = doc(help="Verifier per data domain.")
    grpo_std_normalize: bool = doc(True, "Divide the group advantage by the group's reward std.")
    workers: int = doc(
        4, "Verifier threads on global rank 0 (and math-verify processes per math verifier). "
           "They score a rollout batch while the teachers score it; the rewards are needed "
           "only at the student's loss.")

    def __post_init__(self):
        check(self.workers >= 1, self, "workers", "must be >= 1")


@dataclass
class LossConfig:
    """The MOPD surrogate: importance weighting of off-policy tokens and aggregation.

    Default bounds [eps_low, eps_high] = [0.5, 5.0]: IcePop's published defaults (alpha=0.5,
    beta=5, inclusionAI Ring-1T / "IcePop" write-up), the token-level mask the MiMo-V2-Flash
    report (s4.4) applies to the train/rollout ratio. Tokens whose ratio pi_theta/mu leaves the
    band get w_t = 0 (no gradient), instead of being clipped.
    """

    SECTION: ClassVar[str] = "loss"

    alpha: float = doc(
        1.0, "Weight of the GRPO outcome advantage: A_t = sg[log pi_dom - log pi_theta] + "
             "alpha * A_ORM. 0 is pure distillation (no reward needed beyond metrics).")
    eps_low: float = doc(0.5, "Lower bound of the accepted ratio pi_theta/mu (IcePop: 0.5).")
    eps_high: float = doc(5.0, "Upper bound of the accepted ratio pi_theta/mu (IcePop: 5).")
    is_variant: Literal["icepop", "tis", "none"] = doc(
        "icepop", "icepop: w=ratio inside [eps_low, eps_high] else 0; tis: w=min(ratio, tis_cap); "
                  "none: w=1 (pure on-policy assumption).")
    tis_cap: float = doc(2.0, "Truncation cap C of truncated importance sampling (is_variant=tis).")
    aggregation: Literal["seq_mean", "token_mean"] = doc(
        "seq_mean", "seq_mean: mean over sequences of (1/|y|) sum_t (MOPD paper); token_mean: "
                    "mean over all tokens of the batch.")
    log_entropy: bool = doc(False, "Report the student's token entropy (one extra pass over logits).")
    signal: Literal["sampled", "full_vocab", "topk"] = doc(
        "sampled", "The teacher signal. sampled: A_t = sg[log pi_dom(y_t) - log pi_theta(y_t)] + "
                   "alpha A_ORM (MiMo eq. 7-9). full_vocab: at each response position the exact "
                   "reverse KL(pi_theta || pi_dom) over the vocabulary, loss = mean over sequences "
                   "of (1/|y|) sum_t w_t (KL_t - alpha A_ORM log pi_theta(y_t)); the teachers "
                   "keep their final hidden states (O(tokens x hidden)) and their LM-head shard "
                   "is applied at the loss, chunk by chunk. topk: the same KL over the teacher's "
                   "top-k tokens plus one tail bucket (keeps O(tokens x k)).")
    topk: int = doc(64, "k of signal=topk: teacher tokens kept per position.")

    def __post_init__(self):
        check(self.alpha >= 0, self, "alpha", "must be >= 0")
        check(self.topk >= 1, self, "topk", "must be >= 1")
        check(self.eps_low >= 0, self, "eps_low", "must be >= 0")
        # Ratio 1 (exactly on-policy) must always be accepted, or fresh samples would be masked.
        check(self.eps_low <= 1.0, self, "eps_low", "must be <= 1 so ratio 1 is never masked")
        check(self.eps_high >= 1.0, self, "eps_high", "must be >= 1 so ratio 1 is never masked")
        check(self.eps_low < self.eps_high, self, "eps_high", "must be > loss.eps_low")
        check(self.tis_cap > 0, self, "tis_cap", "must be > 0")


@dataclass
class OptimizerConfig:
    """Adam(W) through Megatron's optimizer, and the learning-rate schedule."""

    SECTION: ClassVar[str] = "optimizer"

    lr: float = doc(1e-6, "Peak learning rate.")
    min_lr: float = doc(0.0, "Floor of the decaying schedules.")
    betas: tuple[float, float] = doc((0.9, 0.98), "Adam betas (beta1, beta2).")
    eps: float = doc(1e-8, "Adam epsilon.")
    weight_decay: float = doc(0.0, "Decoupled weight decay.")
    clip_grad: float = doc(1.0, "Global gradient-norm clip; 0 disables clipping.")
    warmup_steps: int = doc(0, "Linear warm-up length in optimizer steps.")
    schedule: Literal["constant", "cosine", "linear", "wsd"] = doc(
        "constant", "Decay after warm-up, to min_lr at the last optimizer step. wsd "
                    "(warm-up, stable, decay): constant at lr, then linear to min_lr over the "
                    "last optimizer.decay_fraction of the steps.")
    decay_fraction: float = doc(
        0.2, "schedule: wsd only: the share of the optimizer steps, at the end, over which "
             "the learning rate decays.")
    steps_per_rollout: int = doc(
        1, "Optimizer steps per rollout batch; the rollout batch (train.prompts_per_step x "
           "rollout.n_samples_per_prompt) is split into this many global batches.")
    epochs_per_rollout: int = doc(
        1, "Passes over each rollout batch (steps_per_rollout optimizer steps each). Passes after "
           "the first are off-policy: the teacher scores are reused, log pi_theta and w = "
           "pi_theta/mu are recomputed, and the IS mask drops tokens the student has moved "
           "away from.")
    distributed_optimizer: bool = doc(True, "Shard optimizer state over data-parallel ranks.")

    def __post_init__(self):
        check(self.lr > 0, self, "lr", "must be > 0")
        check(0 <= self.min_lr <= self.lr, self, "min_lr", "must be in [0, optimizer.lr]")
        check(all(0 <= b < 1 for b in self.betas), self, "betas", "each beta must be in [0, 1)")
        check(self.eps > 0, self, "eps", "must be > 0")
        check(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        check(self.clip_grad >= 0, self, "clip_grad", "must be >= 0 (0 disables clipping)")
        check(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        check(0 < self.decay_fraction <= 1, self, "decay_fraction", "must be in (0, 1]")
        check(self.steps_per_rollout >= 1, self, "steps_per_rollout", "must be >= 1")
        check(self.epochs_per_rollout >= 1, self, "epochs_per_rollout", "must be >= 1")
