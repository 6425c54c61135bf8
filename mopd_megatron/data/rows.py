"""Reading prompt files into raw rows, each tagged with its file and line.

A row is a JSON object (JSONL line or Parquet record) with a ``domain``, a ``prompt`` string or
a ``messages`` chat list, and any verifier fields (``answer``, ``tests``, ...) passed through.
Reading never decides what a bad row does; it yields ``BadRow`` records and lets the dataset
apply the ``data.bad_rows`` policy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DataError", "PromptRow", "BadRow", "read_rows", "check_row"]


class DataError(ValueError):
    """A prompt file or row is unusable; the message names the file and line."""


@dataclass
class PromptRow:
    """One prompt. ``source`` is ``file:line`` (JSONL) or ``file:row N`` (Parquet)."""

    domain: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    fields: dict[str, Any]                 # verifier fields, passed through untouched
    source: str
    prompt_ids: list[int] = field(default_factory=list)   # [prompt_len] filled by the dataset
    prompt_text: str = ""                  # the rendered prompt the ids encode


@dataclass
class BadRow:
    source: str
    reason: str    # short category, used as a metric key: data/bad_rows/<reason>
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}: {self.detail}"


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (source, parsed object) per row; unparsable JSONL lines yield a BadRow instead."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.paths: prompt file {path!r} does not exist")
    if p.suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif p.suffix == ".parquet":
        yield from _read_parquet(p)
    else:
        raise DataError(f"data.paths: {path!r} is neither .jsonl nor .parquet")


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            source = f"{p}:{lineno}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                yield source, BadRow(source, "bad_json", f"{e.msg} at column {e.colno}")


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # optional dependency, only needed for .parquet inputs

    row = 0
    # Stream record batches: a multi-GB prompt file never becomes one Python list.
    for batch in pq.ParquetFile(p).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield f"{p}:row {row}", rec


def check_row(source: str, obj: Any, domains: set[str]) -> PromptRow | BadRow:
    """Validate the shape of one parsed row against the known domains."""
    if isinstance(obj, BadRow):
        return obj
    if not isinstance(obj, dict):
        return BadRow(source, "not_object", f"expected a JSON object, got {type(obj).__name__}")
    domain = obj.get("domain")
    if not isinstance(domain, str) or not domain:
        return BadRow(source, "missing_domain", "row has no 'domain' string")
    if domain not in domains:
        return BadRow(source, "unknown_domain",
                      f"domain {domain!r} is not in data.domain_weights ({sorted(domains)})")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return BadRow(source, "missing_prompt", "row needs exactly one of 'prompt' (string) or "
                      "'messages' (chat list)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return BadRow(source, "missing_prompt", "'prompt' must be a non-empty string")
    if messages is not None:
        ok = (isinstance(messages, list) and len(messages) > 0 and
              all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                  isinstance(m.get("content"), str) for m in messages))
        if not ok:
            return BadRow(source, "bad_messages", "'messages' must be a non-empty list of "
                          "{role: str, content: str}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    fields = {k: v for k, v in obj.items() if k not in ("domain", "prompt", "messages")}
    return PromptRow(domain, prompt, messages, fields, source)
