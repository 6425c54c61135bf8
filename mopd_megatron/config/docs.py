"""The recipe-field table of docs/recipes.md ("All recipe fields"), rendered from the config
dataclasses' own help.

    python -m mopd_megatron.config.docs docs/recipes.md          # rewrite the table in place
    python -m mopd_megatron.config.docs docs/recipes.md --check  # exit 1 if the table is stale

The table sits between the two marker comments below; a test (tests/test_config.py) runs
--check so the documentation cannot drift from the code.
"""
from __future__ import annotations

import argparse
import json
import sys

from .base import field_docs

__all__ = ["field_table", "replace_table", "BEGIN", "END"]

BEGIN = "<!-- recipe-fields:begin (python -m mopd_megatron.config.docs docs/recipes.md) -->"
END = "<!-- recipe-fields:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value) -> str:
    if value == "required":
        return "*required*"
    if isinstance(value, (bool, type(None), list, dict, tuple)):
        return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"
    return f"`{value}`"


def field_table() -> str:
    from .recipe import MOPDConfig
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{path}` | {_cell(tp)} | {_cell(_default(default))} | {_cell(help_)} |"
              for path, tp, default, help_ in field_docs(MOPDConfig, "")]
    return "\n".join(lines)


def replace_table(text: str, source: str = "docs/recipes.md") -> str:
    """text with the block between BEGIN and END replaced by the current table."""
    try:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"{source}: the field table markers are missing ({BEGIN!r} ... {END!r})")
    return f"{head}{BEGIN}\n{field_table()}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mopd_megatron.config.docs",
                                 description="Render the recipe-field table into a markdown file.")
    ap.add_argument("path", help="markdown file holding the table markers (docs/recipes.md)")
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 when the file's table differs from the code")
    args = ap.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    new = replace_table(text, args.path)
    if args.check:
        if new != text:
            print(f"{args.path}: the recipe-field table is stale; run "
                  f"python -m mopd_megatron.config.docs {args.path}", file=sys.stderr)
            return 1
        return 0
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
