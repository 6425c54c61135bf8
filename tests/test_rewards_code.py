"""Code reward: extraction, test formats, stdin/stdout and assert cases that pass and fail."""
import json

import pytest

from mopd_megatron.rewards import sandbox as sb
from mopd_megatron.rewards.code_verifier import (CodeVerifier, TestCase, extract_code,
                                                 outputs_match, parse_tests)
from mopd_megatron.rewards.sandbox import SandboxConfig, run_program

LIMITS = {"wall_time_s": 5.0, "cpu_time_s": 4, "memory_mb": 512}
ISOLATION_ERROR = sb.probe_isolation(SandboxConfig()).error
needs_isolation = pytest.mark.skipif(ISOLATION_ERROR is not None,
                                     reason=f"sandbox isolation unavailable: {ISOLATION_ERROR}")

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "-5 5", "stdout": "0"},
             {"stdin": "100 23\n", "stdout": "123"}]
FUNC = "Here you go:\n```python\ndef square(x):\n    return x * x\n```\nDone."


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(sandbox=LIMITS)


def test_extract_code_takes_the_last_python_or_untagged_block():
    text = "```python\nprint(1)\n```\ntext\n```js\nconsole.log(2)\n```\n```py\nprint(3)\n```"
    assert extract_code(text) == "print(3)\n"
    assert extract_code("```\nprint(4)\n```") == "print(4)\n"
    assert extract_code("no code at all") is None


def test_parse_tests_formats():
    apps = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    assert parse_tests(apps) == [TestCase(stdin="1 2\n", stdout="3\n")]
    assert parse_tests(json.dumps(apps)) == parse_tests(apps)
    assert parse_tests([{"input": "x", "output": "y"}]) == [TestCase(stdin="x", stdout="y")]
    assert parse_tests("assert f(1) == 2") == [TestCase(assert_code="assert f(1) == 2")]
    assert parse_tests([{"assert": "assert g()"}]) == [TestCase(assert_code="assert g()")]
    with pytest.raises(ValueError, match=r"tests\[0\].*got keys \['expected'\]"):
        parse_tests([{"expected": "3"}])
    with pytest.raises(ValueError, match="equal length"):
        parse_tests({"inputs": ["1"], "outputs": []})


def test_outputs_match_modes():
    assert outputs_match("1 2\n3  \n\n", "1 2\n3", "lines")
    assert not outputs_match("1  2\n3", "1 2\n3", "lines")
    assert outputs_match("1  2\n3", "1 2 3", "tokens")
    assert not outputs_match("1 2 4", "1 2 3", "tokens")


@needs_isolation
def test_stdin_stdout_all_pass(verifier):
    result = verifier.score(ADD, {"tests": ADD_TESTS})
    assert result.reward == 1.0 and result.reason == "passed 3/3"


@needs_isolation
def test_stdin_stdout_wrong_answer(verifier):
    wrong = ADD.replace("a + b", "a - b")
    result = verifier.score(wrong, {"tests": ADD_TESTS})
    assert result.reward == 0.0 and "test 0: wrong answer" in result.reason


@needs_isolation
def test_fraction_mode_counts_passed_cases():
    v = CodeVerifier(mode="fraction", sandbox=LIMITS)
    almost = ADD.replace("print(a + b)", "print(a + b if a != 100 else 0)")
    result = v.score(almost, {"tests": ADD_TESTS})
    assert result.reward == pytest.approx(2 / 3) and "test 2: wrong answer" in result.reason


@needs_isolation
def test_assert_tests_pass_and_fail(verifier):
    good = {"tests": "assert square(3) == 9\nassert square(-2) == 4"}
    assert verifier.score(FUNC, good).reward == 1.0
    bad = {"tests": [{"assert": "assert square(3) == 9"}, {"assert": "assert square(2) == 5"}]}
    result = verifier.score(FUNC, bad)
    assert result.reward == 0.0 and "test 1: runtime error (exit 1) AssertionError" in result.reason


@needs_isolation
def test_runtime_error_and_syntax_error(verifier):
    crash = "```python\nraise ValueError('boom')\n```"
    result = verifier.score(crash, {"tests": ADD_TESTS})
    assert result.reward == 0.0 and "ValueError: boom" in result.reason
    broken = "```python\ndef f(:\n```"
    assert "SyntaxError" in verifier.score(broken, {"tests": ADD_TESTS}).reason


@needs_isolation
def test_no_code_block(verifier):
    result = verifier.score("print(3)", {"tests": ADD_TESTS})
    assert result.reward == 0.0 and "no ```python code block" in result.reason
    lenient = CodeVerifier(require_code_block=False, sandbox=LIMITS)
    program = "a, b = map(int, input().split())\nprint(a + b)"
    assert lenient.score(program, {"tests": ADD_TESTS}).reward == 1.0


@needs_isolation
def test_large_stdin_and_unread_stdin():
    # 2 MiB of input: larger than a pipe buffer, so feeding it must not deadlock.
    data = ("7\n" * (1 << 20)).encode()
    res = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", data,
                      SandboxConfig(**LIMITS))
    assert res.succeeded and res.stdout.strip() == str(7 * (1 << 20)).encode()
    res = run_program("print('ignored the input')", data, SandboxConfig(**LIMITS))
    assert res.succeeded and res.stdout == b"ignored the input\n"


@needs_isolation
def test_scratch_dir_is_writable_and_fresh_each_run():
    program = ("import os\nprint(sorted(os.listdir('.')))\nopen('left.txt', 'w').write('x')\n"
               "open(os.path.join(os.environ['TMPDIR'], 'tmp.txt'), 'w').write('y')")
    for _ in range(2):  # the second run must not see the first run's files
        res = run_program(program, b"", SandboxConfig(**LIMITS))
        assert res.succeeded and res.stdout == b"['main.py']\n", res


@needs_isolation
def test_file_size_limit():
    program = "open('big', 'wb').write(b'x' * (3 * 2**20))"
    res = run_program(program, b"", SandboxConfig(**LIMITS, max_file_mb=1))
    assert not res.succeeded  # RLIMIT_FSIZE -> SIGXFSZ (25) kills the writer
    assert res.signal == 25 or b"File too large" in res.stderr, res


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown sandbox field\(s\) \['wall_time'\]"):
        CodeVerifier(sandbox={"wall_time": 3})
    with pytest.raises(ValueError, match="mode must be"):
        CodeVerifier(mode="most")
    with pytest.raises(ValueError, match="SandboxConfig.memory_mb"):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError, match="SandboxConfig.python: '/nonexistent/python'"):
        SandboxConfig(python="/nonexistent/python")


@needs_isolation
def test_missing_tests_field_names_it(verifier):
    with pytest.raises(KeyError, match="'tests'"):
        verifier.score(ADD, {"test_cases": ADD_TESTS})


@needs_isolation
def test_concurrent_runs_do_not_mix():
    from concurrent.futures import ThreadPoolExecutor
    cfg = SandboxConfig(**LIMITS)
    program = "import os, sys\nx = int(sys.stdin.read())\nprint(x * x, len(os.listdir('.')))"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: run_program(program, str(k), cfg), range(8)))
    assert [r.stdout.decode().split() for r in results] == [[str(k * k), "1"] for k in range(8)]
