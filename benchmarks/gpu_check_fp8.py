"""GPU check: a tiny model trained a few steps in FP8 (Transformer Engine) against the same
model in BF16, from identical weights on identical batches. Passes when the FP8 losses track the
BF16 ones within tolerance and both decrease. Needs a Hopper (sm_90) or newer GPU and TE.

    python benchmarks/gpu_check_fp8.py                       # all three scaling recipes
    python benchmarks/gpu_check_fp8.py --recipe delayed --steps 30 --json out.json

Exit status: 0 pass, 1 FP8 diverged from BF16, 77 FP8 unavailable here (no GPU / not Hopper /
no Transformer Engine; the reason is printed). Model: token embedding (BF16) -> N TE
TransformerLayers (RMSNorm, SwiGLU, causal) -> BF16 output head, next-token loss on a fixed
synthetic sequence task; the first and last layers stay BF16 as model.fp8 recommends.
"""
from __future__ import annotations

import argparse
import json
import sys

import typing

from mopd_megatron.config import FP8Config
from mopd_megatron.models.fp8 import fp8_unavailable_reason

RECIPES = typing.get_args(typing.get_type_hints(FP8Config)["recipe"])

SKIP = 77


def te_recipe(settings: FP8Config):
    """A model.fp8 section -> a transformer_engine.common.recipe object."""
    from transformer_engine.common import recipe as r
    fmt = r.Format.HYBRID if settings.format == "hybrid" else r.Format.E4M3
    if settings.recipe == "delayed":
        return r.DelayedScaling(fp8_format=fmt, amax_history_len=16, amax_compute_algo="max")
    if settings.recipe == "tensorwise":
        return r.Float8CurrentScaling(fp8_format=fmt)
    return r.Float8BlockScaling(fp8_format=fmt)


def build_model(vocab: int = 512, hidden: int = 256, layers: int = 4, heads: int = 4):
    """Embedding (bf16) -> TE TransformerLayers -> bf16 head. Imports torch/TE only here."""
    import torch
    import transformer_engine.pytorch as te

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden, dtype=torch.bfloat16, device="cuda")
            self.layers = torch.nn.ModuleList(
                te.TransformerLayer(hidden, 4 * hidden, heads, hidden_dropout=0.0,
                                    attention_dropout=0.0, self_attn_mask_type="causal",
                                    normalization="RMSNorm", activation="swiglu",
                                    params_dtype=torch.bfloat16, device="cuda",
                                    attn_input_format="bshd", layer_number=i + 1)
                for i in range(layers))
            self.head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16,
                                        device="cuda")

        def forward(self, ids, fp8_ctx):
            x = self.embed(ids)                                  # [b, s, h] bf16
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                with fp8_ctx(0 < i < last):                      # first/last layer in bf16
                    x = layer(x)
            return self.head(x).float()                          # [b, s, V] fp32 for the loss

    return TinyLM()


def train(settings: FP8Config | None, init_state: dict, steps: int, seed: int) -> list[float]:
    """Per-step losses of `steps` AdamW steps from `init_state`, FP8 when settings is given."""
    import torch
    import transformer_engine.pytorch as te

    rec = te_recipe(settings) if settings is not None else None

    def fp8_ctx(on: bool):
        return te.fp8_autocast(enabled=bool(on and rec is not None), fp8_recipe=rec)

    model = build_model()
    model.load_state_dict(init_state, strict=False)   # TE's _extra_state (FP8 meta) may differ
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    # Task: each sequence repeats its first half, so the second half is learnable.
    base = torch.randint(0, 512, (16, 64), device="cuda", generator=g)
    ids = torch.cat([base, base], dim=1)                          # [16, 128]
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1], fp8_ctx)                      # [16, 127, 512]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=(*RECIPES, "all"), default="all")
    ap.add_argument("--format", choices=("hybrid", "e4m3"), default="hybrid")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol-first", type=float, default=0.02,
                    help="max |fp8 - bf16| / bf16 of the step-0 loss (same weights, same batch)")
    ap.add_argument("--rtol-last", type=float, default=0.10, help="same for the last step")
    ap.add_argument("--json", help="write the per-step losses here")
    args = ap.parse_args(argv)

    reason = fp8_unavailable_reason()
    if reason:
        print(f"gpu_check_fp8: SKIPPED: {reason}", file=sys.stderr)
        return SKIP
    import torch
    import transformer_engine

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"transformer_engine {transformer_engine.__version__}")
    torch.manual_seed(args.seed)
    init_state = {k: v.detach().clone() for k, v in build_model().state_dict().items()
                  if not k.endswith("_extra_state")}
    ref_losses = train(None, init_state, args.steps, args.seed)
    results = {"bf16": ref_losses}
    ok = True
    for name in (RECIPES if args.recipe == "all" else (args.recipe,)):
        st = FP8Config(enabled=True, format=args.format, recipe=name)
        try:
            losses = train(st, init_state, args.steps, args.seed)
        except Exception as e:  # noqa: BLE001 - e.g. blockwise needs a newer TE
            print(f"  {name:10s} ERROR {type(e).__name__}: {e}")
            ok = False
            continue
        first = abs(losses[0] - ref_losses[0]) / ref_losses[0]
        last = abs(losses[-1] - ref_losses[-1]) / ref_losses[-1]
        learned = losses[-1] < 0.9 * losses[0] and ref_losses[-1] < 0.9 * ref_losses[0]
        passed = first <= args.rtol_first and last <= args.rtol_last and learned
        ok &= passed
        results[name] = losses
        print(f"  {name:10s} loss step0 {losses[0]:.4f} (bf16 {ref_losses[0]:.4f}, rel {first:.2%}) "
              f"last {losses[-1]:.4f} (bf16 {ref_losses[-1]:.4f}, rel {last:.2%}) "
              f"{'PASS' if passed else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
