"""GPU check: FP8 (Transformer Engine) training steps against BF16 ones, on its own.

This is the GPU suite's fp8_step check (benchmarks/gpu/fp8_step.py; `bash
benchmarks/gpu_suite.sh --only fp8_step` runs it with the other checks' bookkeeping): a small
Megatron GPTModel of a recipe's architecture, built through the trainer's road
(models/builder.py::transformer_config from the recipe's model.fp8 section,
build_model_chunks with the TE layer spec, Megatron DDP + distributed optimizer,
mcore/step.py::train_step), trained a few steps from identical weights on identical batches
in BF16 and in FP8. Passes when the FP8 losses track the BF16 ones within tolerance and both
decrease. Needs a Hopper (sm_90) or newer GPU, Transformer Engine and megatron-core.

    python benchmarks/gpu_check_fp8.py                       # the recipe's recipe, tensorwise, blockwise
    python benchmarks/gpu_check_fp8.py --recipe delayed --steps 20 --json out.json

Exit status: 0 pass, 1 FP8 diverged from BF16 (or a variant failed to run), 77 FP8
unavailable here (no GPU / not Hopper / no Transformer Engine; the reason is printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # the `gpu` checks first, then the checkout
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from gpu import fp8_step  # noqa: E402
from gpu.common import CheckFailed, Recorder, Skip  # noqa: E402
from mopd_megatron.config import FP8Config  # noqa: E402

RECIPES = typing.get_args(typing.get_type_hints(FP8Config)["recipe"])
SKIP = 77


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=(*RECIPES, "all", "default"), default="default",
                    help="FP8 scaling recipe(s) to compare with BF16 (default: the model "
                         "recipe's model.fp8.recipe, tensorwise and blockwise)")
    ap.add_argument("--format", choices=("hybrid", "e4m3"), default=None,
                    help="FP8 format (default: the model recipe's model.fp8.format)")
    ap.add_argument("--model-recipe", default=fp8_step.RECIPE,
                    help=f"recipe YAML whose architecture and model.fp8 are used "
                         f"(default {fp8_step.RECIPE})")
    ap.add_argument("--steps", type=int, default=fp8_step.STEPS)
    ap.add_argument("--rtol-first", type=float, default=fp8_step.RTOL_FIRST,
                    help="max |fp8 - bf16| / bf16 of the step-0 loss (same weights, same batch)")
    ap.add_argument("--rtol-last", type=float, default=fp8_step.RTOL_LAST,
                    help="same for the last step")
    ap.add_argument("--json", help="write the figures (per-step losses and times) here")
    args = ap.parse_args(argv)

    names = None if args.recipe == "default" else RECIPES if args.recipe == "all" else (args.recipe,)
    opts = fp8_step.Options(recipe=args.model_recipe, fp8_recipes=names, fp8_format=args.format,
                            steps=args.steps, rtol_first=args.rtol_first, rtol_last=args.rtol_last)
    rec = Recorder(None)
    code = 0
    try:
        fp8_step.run(rec, opts)
    except Skip as e:
        print(f"gpu_check_fp8: SKIPPED: {e}", file=sys.stderr)
        code = SKIP
    except CheckFailed as e:
        print(f"gpu_check_fp8: FAIL: {e}", file=sys.stderr)
        code = 1
    for line in fp8_step.summary(rec.figures):
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rec.figures, fh, indent=1, default=str)
    if code == 0:
        print("gpu_check_fp8: PASS")
    return code


if __name__ == "__main__":
    sys.exit(main())
