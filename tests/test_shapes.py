"""Every common data shape trains the right tokens: TRL's conversational prompt/completion, tool use, plain text under
another column; and a chat template given with --chat_template_path is trained with and shipped with the model."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import TOY, build_tokenizer, write_jsonl
from functionalnetworkssft import data
from functionalnetworkssft.errors import DataError
from hostile import cli, one_line

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example["input_ids"], example["assistant_masks"]) if m])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


def tokenized(tmp_path, tokenizer, rows, **load):
    raw = data.load(str(write_jsonl(tmp_path / "d.jsonl", rows)), None, validation_split=0, seed=0, **load)
    train, _ = data.tokenize(raw, tokenizer, max_length=512, train_on_prompt=False)
    return raw, train


def test_conversational_prompt_completion_trains_the_completion_turns(tmp_path, tok):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello there"}]}] * 3
    raw, train = tokenized(tmp_path, tok, rows)
    assert raw.train[0]["messages"][:3] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello there"}]
    assert trained(tok, train[0]) == "Hello there<|im_end|>\n"


def test_tool_calls_and_results_are_rendered_with_the_template_and_the_calls_trained(tmp_path, tok):
    tool_tok = copy.deepcopy(tok)
    tool_tok.chat_template = TOOL_TEMPLATE
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    rows = [{"messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "name": "weather", "content": "sunny"},
                          {"role": "assistant", "content": "It is sunny."}],
             "tools": [WEATHER]}] * 2
    _, train = tokenized(tmp_path, tool_tok, rows)
    text = tool_tok.decode(train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nTools: weather <|im_end|>")
    assert '<call>weather {"city": "Paris"}</call>' in text and "<|im_start|>tool\nsunny" in text
    assert trained(tool_tok, train[0]) == ('<call>weather {"city": "Paris"}</call><|im_end|>\n'
                                           "It is sunny.<|im_end|>\n")


def test_tool_data_with_a_template_that_cannot_render_tools_is_refused(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}],
             "tools": [WEATHER]}]
    with pytest.raises(DataError, match="the model's chat template has no tool support"):
        tokenized(tmp_path, tok, rows)


def test_plain_text_under_another_column(tmp_path, tok, capsys):
    rows = [{"body": f"Line {i} of the corpus."} for i in range(4)]
    raw, train = tokenized(tmp_path, tok, rows, text_field="body")
    assert raw.format == "text" and tok.decode(train[0]["input_ids"]).startswith("Line 0 of the corpus.")
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", "./none", "--dataset_name_or_path",
                          tmp_path / "d.jsonl", "--output_dir", tmp_path / "out")
    assert code == 1
    one_line(errors, "columns ['body'] match no supported format", "pass --dataset_text_field NAME")


def test_a_chat_template_given_for_training_ships_with_the_merged_model(tiny_gpt2, tmp_path, capsys):
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    rows = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_gpt2, "--dataset_name_or_path", rows,
                          "--output_dir", out, "--use_peft", "--max_steps", "1", "--validation_split", "0",
                          "--merge_adapter_with_base", "--chat_template_path", template)
    assert code == 0, errors
    from transformers import AutoTokenizer

    for folder in ("final_model", "merged_model"):
        assert AutoTokenizer.from_pretrained(out / folder).chat_template == template.read_text()
    assert json.loads((out / "merged_model" / "merge_report.json").read_text())["verification"]["status"] == "passed"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_gpt2, "--dataset_name_or_path", rows,
                          "--output_dir", tmp_path / "out2", "--chat_template_path", bad)
    assert code == 2
    one_line(errors, f"--chat_template_path {bad}: not a valid Jinja template")


def test_several_sources_in_one_run_each_in_its_own_format(tiny_llama, tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", TOY[:10])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Plain line {i}."} for i in range(6)])
    held = write_jsonl(tmp_path / "held.jsonl", TOY[30:34])
    out = tmp_path / "out"
    code, errors, printed = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", chat,
                                text, "--eval_dataset_name_or_path", held, "--output_dir", out, "--use_peft",
                                "--max_steps", "1")
    assert code == 0, errors
    assert "Data: 16 training and 4 validation examples (mixed (prompt_completion, text) format" in printed
    assert f"  {chat}: 10 examples (prompt_completion format)" in printed
    assert f"  {text}: 6 examples (text format)" in printed


def test_config_file_dataset_entries_take_config_split_and_samples(tmp_path):
    import datasets

    from functionalnetworkssft.options import parse
    from functionalnetworkssft.training.config import TrainConfig

    folder = tmp_path / "hub-like"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TOY[:20]),
                          "extra": datasets.Dataset.from_list(TOY[20:30])}).save_to_disk(str(folder))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"row {i}"} for i in range(10)])
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: m\noutput_dir: o\nvalidation_split: 0\ndatasets:\n"
                      f"  - path: {folder}\n    split: extra\n    samples: 4\n"
                      f"  - path: {plain}\n    samples: 0.5\n  - {plain}\n")
    cfg = parse(TrainConfig, ["--config", str(config)], "fnsft train")
    assert cfg.problems() == []
    raw = data.load_sources(cfg.sources(), None, 0, 0)
    assert [count for _, _, count in raw.sources] == [4, 5, 10]
    assert all(r["messages"][0]["content"].startswith("Tell me about item 2") for r in raw.train.select(range(4)))
    assert "datasets" in cfg.to_yaml_dict()
    config.write_text("model_name_or_path: m\noutput_dir: o\ndatasets:\n  - {split: train}\n  - path: x\n"
                      "    samples: -1\n    colour: red\n")
    problems = parse(TrainConfig, ["--config", str(config)], "fnsft train").problems()
    assert problems == ["datasets: entry 1 needs a path: a file, folder or Hub dataset id.",
                        "datasets: entry 2: unknown key(s) colour; use path, config, split, samples.",
                        "datasets: entry 2: samples must be a count of examples or a fraction below 1 (got -1)."]
    with pytest.raises(DataError, match="no split 'nope' .it has train, extra.; choose one with --dataset_split"):
        data.load_sources([data.Source(str(folder), split="nope")], None, 0, 0)
