"""Math reward: answer extraction, math-verify equivalence (right and wrong), timeouts."""
import time

import pytest

from mopd_megatron.rewards.math_verifier import MathVerifier, extract_answer, extract_boxed

# (gold answer, model response): each must score 1.0 (RIGHT) or 0.0 (WRONG).
RIGHT = [
    ("1/2", r"The answer is \boxed{\frac{1}{2}}"),
    ("0.5", r"so \boxed{\frac12}"),
    (r"\frac{1}{2}", r"The answer is $0.5$."),
    (r"\frac{\sqrt{3}}{2}", r"Final answer: $\frac{\sqrt 3}{2}$"),
    ("x^2+2x+1", r"\boxed{(x+1)^2}"),
    ("[1,2)", r"\boxed{[1,2)}"),
    (r"\{1,2\}", r"\boxed{\{2,1\}}"),
    ("2", "I think it's 2."),
    ("72", "She earns 9*8 = 72 dollars.\n#### 72"),
    ("-3", r"\boxed{-3}"),
    (r"\pi/2", r"\boxed{\frac{\pi}{2}}"),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}"),
    ("3.14159", r"\boxed{3.14159}"),
    (r"\frac{2}{4}", r"\boxed{\frac{1}{2}}"),
    (r"\frac{1}{3}", r"hence \boxed{\dfrac{1}{3}}."),
    (r"10\%", r"\boxed{10\%}"),
    ("(1, 2)", r"\boxed{(1,2)}"),
    ("x=3", r"\boxed{3}"),
    ("6", r"first \boxed{5}, no wait, \boxed{6}"),
    ("e^{2}", r"\boxed{e^2}"),
    ("1/3", "The final answer is 0.333333333"),
    ("7", r"\boxed{7.0}"),
    (r"\infty", r"\boxed{\infty}"),
    ("1000", r"\boxed{1000}"),
    (r"\frac{a+b}{2}", r"\boxed{\frac{b+a}{2}}"),
    ("12", r"\boxed{\boxed{12}}"),
]
WRONG = [
    ("3", "#### 4"),
    ("1/2", r"\boxed{\frac{1}{3}}"),
    ("x^2+2x+1", r"\boxed{(x-1)^2}"),
    ("[1,2)", r"\boxed{[1,2]}"),
    (r"\{1,2\}", r"\boxed{\{1,2,3\}}"),
    ("2", "I have no idea."),
    ("-3", r"\boxed{3}"),
    ("5", r"first \boxed{5}, no wait, \boxed{6}"),
    (r"\frac{\pi}{2}", r"\boxed{\pi}"),
    ("1/3", r"\boxed{0.33}"),
    ("10", r"\boxed{}"),
    ("42", ""),
    ("7", r"\boxed{7x}"),
    (r"\sqrt{2}", r"\boxed{1.41}"),
]


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=10, workers=2)
    yield v
    v.close()


@pytest.mark.parametrize("gold,response", RIGHT)
def test_equivalent_answers_score_one(verifier, gold, response):
    result = verifier.score(response, {"answer": gold})
    assert result.reward == 1.0, result.reason
    assert result.reason.startswith("correct")


@pytest.mark.parametrize("gold,response", WRONG)
def test_wrong_or_missing_answers_score_zero(verifier, gold, response):
    result = verifier.score(response, {"answer": gold})
    assert result.reward == 0.0, result.reason


def test_extract_boxed_balances_braces_and_takes_the_last():
    assert extract_boxed(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \fbox{{2}+{3}}") == "{2}+{3}"
    assert extract_boxed(r"\boxed{unclosed {") is None
    assert extract_boxed("no box") is None


def test_extract_answer_modes():
    assert extract_answer(r"so \boxed{4}") == ("$4$", "boxed")
    assert extract_answer("The final answer is 12.") == ("$12$", "anchored")
    assert extract_answer("Answer: $x+1$") == ("$x+1$", "anchored")
    assert extract_answer("it is 5") == ("it is 5", "tail")


def test_adversarial_latex_times_out_and_the_pool_recovers():
    v = MathVerifier(timeout_s=1.0, workers=1)
    try:
        v.score(r"\boxed{1}", {"answer": "1"})  # start the worker outside the timed part
        t0 = time.monotonic()
        # sympy tries to evaluate the power tower: hangs without an external kill.
        result = v.score(r"\boxed{9^{9^{9^{9}}}}", {"answer": "1"})
        assert time.monotonic() - t0 < 5.0
        assert result.reward == 0.0 and "timed out" in result.reason
        # The hung worker was killed; a fresh one answers the next item correctly.
        assert v.score(r"\boxed{\frac{3}{6}}", {"answer": "1/2"}).reward == 1.0
        assert len(v.pool._all) == 1
    finally:
        v.close()
    assert v.pool._all == set()


def test_missing_answer_field_names_it(verifier):
    with pytest.raises(KeyError, match="'answer'"):
        verifier.score(r"\boxed{1}", {"solution": "1"})


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
