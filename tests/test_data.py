"""Every supported format and file type, and which tokens the loss sees."""

from __future__ import annotations

import json

import pytest

from conftest import build_tokenizer, write_jsonl
from functionalnetworkssft import data

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]

RECORDS = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                   {"from": "gpt", "value": "Goodbye"}]},
    "alpaca": {"instruction": "Greet", "input": "politely", "output": "Hello"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    "prompt_response": {"prompt": "Hi", "response": "Hello"},
    "question_answer": {"question": "Hi", "answer": "Hello"},
    "text": {"text": "Hello world"},
}


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    tok = build_tokenizer(chat=False)
    tok.pad_token = tok.eos_token
    return tok


def trained_text(tok, example) -> str:
    return tok.decode([t for t, m in zip(example["input_ids"], example["assistant_masks"]) if m])


@pytest.mark.parametrize("kind", list(RECORDS))
def test_each_format_is_detected_and_normalised(tmp_path, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[kind]] * 3)
    raw = data.load(str(path), None, validation_split=0, seed=0)
    expected = {"prompt_response": "prompt_completion", "question_answer": "prompt_completion"}.get(kind, kind)
    assert raw.format == expected
    row = raw.train[0]
    if kind == "text":
        assert row["text"] == "Hello world"
    elif kind in ("messages", "sharegpt"):
        assert row["messages"] == CHAT
    elif kind == "alpaca":
        assert row["messages"] == [{"role": "user", "content": "Greet\n\npolitely"},
                                   {"role": "assistant", "content": "Hello"}]
    else:
        assert row["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", "save_to_disk"])
def test_each_file_type_is_read(tmp_path, suffix):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".csv":
        ds.to_csv(str(path))
    elif suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    raw = data.load(str(path), None, validation_split=0.2, seed=0)
    assert len(raw.train) == 4 and len(raw.validation) == 1
    assert raw.train[0]["messages"][0]["role"] == "user"


def test_messages_stored_as_json_strings_in_csv_are_read(tmp_path):
    path = tmp_path / "chat.csv"
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(CHAT)])
    raw = data.load(str(path), None, validation_split=0, seed=0)
    assert raw.train[0]["messages"] == CHAT


def test_validation_split_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(50)])
    first = data.load(str(path), None, validation_split=0.2, seed=7)
    again = data.load(str(path), None, validation_split=0.2, seed=7)
    other = data.load(str(path), None, validation_split=0.2, seed=8)
    assert len(first.validation) == 10
    assert first.validation["text"] == again.validation["text"] != other.validation["text"]


def test_every_assistant_turn_is_trained_and_nothing_else(chat_tok):
    example = data.tokenize_example(chat_tok, {"messages": CHAT}, train_on_prompt=False, max_length=512)
    assert trained_text(chat_tok, example) == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
    full = chat_tok.decode(example["input_ids"])
    assert full == chat_tok.apply_chat_template(CHAT, tokenize=False)  # system turn kept, nothing added
    assert "Be brief." in full


def test_train_on_prompt_trains_everything(chat_tok):
    example = data.tokenize_example(chat_tok, {"messages": CHAT}, train_on_prompt=True, max_length=512)
    assert all(example["assistant_masks"])


def test_without_chat_template_turns_are_separated_by_eos(plain_tok):
    example = data.tokenize_example(plain_tok, {"messages": CHAT}, train_on_prompt=False, max_length=512)
    eos = plain_tok.eos_token
    assert plain_tok.decode(example["input_ids"]) == f"Be brief.{eos}Hi{eos}Hello{eos}Bye{eos}Goodbye{eos}"
    assert trained_text(plain_tok, example) == f"Hello{eos}Goodbye{eos}"
    assert example["input_ids"][-1] == plain_tok.eos_token_id


def test_text_examples_end_with_eos_and_train_everything(plain_tok):
    example = data.tokenize_example(plain_tok, {"text": "Hello world"}, train_on_prompt=False, max_length=512)
    assert example["input_ids"][-1] == plain_tok.eos_token_id and all(example["assistant_masks"])


def test_eos_is_appended_when_the_template_closes_turns_with_another_token(chat_tok):
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    example = data.tokenize_example(tok, {"messages": CHAT[1:3]}, train_on_prompt=False, max_length=512)
    assert example["input_ids"][-1] == tok.eos_token_id and example["assistant_masks"][-1] == 1


def test_examples_with_nothing_to_train_within_max_length_are_dropped(chat_tok, tmp_path):
    rows = [{"prompt": "word " * 200, "completion": "x"}, {"prompt": "short", "completion": "ok"}]
    raw = data.load(str(write_jsonl(tmp_path / "d.jsonl", rows)), None, validation_split=0, seed=0)
    train, _ = data.tokenize(raw, chat_tok, max_length=64, train_on_prompt=False)
    assert len(train) == 1
    assert all(len(ids) <= 64 for ids in train["input_ids"])


def test_a_folder_of_data_files_takes_its_splits_from_the_file_names(tmp_path):
    folder = tmp_path / "cloned-dataset-repo"
    write_jsonl(folder / "train.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(6)])
    write_jsonl(folder / "validation.jsonl", [{"prompt": "held", "completion": "out"}])
    raw = data.load(str(folder), None, validation_split=0.5, seed=0)
    assert len(raw.train) == 6 and len(raw.validation) == 1
    assert raw.validation[0]["messages"][0]["content"] == "held"


@pytest.mark.parametrize("name", ["someone/some-dataset", "someone/data-v1.2"])
def test_an_unreachable_hub_dataset_is_one_clear_error(monkeypatch, name):
    from functionalnetworkssft.errors import DataError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=f"^{name}: could not be read: "):
        data.load(name, "default", validation_split=0, seed=0)


@pytest.mark.parametrize("layout", ["array", "wrapped", "lines", "one_line"])
def test_json_layouts(tmp_path, layout):
    rows = [{"messages": CHAT}] * (1 if layout == "one_line" else 3)
    path = tmp_path / "d.json"
    if layout == "array":
        path.write_text(json.dumps(rows, indent=2))
    elif layout == "wrapped":
        path.write_text(json.dumps({"data": rows}, indent=2))
    else:
        write_jsonl(path, rows)
    raw = data.load(str(path), None, validation_split=0, seed=0)
    assert len(raw.train) == len(rows) and raw.train[0]["messages"] == CHAT
