"""Reward registry (domain -> verifier, batched scoring) and the exact-match / regex verifiers."""
import pytest

from mopd_megatron.rewards import VERIFIER_TYPES, RewardResult, build_reward_registry
from mopd_megatron.rewards import sandbox as sb
from mopd_megatron.rewards.simple import ExactMatchVerifier, RegexVerifier

ISOLATION_ERROR = sb.probe_isolation(sb.SandboxConfig()).error
LAST_INT = r"(-?\d+)\s*$"


def test_exact_match_extract_and_normalize():
    v = ExactMatchVerifier(extract=LAST_INT)
    assert v.score("3 + 4 = 7", {"answer": 7}) == RewardResult(1.0, "match: '7'")
    assert v.score("3 + 4 = 8", {"answer": "7"}).reward == 0.0
    assert "no answer matched" in v.score("seven", {"answer": "7"}).reason
    whole = ExactMatchVerifier()
    assert whole.score("  Paris\n", {"answer": "paris"}).reward == 1.0  # case-folded, stripped
    assert ExactMatchVerifier(case_sensitive=True).score("Paris", {"answer": "paris"}).reward == 0
    assert whole.score("New   York", {"answer": "new york"}).reward == 1.0
    with pytest.raises(KeyError, match="no 'answer' field"):
        whole.score("x", {"label": "x"})


def test_regex_verifier():
    v = RegexVerifier(pattern=r"(yes|no)", flags="i")
    assert v.score(" YES ", {}).reward == 1.0
    assert v.score("maybe", {}).reward == 0.0
    per_row = RegexVerifier(pattern_key="pattern", extract=r"Answer: (.*)")
    assert per_row.score("Work...\nAnswer: 2024-01-05", {"pattern": r"\d{4}-\d{2}-\d{2}"}).reward == 1
    assert per_row.score("Answer: Jan 5", {"pattern": r"\d{4}-\d{2}-\d{2}"}).reward == 0
    with pytest.raises(ValueError, match="exactly one of 'pattern' or 'pattern_key'"):
        RegexVerifier()
    with pytest.raises(ValueError, match=r"regex.extract: invalid regex '\('"):
        RegexVerifier(pattern="x", extract="(")
    with pytest.raises(ValueError, match=r"unknown flags \['x'\]"):
        RegexVerifier(pattern="x", flags="ix")


def test_registry_errors_name_domain_type_and_field():
    with pytest.raises(ValueError, match=r"domain 'chem': unknown verifier type 'chemistry'; "
                                         r"known types: \['code', 'exact_match', 'math', 'regex'\]"):
        build_reward_registry({"chem": {"type": "chemistry"}})
    with pytest.raises(ValueError, match=r"domain 'add' \(type 'exact_match'\): unknown field\(s\) "
                                         r"\['answer_field'\]; accepted: \['answer_key'"):
        build_reward_registry({"add": {"type": "exact_match", "answer_field": "a"}})
    with pytest.raises(ValueError, match="domain 'add': expected a mapping with a 'type' field"):
        build_reward_registry({"add": {"answer_key": "a"}})
    with pytest.raises(ValueError, match="no domains configured"):
        build_reward_registry({})
    assert sorted(VERIFIER_TYPES) == ["code", "exact_match", "math", "regex"]


def test_unknown_domain_lists_known_domains():
    with build_reward_registry({"add": {"type": "exact_match"}}) as reg:
        with pytest.raises(KeyError, match=r"domain 'math'; known domains: \['add'\]"):
            reg.score("math", "1", {"answer": "1"})
        with pytest.raises(KeyError, match="domain 'math'"):
            reg.score_batch([("add", "1", {"answer": "1"}), ("math", "1", {"answer": "1"})])


def test_score_batch_mixed_domains_keeps_order():
    domains = {
        "math": {"type": "math", "timeout_s": 10},
        "add": {"type": "exact_match", "extract": LAST_INT},
        "yn": {"type": "regex", "pattern": "yes|no"},
    }
    if ISOLATION_ERROR is None:
        domains["code"] = {"type": "code", "sandbox": {"wall_time_s": 5}}
    items = [
        ("math", r"so \boxed{\frac{2}{4}}", {"answer": "1/2"}),
        ("add", "2+2=4", {"answer": "4"}),
        ("math", r"\boxed{3}", {"answer": "4"}),
        ("yn", "perhaps", {}),
        ("add", "2+2=5", {"answer": "4"}),
        ("yn", "no", {}),
    ]
    want = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    if ISOLATION_ERROR is None:
        tests = {"tests": [{"stdin": "4\n", "stdout": "16"}]}
        items += [("code", "```python\nprint(int(input()) ** 2)\n```", tests),
                  ("code", "```python\nprint(int(input()) * 2)\n```", tests)]
        want += [1.0, 0.0]
    with build_reward_registry(domains, max_workers=3) as reg:
        assert reg.domains == sorted(domains)
        results = reg.score_batch(items)
        assert [r.reward for r in results] == want, [r.reason for r in results]
        assert all(isinstance(r.reason, str) and r.reason for r in results)
        # The single-item path gives the same verdict as the batched one.
        assert [reg.score(*item).reward for item in items] == want
    reg.close()  # idempotent


def test_registry_rejects_bad_pool_size():
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        build_reward_registry({"add": {"type": "exact_match"}}, max_workers=0)
