"""Code reward: run the response's Python program against the row's tests in the sandbox.

Row tests (`row[tests_key]`, default "tests"), any of:
  - a list of cases: {"stdin": str, "stdout": str} (also "input"/"output") or {"assert": str}
  - APPS style: {"inputs": [str, ...], "outputs": [str, ...]}
  - a string of assert-style test code
  - any of the above JSON-encoded in a string (as many datasets store them)
A stdin/stdout case runs the program with that input and compares stdout (whitespace-token
equality by default). An assert case runs `program + "\\n\\n" + test_code` and passes on exit 0.
Each case is a separate sandbox run. Reward: 1.0 iff every case passes ("all", the default,
stopping at the first failure) or the passed fraction ("fraction").
"""
from __future__ import annotations

import dataclasses
import json

from mopd_megatron.rewards.sandbox import (SandboxConfig, SandboxResult, probe_isolation,
                                           refusal, run_program)
from mopd_megatron.rewards.types import RewardResult, Verifier

_PYTHON_TAGS = ("", "python", "py", "python3")


def extract_code(response: str) -> str | None:
    """The last fenced code block tagged python/py/python3 or untagged; None if there is none.

    Fences are paired line by line (an opening ```tag line, the next ``` line closes it), so a
    closing fence is never mistaken for the opening of an untagged block."""
    blocks, tag, body = [], None, []
    for line in response.splitlines(keepends=True):
        stripped = line.strip()
        if tag is None:
            if stripped.startswith("```"):
                tag, body = stripped[3:].strip().lower(), []
        elif stripped.startswith("```"):
            blocks.append((tag, "".join(body)))
            tag = None
        else:
            body.append(line)
    code = [text for tag, text in blocks if tag in _PYTHON_TAGS]
    return code[-1] if code else None


@dataclasses.dataclass(frozen=True)
class TestCase:
    stdin: str | None = None
    stdout: str | None = None
    assert_code: str | None = None


def parse_tests(raw) -> list[TestCase]:
    """Normalize a row's tests into TestCase objects; ValueError naming what was unexpected."""
    if isinstance(raw, str):
        stripped = raw.strip()
        if stripped[:1] in "[{":
            try:
                raw = json.loads(stripped)
            except json.JSONDecodeError:
                pass  # Python code that happens to start with a bracket
        if isinstance(raw, str):
            return [TestCase(assert_code=raw)]
    if isinstance(raw, dict) and "inputs" in raw:
        ins, outs = raw["inputs"], raw.get("outputs")
        if not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError("code tests: 'inputs' and 'outputs' must be lists of equal length")
        return [TestCase(stdin=str(i), stdout=str(o)) for i, o in zip(ins, outs)]
    if isinstance(raw, list):
        cases = []
        for k, case in enumerate(raw):
            if not isinstance(case, dict):
                raise ValueError(f"code tests[{k}]: expected a dict, got {type(case).__name__}")
            if "assert" in case:
                cases.append(TestCase(assert_code=str(case["assert"])))
            elif ("stdin" in case or "input" in case) and ("stdout" in case or "output" in case):
                cases.append(TestCase(stdin=str(case.get("stdin", case.get("input"))),
                                      stdout=str(case.get("stdout", case.get("output")))))
            else:
                raise ValueError(f"code tests[{k}]: needs 'assert' or 'stdin'+'stdout' "
                                 f"(got keys {sorted(case)})")
        return cases
    raise ValueError(f"code tests: unsupported format {type(raw).__name__}")


def outputs_match(got: str, want: str, compare: str) -> bool:
    if compare == "tokens":
        return got.split() == want.split()
    lines = lambda s: [ln.rstrip() for ln in s.rstrip().splitlines()]  # noqa: E731
    return lines(got) == lines(want)


def _failure(k: int, res: SandboxResult, case: TestCase) -> str:
    if res.status != "ok":
        return f"test {k}: {res.detail or res.status}"
    if res.exit_code != 0 or res.signal is not None:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        how = f"signal {res.signal}" if res.signal is not None else f"exit {res.exit_code}"
        return f"test {k}: runtime error ({how}) {tail[0][:120]}"
    got = res.stdout.decode(errors="replace").strip()
    return f"test {k}: wrong answer, expected {case.stdout.strip()[:40]!r} got {got[:40]!r}"


class CodeVerifier(Verifier):
    """Config: tests_key ("tests"), mode ("all" | "fraction"), compare ("tokens" | "lines"),
    require_code_block (True: no fenced block -> 0; False: the whole response is the program),
    max_tests (64), sandbox (dict of SandboxConfig fields). Raises SandboxUnavailable at
    construction when isolation is impossible and sandbox.allow_unisolated is not set, or when
    sandbox.url does not answer."""

    def __init__(self, tests_key: str = "tests", mode: str = "all", compare: str = "tokens",
                 require_code_block: bool = True, max_tests: int = 64,
                 sandbox: dict | None = None):
        if mode not in ("all", "fraction"):
            raise ValueError(f"code verifier: mode must be 'all' or 'fraction', got {mode!r}")
        if compare not in ("tokens", "lines"):
            raise ValueError(f"code verifier: compare must be 'tokens' or 'lines', got {compare!r}")
        known = {f.name for f in dataclasses.fields(SandboxConfig)}
        unknown = set(sandbox or {}) - known
        if unknown:
            raise ValueError(f"code verifier: unknown sandbox field(s) {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        self.sandbox = SandboxConfig(**(sandbox or {}))
        self.isolation = probe_isolation(self.sandbox)  # fail at build time, not mid-training
        if self.isolation.error is not None and not self.sandbox.allow_unisolated:
            raise refusal(self.isolation, self.sandbox)
        self.isolated = self.isolation.error is None
        self.tests_key, self.mode, self.compare = tests_key, mode, compare
        self.require_code_block, self.max_tests = require_code_block, max_tests

    def describe_sandbox(self) -> str:
        """Which isolation the programs get, in one line (preflight prints it)."""
        if self.isolated:
            return f"{self.isolation.mode}: {self.isolation.detail}"
        return ("none: sandbox.allow_unisolated, rlimits and a private temp dir only "
                f"({self.isolation.error})")

    def score(self, response: str, row: dict) -> RewardResult:
        if self.tests_key not in row:
            raise KeyError(f"code verifier: row has no '{self.tests_key}' field "
                           f"(fields: {sorted(row)})")
        cases = parse_tests(row[self.tests_key])[: self.max_tests]
        if not cases:
            raise ValueError(f"code verifier: row's '{self.tests_key}' has no test cases")
        code = extract_code(response)
        if code is None:
            if self.require_code_block:
                return RewardResult(0.0, "no ```python code block in the response")
            code = response
        passed, first_failure = 0, ""
        for k, case in enumerate(cases):
            if case.assert_code is not None:
                res = run_program(code + "\n\n" + case.assert_code, b"", self.sandbox)
                ok = res.succeeded
            else:
                res = run_program(code, case.stdin, self.sandbox)
                ok = res.succeeded and outputs_match(
                    res.stdout.decode(errors="replace"), case.stdout, self.compare)
            if ok:
                passed += 1
                continue
            first_failure = first_failure or _failure(k, res, case)
            if self.mode == "all":
                return RewardResult(0.0, f"{first_failure} ({passed}/{len(cases)} passed)")
        reward = passed / len(cases) if self.mode == "fraction" else 1.0
        reason = f"passed {passed}/{len(cases)}" + (f"; {first_failure}" if first_failure else "")
        return RewardResult(reward, reason)
