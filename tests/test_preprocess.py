"""Tokenization at scale: batched and parallel tokenization gives exactly the per-example result, and the cache is
hit when nothing changed and missed when anything did."""

from __future__ import annotations

import copy

import pytest

from conftest import CONVERSATIONS, build_tokenizer
from functionalnetworkssft import data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


def rows(count: int) -> list[dict]:
    return [{"messages": CONVERSATIONS[i % len(CONVERSATIONS)][: 3 + 2 * (i % 2)]} for i in range(count)]


def test_batched_and_parallel_tokenization_equals_one_example_at_a_time(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    raw = data.from_memory(rows(40) + [{"messages": [{"role": "user", "content": "no reply"}]}])
    single = [data.tokenize_example(tok, row, False, 64) for row in raw.train]
    parallel, _ = data.tokenize(raw, tok, 64, False, num_proc=2, cache=False)
    kept = [s for s in single if any(s["assistant_masks"])]
    assert parallel["input_ids"] == [s["input_ids"] for s in kept]
    assert parallel["assistant_masks"] == [s["assistant_masks"] for s in kept]


def test_the_cache_is_hit_when_nothing_changed_and_missed_when_anything_did(tok, monkeypatch, tmp_path, fnsft_log):
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    raw = data.from_memory(rows(30))
    first, _ = data.tokenize(raw, tok, 128, False)
    assert "read from the cache" not in fnsft_log.text
    again, _ = data.tokenize(data.from_memory(rows(30)), tok, 128, False)
    assert "read from the cache" in fnsft_log.text and again["input_ids"] == first["input_ids"]
    entries = set((tmp_path / "tokenized").iterdir())
    other_template = copy.deepcopy(tok)
    other_template.chat_template = tok.chat_template.replace("'<|im_end|>", "' <|im_end|>")
    for changed in (lambda: data.tokenize(data.from_memory(rows(31)), tok, 128, False),  # the data
                    lambda: data.tokenize(data.from_memory(rows(30)), tok, 64, False),  # a setting
                    lambda: data.tokenize(data.from_memory(rows(30)), tok, 128, True),
                    lambda: data.tokenize(data.from_memory(rows(30)), other_template, 128, False)):  # the template
        changed()
        now = set((tmp_path / "tokenized").iterdir())
        assert len(now) == len(entries) + 1  # a miss: tokenized and stored anew
        entries = now


def test_a_validation_split_is_never_read_back_as_its_training_split(tok, monkeypatch, tmp_path):
    """The two halves of a split share one Arrow table; the cache must tell them apart, first run and rerun."""
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    distinct = [{"messages": [{"role": "user", "content": f"question {i}"},
                              {"role": "assistant", "content": f"answer {i}"}]} for i in range(40)]
    for _ in range(2):
        train, validation = data.tokenize(data.from_memory(distinct, validation_split=0.25, seed=3), tok, 128, False)
        assert (len(train), len(validation)) == (30, 10)
        assert not {tuple(ids) for ids in train["input_ids"]} & {tuple(ids) for ids in validation["input_ids"]}


def test_a_damaged_cache_entry_is_rebuilt(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    raw = data.from_memory(rows(10))
    first, _ = data.tokenize(raw, tok, 128, False)
    (entry,) = (tmp_path / "tokenized").iterdir()
    for arrow in entry.glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    again, _ = data.tokenize(data.from_memory(rows(10)), tok, 128, False)
    assert again["input_ids"] == first["input_ids"]
