"""Data that cannot mean what its author thinks is an error or a counted warning, never trained silently."""

from __future__ import annotations

import copy
import logging
import os

import pytest

from conftest import build_tokenizer, write_jsonl
from functionalnetworkssft import data
from functionalnetworkssft.errors import DataError
from hostile import cli, one_line

MISSING_MODEL = "./no-such-model-folder"
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def chat(user, reply, **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], **extra}


@pytest.fixture
def warnings_seen(caplog):
    """The package's warnings (its logger does not propagate to the root, where caplog listens)."""
    ours = logging.getLogger("functionalnetworkssft")
    ours.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    ours.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer(chat=True)


def load(tmp_path, rows, name="d.jsonl"):
    return data.load(str(write_jsonl(tmp_path / name, rows)), None, validation_split=0, seed=0)


def test_content_that_cannot_be_text_stops_the_run_with_every_kind_counted(tmp_path, capsys):
    rows = [GOOD, chat({"text": "hi"}, "a"), chat("q", ["plain", "strings"]), chat("q", {"x": 1}),
            chat("q", [{"type": "image", "url": "x.png"}]), chat("q", True), GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", MISSING_MODEL, "--dataset_name_or_path", path,
                          "--output_dir", tmp_path / "out")
    assert code == 1
    assert errors == [f"fnsft train: error: {path}: training data: {line}." for line in (
        "2 with message content that is a mapping, not text (first: example 1)",
        '1 with message content that is a list of plain strings; give text, or parts like {"type": "text", '
        '"text": "..."} (first: example 2)',
        "1 with message content with non-text parts (images, audio, ...), which text training cannot use "
        "(first: example 4)",
        "1 with message content that is true or false, not text (first: example 5)")]
    assert not (tmp_path / "out").exists()


def test_empty_replies_are_skipped_and_numbers_and_empty_prompts_are_counted(tmp_path, warnings_seen):
    rows = [GOOD, chat("q", None), chat("q", ""), chat("q", "   "), chat(None, "a"), chat("What is 6*7?", 42),
            chat("q", [{"type": "text", "text": "par"}, {"type": "text", "text": "ts"}])]
    raw = load(tmp_path, rows)
    assert [r["messages"][-1]["content"] for r in raw.train] == ["Hello", "a", "42", "parts"]
    assert raw.train[1]["messages"][0]["content"] == ""
    text = warnings_seen.text
    assert "skipped 3 of 7 training examples: 3 with an empty or null assistant message (first: example 1)" in text
    assert "1 with message content that is a number, trained as its text (first: example 5)" in text
    assert "1 with an empty or null user/system message, kept as empty text (first: example 4)" in text


def test_a_dataset_of_only_empty_replies_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable training example is left"):
        load(tmp_path, [chat("q", None), chat("q", "")])


