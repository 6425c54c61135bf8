#!/usr/bin/env python
"""Build the embedded demo's inputs: a character tokenizer, prompt files for two synthetic
domains, two specialist teachers and a weak student, all trained here on CPU, deterministically.

Domains (exact-match rewards):
    caesar     "cabh="  -> "fdec"   each letter moved `shift` (3) places along a-h, wrapping
    reversal   "cabh>"  -> "hbac"   the string backwards
    (strings over a-h, length 3..max_len)

Two-digit addition was the first choice and is documented as a negative result in
benchmarks/RESULTS.md ("Demo run history and exploration"):
MOPD's sampled-token reverse-KL signal did not teach the carry algorithm to this 2-layer student
in the demo's budget (the student, 1% at the start, ended at 0%), while both letter tasks improve.

Teachers are trained by supervised fine-tuning (masked cross-entropy on the answer and EOS) on
their own domain only; the student gets a short SFT on both, so it knows the answer format but
is weak at both. Everything goes to ``<out>/`` (default ``.cache/tiny_cpu``):

    tokenizer/ (HF tokenizer files)   prompts.jsonl  eval.jsonl
    student/{hf, mcore}   teacher_caesar/{hf, mcore}   teacher_reversal/{hf, mcore}
    build.json            the settings + a hash; a rerun with equal settings is a no-op

``hf/`` is an HF checkpoint (config.json, tokenizer, safetensors: what SGLang serves) and
``mcore/`` the same weights as a Megatron dist-checkpoint.

    python tools/build_demo_teachers.py --recipe recipes/tiny_cpu.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LETTERS = "abcdefgh"
SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB = SPECIALS + list("0123456789") + ["+", "=", ">"] + list(LETTERS)
PAD, BOS, EOS = 0, 1, 2
DOMAINS = ("caesar", "reversal")


@dataclass
class DemoSettings:
    """What the demo is made of; any change rebuilds the cache."""

    out: str = ".cache/tiny_cpu"
    seed: int = 0
    shift: int = 3                  # caesar: each letter moves this many places along a-h
    max_len: int = 4                # strings of length 3..max_len. With 3..5 the student
                                    # plateaued at 97-99% (teachers 100%) within the demo's
                                    # budget, right at the 2-point target; with 3..4 the
                                    # main-job command printed 100% / 99.5% (RESULTS.md)
    train_prompts: int = 4000       # per domain, for SFT and for MOPD prompts (20000 with
                                    # 600 teacher steps left the caesar teacher at 66%)
    eval_prompts: int = 200         # per domain, held out (never trained on)
    hidden: int = 96
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    teacher_steps: int = 500        # ~0.0006 nats/token on both by then (1000 steps: 0.0000;
                                    # held-out 100% either way); half the build time
    student_steps: int = 150        # knows the formats, weaker at both (93.5% caesar, 61% reversal)
    batch: int = 64
    lr: float = 1e-3
    teacher_label_smoothing: float = 0.0  # confident teachers: a wrong token costs ~-15 nats,
                                    # a strong push away from it. Smoothed (0.1) teachers give
                                    # every wrong token ~-5.8, and the student then matched their
                                    # 10% tail of junk (reversal 90% against 98.5% unsmoothed,
                                    # both measured before make_splits kept short strings)
    student_label_smoothing: float = 0.1  # the student keeps some mass on every token, so
                                    # on-policy samples still reach the tokens it gets wrong
    unused_tokens: int = 8          # placeholder tokens appended to the vocabulary: SGLang 0.5.23
                                    # on CPU scores/returns the last vocabulary id as 0, so no
                                    # real token may sit there; tests use more so that every
                                    # TP=2 vocab shard holds real ids

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + Path(__file__).read_text()
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- tasks ------------------------------------------------------------------------------------
def make_row(domain: str, rng: random.Random, s: DemoSettings) -> dict:
    n = rng.randint(3, s.max_len)
    w = "".join(rng.choice(LETTERS) for _ in range(n))
    if domain == "caesar":
        return {"domain": "caesar", "prompt": f"{w}=", "answer": caesar(w, s.shift)}
    return {"domain": "reversal", "prompt": f"{w}>", "answer": w[::-1]}


def caesar(word: str, shift: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % len(LETTERS)] for c in word)


def make_splits(s: DemoSettings) -> tuple[list[dict], list[dict]]:
    """Per domain: ``eval_prompts`` distinct held-out rows, then ``train_prompts`` rows from the
    same distribution (lengths uniform in 3..max_len) minus the held-out prompts. Training rows
    may repeat: there are only 8**3 strings of length 3, and deduplicating them away left the
    training set 4% short strings against the held-out set's 33%."""
    rng = random.Random(s.seed)
    train, evals = [], []
    for dom in DOMAINS:
        held: dict[str, dict] = {}
        while len(held) < s.eval_prompts:
            r = make_row(dom, rng, s)
            held.setdefault(r["prompt"], r)
        evals += held.values()
        rows = []
        while len(rows) < s.train_prompts:
            r = make_row(dom, rng, s)
            if r["prompt"] not in held:
                rows.append(r)
        train += rows
    return train, evals


