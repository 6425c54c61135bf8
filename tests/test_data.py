"""Prompt data: rows, chat templates, bad-row reporting, weighted and resumable sampling."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mopd_megatron.config import DataConfig
from mopd_megatron.data import DataError, DomainSampler, PromptDataset

WORDS = ["[UNK]", "<|", "|>", "user", "assistant", "system", "what", "is", "2", "+", "3", "?",
         "reverse", "abc", "be", "brief", "x"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if chat:
        hf.chat_template = TEMPLATE
    return hf


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]  # reference encoding, by hand from the vocabulary


GOOD = [
    {"domain": "math", "prompt": "what is 2 + 3 ?", "answer": "5"},
    {"domain": "rev", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "reverse abc"}],
     "answer": "cba", "tests": ["t1", "t2"]},
]


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def test_rows_templates_and_passthrough(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GOOD + [""])  # a blank line is not a row
    ds = PromptDataset([p], make_tokenizer(), ["math", "rev"])
    (m,), (r,) = ds.rows_by_domain["math"], ds.rows_by_domain["rev"]
    assert m.prompt_ids == ids("<|", "user", "|>", "what", "is", "2", "+", "3", "?",
                               "<|", "assistant", "|>")
    assert r.prompt_ids == ids("<|", "system", "|>", "be", "brief", "<|", "user", "|>",
                               "reverse", "abc", "<|", "assistant", "|>")
    assert r.fields == {"answer": "cba", "tests": ["t1", "t2"]} and m.fields == {"answer": "5"}
    assert m.source == f"{p}:1" and r.source == f"{p}:2"
    assert ds.metrics() == {"data/rows/math": 1.0, "data/rows/rev": 1.0, "data/bad_rows": 0.0}


def test_plain_prompts_without_template(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"domain": "math", "prompt": "what is 2 + 3 ?"}])
    ds = PromptDataset([p], make_tokenizer(chat=False), ["math"], chat_template=False)
    assert ds.rows_by_domain["math"][0].prompt_ids == ids("what", "is", "2", "+", "3", "?")
    with pytest.raises(DataError, match="data.chat_template=True: the tokenizer has no chat template"):
        PromptDataset([p], make_tokenizer(chat=False), ["math"], chat_template=True)


BAD = [
    ("{not json", "bad_json"),
    ('["a list"]', "not_object"),
    ({"prompt": "what is"}, "missing_domain"),
    ({"domain": "chat", "prompt": "what is"}, "unknown_domain"),
    ({"domain": "math"}, "missing_prompt"),
    ({"domain": "math", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "missing_prompt"),
    ({"domain": "math", "messages": [{"role": "user"}]}, "bad_messages"),
    ({"domain": "math", "prompt": "x " * 40}, "prompt_too_long"),
]


@pytest.mark.parametrize("line, reason", BAD)
def test_bad_row_fails_with_file_and_line(tmp_path, line, reason):
    p = write_jsonl(tmp_path / "a.jsonl", GOOD + [line])
    with pytest.raises(DataError) as e:
        PromptDataset([p], make_tokenizer(), ["math", "rev"], max_prompt_len=32)
    assert str(e.value).startswith(f"{p}:3: {reason}:"), str(e.value)


def test_bad_rows_skipped_and_counted(tmp_path):
    lines = GOOD + [line for line, _ in BAD]
    p = write_jsonl(tmp_path / "a.jsonl", lines)
    ds = PromptDataset([p], make_tokenizer(), ["math", "rev"], max_prompt_len=32, bad_rows="skip")
    assert len(ds) == 2
    assert ds.bad_counts() == dict(Counter(reason for _, reason in BAD))
    assert [b.source for b in ds.bad] == [f"{p}:{i}" for i in range(3, 3 + len(BAD))]
    metrics = ds.metrics()
    assert metrics["data/bad_rows"] == len(BAD) and metrics["data/bad_rows/missing_prompt"] == 2


def test_messages_without_template_is_a_bad_row(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GOOD)
    with pytest.raises(DataError, match=rf"{p}:2: template_error: 'messages' rows need data.chat_template=true"):
        PromptDataset([p], make_tokenizer(), ["math", "rev"], chat_template=False)


def test_parquet_rows_and_errors(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [dict(GOOD[0], messages=None), dict(GOOD[1], prompt=None),
            {"domain": "chat", "prompt": "x", "messages": None, "answer": "1"}]
    for r in rows:
        r.setdefault("tests", None)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"{path}:row 3: unknown_domain: domain 'chat'"):
        PromptDataset([str(path)], make_tokenizer(), ["math", "rev"])
    ds = PromptDataset([str(path)], make_tokenizer(), ["math", "rev"], bad_rows="skip")
    # Parquet fills absent columns with null: 'prompt: null' next to messages is still one prompt.
    assert ds.rows_by_domain["rev"][0].prompt_ids[-3:] == ids("<|", "assistant", "|>")
    assert ds.bad_counts() == {"unknown_domain": 1}


def test_missing_file_and_empty_domain(tmp_path):
    with pytest.raises(DataError, match="data.paths: prompt file .*nope.jsonl' does not exist"):
        PromptDataset([str(tmp_path / "nope.jsonl")], make_tokenizer(), ["math"])
    p = write_jsonl(tmp_path / "a.jsonl", GOOD[:1])
    with pytest.raises(DataError, match="data.domain_weights.rev: no usable prompt rows for domain 'rev'"):
        PromptDataset([p], make_tokenizer(), ["math", "rev"])


def many_rows(tmp_path, n_math=7, n_rev=5):
    lines = [{"domain": "math", "prompt": "what is 2", "id": i} for i in range(n_math)]
    lines += [{"domain": "rev", "prompt": "reverse abc", "id": i} for i in range(n_rev)]
    p = write_jsonl(tmp_path / "many.jsonl", lines)
    cfg = DataConfig(paths=[p], domain_weights={"math": 1.0, "rev": 3.0}, chat_template=False)
    return PromptDataset.from_config(cfg, make_tokenizer(chat=False)), cfg


def key(rows):
    return [(r.domain, r.fields["id"]) for r in rows]


def test_sampler_is_deterministic_weighted_and_covers_epochs(tmp_path):
    ds, cfg = many_rows(tmp_path)
    a = key(DomainSampler(ds, cfg.domain_weights, seed=3).next_batch(4000))
    assert a == key(DomainSampler(ds, cfg.domain_weights, seed=3).next_batch(4000))
    assert a != key(DomainSampler(ds, cfg.domain_weights, seed=4).next_batch(4000))
    frac_math = sum(d == "math" for d, _ in a) / len(a)
    assert abs(frac_math - 0.25) < 0.03  # 4.4 binomial standard deviations at n=4000
    # Within a domain, every full epoch is a permutation of its rows.
    math_ids = [i for d, i in a if d == "math"]
    for e in range(len(math_ids) // 7):
        assert sorted(math_ids[7 * e: 7 * e + 7]) == list(range(7))
    assert math_ids[:7] != list(range(7))  # shuffled, not file order


def test_sampler_resume_draws_the_same_prompts(tmp_path):
    ds, cfg = many_rows(tmp_path)
    s = DomainSampler(ds, cfg.domain_weights, seed=11)
    s.next_batch(13)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round trip
    expected = key(s.next_batch(40))
    resumed = DomainSampler(ds, cfg.domain_weights, seed=11)
    resumed.load_state_dict(state)
    assert key(resumed.next_batch(40)) == expected


def test_sampler_refuses_state_from_other_data(tmp_path):
    ds, cfg = many_rows(tmp_path)
    state = DomainSampler(ds, cfg.domain_weights, seed=11).state_dict()
    with pytest.raises(DataError, match="data.seed: the checkpoint's sampler was built with seed=11"):
        DomainSampler(ds, cfg.domain_weights, seed=12).load_state_dict(state)
    with pytest.raises(DataError, match="data.domain_weights: changed since the checkpoint"):
        DomainSampler(ds, {"math": 1.0, "rev": 1.0}, seed=11).load_state_dict(state)
    ds2, _ = many_rows(tmp_path, n_math=8)
    with pytest.raises(DataError, match="data.paths: .*rows_per_domain"):
        DomainSampler(ds2, cfg.domain_weights, seed=11).load_state_dict(state)