def test_unknown_roles_are_refused_by_name_in_both_chat_formats(tmp_path):
    rows = [GOOD, {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError) as caught:
        load(tmp_path, rows)
    assert str(caught.value) == (f"{tmp_path / 'd.jsonl'}: training data: 1 with an unknown role 'narrator' (use "
                                 "system, user, assistant, tool; ShareGPT: human, gpt, system) (first: example 1).")
    with pytest.raises(DataError, match="unknown role 'wizard'"):
        load(tmp_path, [{"conversations": [{"from": "wizard", "value": "x"}, {"from": "gpt", "value": "y"}]}],
             "s.jsonl")


def test_conversations_without_an_assistant_turn_are_skipped_not_trained_on_eos(tmp_path, chat_tok, warnings_seen):
    rows = [GOOD, {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}]
    raw = load(tmp_path, rows)
    train, _ = data.tokenize(raw, chat_tok, max_length=128, train_on_prompt=False)
    assert len(train) == 1
    assert "skipped 2 train example(s) with no assistant turn (first: example 1)" in warnings_seen.text
    kept, _ = data.tokenize(raw, chat_tok, max_length=128, train_on_prompt=True)
    assert len(kept) == 3 and all(all(mask) for mask in kept["assistant_masks"])


def test_a_chat_template_that_rejects_the_data_is_one_line(tmp_path, chat_tok):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    system = {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}
    raw = load(tmp_path, [GOOD, system, system])
    with pytest.raises(DataError) as caught:
        data.tokenize(raw, tok, max_length=128, train_on_prompt=False)
    assert str(caught.value) == (f"{tmp_path / 'd.jsonl'}: the model's chat template rejects 2 train example(s) "
                                 "(first: example 1: System role not supported); fix the data, or use a model or "
                                 "template that accepts it.")


def test_templates_that_rewrite_earlier_turns_are_counted_or_refused(tmp_path, chat_tok, warnings_seen):
    two_turns = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    raw = load(tmp_path, [two_turns, two_turns])
    hides_old_replies = copy.deepcopy(chat_tok)
    hides_old_replies.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<a>[hidden]</a>"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    train, _ = data.tokenize(raw, hides_old_replies, max_length=128, train_on_prompt=False)
    assert "only the last assistant turn of each is trained" in warnings_seen.text
    trained = hides_old_replies.decode([t for t, m in zip(train[0]["input_ids"], train[0]["assistant_masks"]) if m])
    assert trained.startswith("d</assistant>")

    counts_turns = copy.deepcopy(chat_tok)
    counts_turns.chat_template = ("{{ messages|length }}:{% for m in messages %}{{ m['content'] }};{% endfor %}"
                                  "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(DataError, match="add --train_on_prompt to train on whole conversations"):
        data.tokenize(raw, counts_turns, max_length=128, train_on_prompt=False)
    whole, _ = data.tokenize(raw, counts_turns, max_length=128, train_on_prompt=True)
    assert all(all(mask) for mask in whole["assistant_masks"])


def test_a_folder_of_several_file_types_is_refused_naming_them(tmp_path):
    folder = tmp_path / "repo"
    write_jsonl(folder / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    (folder / "extra.csv").write_text("prompt,completion\nq,a\n")
    (folder / "README.md").write_text("# docs are not data")
    with pytest.raises(DataError) as caught:
        data.load(str(folder), None, validation_split=0, seed=0)
    assert "holds files of several types (csv: extra.csv; json: train.jsonl)" in str(caught.value)
    (folder / "extra.csv").unlink()
    (folder / "notes.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"other: notes.xlsx"):
        data.load(str(folder), None, validation_split=0, seed=0)


def test_a_malformed_csv_names_its_line(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhi,hello\nbad,row,extra\n")
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", MISSING_MODEL, "--dataset_name_or_path", path,
                          "--output_dir", tmp_path / "out")
    assert code == 1
    one_line(errors, f"{path}: malformed CSV: Expected 2 fields in line 3, saw 3")


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"What is 6*7?",42\n')
    raw = data.load(str(path), None, validation_split=0, seed=0)
    assert raw.train[0]["messages"][1]["content"] == "42"


def test_a_symlink_loop_is_named_and_never_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    json_loop = tmp_path / "data.json"
    os.symlink(json_loop, json_loop)
    for flag, other in (("--dataset_name_or_path", "--model_name_or_path"),
                        ("--model_name_or_path", "--dataset_name_or_path")):
        valid = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "q", "completion": "a"}])
        code, errors, _ = cli(capsys, "train", flag, "loop", other, MISSING_MODEL if other.startswith("--model")
                              else valid, "--output_dir", tmp_path / "out")
        assert code == 1
        one_line(errors, "loop: is a symbolic link that resolves nowhere (a loop or a missing target)")
    with pytest.raises(DataError, match="resolves nowhere"):
        data.load(str(json_loop), None, validation_split=0, seed=0)


def test_json_nested_beyond_reason_is_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply to be a dataset"):
        data.load(str(deep), None, validation_split=0, seed=0)
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"text": "ok"}\n' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2: nested too deeply"):
        data.load(str(lines), None, validation_split=0, seed=0)
