"""``mopd``: one entry point for the recipe's commands.

    mopd train   run MOPD on a recipe (default: the embedded CPU demo)
    mopd plan    per-GPU memory plan of a recipe; refuses one that does not fit
    mopd convert HF <-> Megatron checkpoint conversion (hf-to-megatron | megatron-to-hf)

Each subcommand owns its arguments (``mopd <command> --help``); imports are lazy so that
``mopd --help`` is instant and no GPU-only library is imported.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mopd_megatron.trainer.cli", "main", "run MOPD on a recipe (default: CPU demo)"),
    "plan": ("mopd_megatron.plan.cli", "plan_main", "per-GPU memory plan of a recipe"),
    "convert": ("mopd_megatron.convert.cli", "convert_main",
                "HF <-> Megatron checkpoint conversion"),
}


def _usage() -> str:
    lines = ["usage: mopd <command> [options]", "", "commands:"]
    lines += [f"  {name:8s} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`mopd <command> --help` describes each command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mopd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
