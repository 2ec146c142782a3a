"""The tokenization cache is a cache, never a source of truth: a swapped, foreign or damaged entry is said in one
line and rebuilt, and the run trains on its own data."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest

from conftest import build_tokenizer
from functionalnetworkssft import data
from functionalnetworkssft.data.cache import STAMP, cache_key


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


def chats(count: int, word: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{word} {i}?"}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(count)]


def entry(tok, raw) -> str:
    return cache_key(raw.train, tok, 64, False)


def test_an_entry_swapped_in_from_other_data_is_rebuilt(tok, monkeypatch, tmp_path, fnsft_log):
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    small, large = data.from_memory(chats(6, "small")), data.from_memory(chats(12, "large"))
    data.tokenize(small, tok, 64, False)
    data.tokenize(large, tok, 64, False)
    folder = tmp_path / "tokenized"
    shutil.rmtree(folder / entry(tok, large))
    shutil.copytree(folder / entry(tok, small), folder / entry(tok, large))  # the 6-example entry, 12's name
    train, _ = data.tokenize(data.from_memory(chats(12, "large")), tok, 64, False)
    assert len(train) == 12
    assert "was written for other data or settings; tokenizing again" in fnsft_log.text
    again, _ = data.tokenize(data.from_memory(chats(12, "large")), tok, 64, False)
    assert len(again) == 12 and "read from the cache" in fnsft_log.text  # the rebuilt entry is trusted again


@pytest.mark.parametrize("forgery, needle", [
    ("schema", "does not have the columns tokenization writes"),
    ("vocabulary", "holds token ids outside the vocabulary"),
    ("masks", "holds rows whose masks do not match their tokens"),
    ("rows", "holds 3 rows for 8 examples"),
    ("garbage", "cannot be read"),
])
def test_a_forged_or_damaged_entry_under_the_right_key_is_rebuilt(forgery, needle, tok, monkeypatch, tmp_path,
                                                                  fnsft_log):
    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path))
    raw = data.from_memory(chats(8, forgery))
    expected, _ = data.tokenize(raw, tok, 64, False, cache=False)
    key = entry(tok, raw)
    folder = tmp_path / "tokenized" / key
    ids = [[1, 2, 3]] * 8
    forged = {
        "schema": {"assistant_mask": [[1, 1, 1]] * 8, "input_ids": ids, "_note": [""] * 8},
        "vocabulary": {"input_ids": [[1, 2, 10**6]] * 8, "assistant_masks": [[1, 1, 1]] * 8, "_note": [""] * 8},
        "masks": {"input_ids": ids, "assistant_masks": [[1, 1]] * 8, "_note": [""] * 8},
        "rows": {"input_ids": ids[:3], "assistant_masks": [[1, 1, 1]] * 3, "_note": [""] * 3},
    }.get(forgery)
    if forged is None:
        folder.mkdir(parents=True)
        (folder / "dataset_info.json").write_text("{not json")
    else:
        datasets.Dataset.from_dict(forged).save_to_disk(str(folder))
    (folder / STAMP).write_text(json.dumps({"key": key, "rows": 8}))
    train, _ = data.tokenize(data.from_memory(chats(8, forgery)), tok, 64, False)
    assert needle in fnsft_log.text
    assert train["input_ids"] == expected["input_ids"]
