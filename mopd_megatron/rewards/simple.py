"""Exact-match and regex rewards for simple domains (the tiny demo's arithmetic, labels)."""
from __future__ import annotations

import re

from mopd_megatron.rewards.types import RewardResult, Verifier


def _compile(pattern: str | None, field: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{field}: invalid regex {pattern!r}: {exc}") from exc


def _extract(pattern: re.Pattern | None, response: str) -> str | None:
    """The last match's group 1 (or whole match if the pattern has no group); the whole
    response when no pattern is configured; None when the pattern never matches."""
    if pattern is None:
        return response
    last = None
    for last in pattern.finditer(response):
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


def _normalize(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())  # whitespace-insensitive: "  42\n" == "42"
    return text if case_sensitive else text.casefold()


class ExactMatchVerifier(Verifier):
    """Reward 1.0 when the extracted answer equals row[answer_key] after whitespace collapsing
    (and case folding unless case_sensitive). Config: answer_key (default "answer"), extract
    (regex; its last match's group 1 is the answer; default: the whole response),
    case_sensitive (default False), max_chars (response tail considered, default 20000)."""

    def __init__(self, answer_key: str = "answer", extract: str | None = None,
                 case_sensitive: bool = False, max_chars: int = 20000):
        self.answer_key, self.case_sensitive, self.max_chars = answer_key, case_sensitive, max_chars
        self.extract = _compile(extract, "exact_match.extract")

    def score(self, response: str, row: dict) -> RewardResult:
        if self.answer_key not in row:
            raise KeyError(f"exact_match verifier: row has no '{self.answer_key}' field "
                           f"(fields: {sorted(row)})")
        got = _extract(self.extract, response[-self.max_chars:])
        if got is None:
            return RewardResult(0.0, "no answer matched the extract pattern")
        got_n = _normalize(got, self.case_sensitive)
        want_n = _normalize(str(row[self.answer_key]), self.case_sensitive)
        if got_n == want_n:
            return RewardResult(1.0, f"match: {got_n[:80]!r}")
        return RewardResult(0.0, f"mismatch: {got_n[:80]!r} != {want_n[:80]!r}")


class RegexVerifier(Verifier):
    """Reward 1.0 when the (extracted) response fully matches a pattern: the config's `pattern`,
    or per row row[pattern_key]. Patterns are trusted (recipe/dataset), responses are not:
    keep patterns free of catastrophic backtracking. Config: pattern | pattern_key, extract,
    flags ("i", "s", "m" letters), max_chars."""

    def __init__(self, pattern: str | None = None, pattern_key: str | None = None,
                 extract: str | None = None, flags: str = "", max_chars: int = 20000):
        if (pattern is None) == (pattern_key is None):
            raise ValueError("regex verifier: set exactly one of 'pattern' or 'pattern_key'")
        bad = set(flags) - set("ism")
        if bad:
            raise ValueError(f"regex verifier: unknown flags {sorted(bad)} (known: i, s, m)")
        self.flags = 0
        for letter, flag in (("i", re.IGNORECASE), ("s", re.DOTALL), ("m", re.MULTILINE)):
            if letter in flags:
                self.flags |= flag
        self.pattern = None if pattern is None else re.compile(pattern, self.flags)
        self.pattern_key, self.max_chars = pattern_key, max_chars
        self.extract = _compile(extract, "regex.extract")

    def score(self, response: str, row: dict) -> RewardResult:
        pattern = self.pattern
        if pattern is None:
            if self.pattern_key not in row:
                raise KeyError(f"regex verifier: row has no '{self.pattern_key}' field "
                               f"(fields: {sorted(row)})")
            pattern = re.compile(row[self.pattern_key], self.flags)
        got = _extract(self.extract, response[-self.max_chars:])
        if got is None:
            return RewardResult(0.0, "no answer matched the extract pattern")
        if pattern.fullmatch(got.strip()):
            return RewardResult(1.0, f"matches /{pattern.pattern[:60]}/")
        return RewardResult(0.0, f"{got.strip()[:60]!r} does not match /{pattern.pattern[:60]}/")