def vocab(s: DemoSettings) -> list[str]:
    return VOCAB + [f"<unused{i}>" for i in range(s.unused_tokens)]


def build_tokenizer(s: DemoSettings):
    """Character-level tokenizer (one token per character, BOS prepended)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab(s))}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<pad>")


def hf_config(s: DemoSettings) -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=len(vocab(s)),
                hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads // 2,
                max_position_embeddings=64, rms_norm_eps=1e-6, hidden_act="silu",
                rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, torch_dtype="float32")


# --- supervised training (Megatron, this process) ----------------------------------------------
def sft_batches(rows: list[dict], tokenizer, batch: int, steps: int, seed: int):
    """Yield [micro-batch] lists: tokens = BOS prompt answer EOS, loss on answer + EOS."""
    import torch
    rng = random.Random(seed)
    for _ in range(steps):
        picked = [rng.choice(rows) for _ in range(batch)]
        seqs, starts = [], []
        for r in picked:
            p = tokenizer(r["prompt"])["input_ids"]
            a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [EOS]
            seqs.append(p + a)
            starts.append(len(p))
        L = max(map(len, seqs))
        tokens = torch.full((batch, L), PAD, dtype=torch.long)
        mask = torch.zeros(batch, L)
        for i, (q, st) in enumerate(zip(seqs, starts)):
            tokens[i, :len(q)] = torch.tensor(q)
            mask[i, st - 1:len(q) - 1] = 1  # position t predicts token t+1
        labels = torch.roll(tokens, -1, 1)
        yield [dict(tokens=tokens, position_ids=torch.arange(L).expand(batch, L), labels=labels,
                    loss_mask=mask)]


def smoothed_ce(vocab_size: int, eps: float):
    """Label-smoothed cross-entropy over the real vocabulary, in the (loss_sum, count, metrics)
    contract of mcore.schedule (TP=1: the tool trains on one process)."""
    import torch

    def loss_fn(batch, logits):  # [b, s, V_padded]
        logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # [b, s, V]
        nll = -logp.gather(-1, batch["labels"][..., None]).squeeze(-1)
        per_token = (1 - eps) * nll - eps * logp.mean(dim=-1)  # [b, s]
        mask = batch["loss_mask"]
        loss_sum = (per_token * mask).sum()
        count = mask.sum().to(torch.int)
        return loss_sum, count, {"loss_sum": (nll * mask).sum().detach(), "tokens": mask.sum()}
    return loss_fn


def train_model(hf: dict, rows: list[dict], tokenizer, steps: int, s: DemoSettings, seed: int,
                out_dir: Path, label_smoothing: float, log_every: int = 200) -> None:
    import torch
    from mopd_megatron.config import OptimizerConfig, ParallelConfig
    from mopd_megatron.models.builder import build_model_chunks
    from mopd_megatron.models.hf_config import load_hf_config
    from mopd_megatron.runtime import set_seed
    from mopd_megatron.checkpoint import dist_ckpt
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    from mopd_megatron.mcore.step import train_step
    set_seed(seed)
    h = load_hf_config(hf)
    settings = OptimizerConfig(lr=s.lr, min_lr=s.lr * 0.1, betas=(0.9, 0.98), warmup_steps=20,
                               schedule="cosine", distributed_optimizer=False, clip_grad=1.0)
    chunks = wrap_ddp(build_model_chunks(h, ParallelConfig(), dtype="fp32"), settings)
    opt, sched = build_optimizer(chunks, settings, steps, torch.float32)
    t0 = time.time()
    for i, mbs in enumerate(sft_batches(rows, tokenizer, s.batch, steps, seed)):
        res = train_step(chunks, opt, sched, mbs, smoothed_ce(h.vocab_size, label_smoothing),
                         vocab_size=h.vocab_size, tp_rank=0)  # one process
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = res.metrics[0]
            print(f"  sft {out_dir.name}: step {i + 1}/{steps} nll "
                  f"{float(m['loss_sum'] / m['tokens']):.4f} ({time.time() - t0:.0f}s)", flush=True)
    hf_dir, mc_dir, cfg_dir = out_dir / "hf", out_dir / "mcore", out_dir / ".hf_config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(hf, indent=1))
    tokenizer.save_pretrained(str(cfg_dir))
    dist_ckpt.save(str(mc_dir), chunks)
    # The same weights as an HF checkpoint (SGLang serves it; format: hf loads it back).
    from mopd_megatron.convert import convert_megatron_to_hf
    convert_megatron_to_hf(str(mc_dir), str(hf_dir), hf_config=str(cfg_dir))
    for f in cfg_dir.iterdir():
        if not (hf_dir / f.name).exists():
            shutil.copy(f, hf_dir / f.name)
    shutil.rmtree(cfg_dir)


def build(s: DemoSettings, force: bool = False) -> Path:
    """Build (or reuse) everything under ``s.out``; returns that directory."""
    out = Path(s.out)
    stamp = out / "build.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("digest") == s.digest():
        print(f"demo inputs up to date in {out} (delete it or pass --force to rebuild)")
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    tokenizer = build_tokenizer(s)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    train, evals = make_splits(s)
    for name, rows in (("prompts.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    from mopd_megatron.runtime import init_runtime
    _free_port_env()
    init_runtime(1, 1, None, s.seed)
    hf = hf_config(s)
    by_dom = {d: [r for r in train if r["domain"] == d] for d in DOMAINS}
    for i, dom in enumerate(DOMAINS):
        train_model(hf, by_dom[dom], tokenizer, s.teacher_steps, s, s.seed + 1 + i,
                    out / f"teacher_{dom}", s.teacher_label_smoothing)
    train_model(hf, train, tokenizer, s.student_steps, s, s.seed + 10, out / "student",
                s.student_label_smoothing)
    stamp.write_text(json.dumps({"digest": s.digest(), "settings": asdict(s),
                                 "seconds": round(time.time() - t0, 1)}, indent=1))
    print(f"built demo inputs in {out} in {time.time() - t0:.0f}s")
    return out


def _free_port_env() -> None:
    """A single-process run still initialises torch.distributed: pick a free port."""
    if "MASTER_PORT" not in os.environ and "RANK" not in os.environ:
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def settings_from_recipe(path: str) -> DemoSettings:
    """A recipe is a pure MOPDConfig (no demo section), so the demo settings are this tool's
    defaults and flags; the recipe only decides where they go: model.hf_config is
    ``<out>/student/hf``."""
    from mopd_megatron.config import load_recipe
    cfg = load_recipe(path)
    return DemoSettings(out=str(Path(cfg.model.hf_config).parent.parent))


INT_FLAGS = ("seed", "teacher_steps", "student_steps", "hidden", "layers", "ffn", "batch",
             "unused_tokens", "train_prompts", "max_len")  # DemoSettings fields settable as --flags


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help="take the output directory from this recipe")
    ap.add_argument("--out", default=None, help="output directory (default .cache/tiny_cpu)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    for f in INT_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args(argv)
    s = settings_from_recipe(args.recipe) if args.recipe else DemoSettings()
    if args.out:
        s.out = args.out
    for f in INT_FLAGS + ("lr",):
        if getattr(args, f) is not None:
            setattr(s, f, getattr(args, f))
    build(s, force=args.force)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
