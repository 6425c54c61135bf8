"""The prompt dataset: every file read, every row checked and tokenized, up front.

Reading everything before training is what lets a malformed row, an unknown domain or an
over-long prompt stop the run (bad_rows=fail) before any model is built, with the file and line
in the message. Prompt sets are small next to the models (a million prompts of a few hundred
tokens is a few GB of int lists at most), so holding them is fine.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Iterable

from .rows import BadRow, DataError, PromptRow, check_row, read_rows
from .template import check_tokenizer, encode_prompt

__all__ = ["PromptDataset"]

log = logging.getLogger(__name__)
_SHOWN_BAD_ROWS = 10  # skipped rows printed individually; the rest only counted


class PromptDataset:
    """Prompts grouped by domain. ``rows_by_domain[d]`` keeps file order (the sampler's base)."""

    def __init__(self, paths: Iterable[str], tokenizer: Any, domains: Iterable[str], *,
                 chat_template: bool = True, max_prompt_len: int = 1024,
                 bad_rows: str = "fail"):
        if bad_rows not in ("skip", "fail"):
            raise DataError(f"data.bad_rows={bad_rows!r}: must be 'skip' or 'fail'")
        check_tokenizer(tokenizer, chat_template)
        self.domains = list(domains)
        self.rows_by_domain: dict[str, list[PromptRow]] = {d: [] for d in self.domains}
        self.bad: list[BadRow] = []
        known = set(self.domains)
        for path in paths:
            for source, obj in read_rows(path):
                row = check_row(source, obj, known)
                if isinstance(row, PromptRow):
                    row = self._encode(row, tokenizer, chat_template, max_prompt_len)
                if isinstance(row, BadRow):
                    self._reject(row, bad_rows)
                else:
                    self.rows_by_domain[row.domain].append(row)
        if self.bad:
            log.warning("skipped %d bad prompt rows (%s)", len(self.bad),
                        ", ".join(f"{k}: {v}" for k, v in self.bad_counts().items()))
        for d, rows in self.rows_by_domain.items():
            if not rows:
                raise DataError(f"data.domain_weights.{d}: no usable prompt rows for domain {d!r} "
                                f"in data.paths ({len(self.bad)} bad rows skipped)")

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any) -> "PromptDataset":
        """Build from a ``DataConfig``."""
        return cls(cfg.paths, tokenizer, cfg.domain_weights, chat_template=cfg.chat_template,
                   max_prompt_len=cfg.max_prompt_len, bad_rows=cfg.bad_rows)

    @staticmethod
    def _encode(row: PromptRow, tokenizer: Any, chat_template: bool,
                max_len: int) -> PromptRow | BadRow:
        try:
            row.prompt_text, row.prompt_ids = encode_prompt(tokenizer, row, chat_template)
        except Exception as e:  # a template can fail on one row's content (e.g. role order)
            return BadRow(row.source, "template_error", str(e))
        if len(row.prompt_ids) > max_len:
            return BadRow(row.source, "prompt_too_long", f"{len(row.prompt_ids)} tokens > "
                          f"data.max_prompt_len={max_len}")
        if not row.prompt_ids:
            return BadRow(row.source, "missing_prompt", "prompt encodes to zero tokens")
        return row

    def _reject(self, bad: BadRow, policy: str) -> None:
        if policy == "fail":
            raise DataError(f"{bad} (data.bad_rows=fail; set data.bad_rows=skip to drop such rows)")
        if len(self.bad) < _SHOWN_BAD_ROWS:
            log.warning("skipping bad prompt row %s", bad)
        self.bad.append(bad)

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows_by_domain.values())

    def bad_counts(self) -> dict[str, int]:
        return dict(collections.Counter(b.reason for b in self.bad))

    def metrics(self) -> dict[str, float]:
        """Row counts for the metric sinks (logged once at start-up)."""
        out = {f"data/rows/{d}": float(len(r)) for d, r in self.rows_by_domain.items()}
        out["data/bad_rows"] = float(len(self.bad))
        out.update({f"data/bad_rows/{k}": float(v) for k, v in self.bad_counts().items()})
        return out
