"""Hostile values reach one line naming the flag or file, never "unexpected ...": template files, settings built in
Python, and values the command line accepts but the data cannot."""

from __future__ import annotations

import io
import json
import sys

import pytest

from conftest import TOY, write_jsonl
from functionalnetworkssft.cli import main
from functionalnetworkssft.errors import UsageError
from hostile import cli, one_line

LAYOUT = {"captured_layers_sorted": [0, 1], "hidden_size": 32}


@pytest.mark.parametrize("templates, needle", [
    ({"0": {"²": [1]}}, "layer '²' is not among the captured layers"),
    ({"¹": {"0": [1]}}, "component '¹' must be a whole number"),
    ({"0": {"0": ["³"]}}, "channels must be indices below 32"),
    ({"0": {"0": [1]}, "00": {"1": [2]}}, "component 0 appears twice"),
    ({"0": {"1": [1], "01": [2]}}, "layer 1 appears twice"),
])
def test_template_files_with_lookalike_or_repeated_ids_are_one_line(templates, needle, tmp_path):
    from functionalnetworkssft.networks.templates import read_templates

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"layout": LAYOUT, "templates": templates}))
    with pytest.raises(UsageError) as caught:
        read_templates(path)
    assert len(caught.value.problems) == 1 and needle in caught.value.problems[0], caught.value.problems


def test_a_lookalike_digit_in_a_template_file_is_one_line_from_the_command_line(tiny_llama, tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"layout": LAYOUT, "templates": {"¹": {"0": [1]}}}))
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out", "--use_peft", "--mask_mode", "lesion",
                          "--ica_template_path", path)
    assert code == 2
    one_line(errors, f"--ica_template_path {path}", "component '¹'")


@pytest.mark.parametrize("settings, needle", [
    ({"lora_r": "sixteen"}, "--lora_r must be a whole number (got 'sixteen')"),
    ({"output_dir": 5}, "--output_dir must be text (got 5)"),
    ({"use_peft": "yes"}, "--use_peft must be true or false (got 'yes')"),
    ({"learning_rate": "3e-4"}, "--learning_rate must be a number (or None) (got '3e-4')"),
    ({"torch_dtype": "fp8"}, "--torch_dtype must be one of auto, float32, bfloat16, float16 (got 'fp8')"),
    ({"lora_target_modules": "q_proj"}, "--lora_target_modules must be a list of text values"),
])
def test_the_python_api_raises_usage_error_for_a_setting_of_the_wrong_type(settings, needle, tmp_path):
    from functionalnetworkssft import TrainConfig, train

    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    values = {"model_name_or_path": "m", "output_dir": str(tmp_path / "out"), "dataset_name_or_path": [str(data)],
              **settings}
    with pytest.raises(UsageError) as caught:
        train(TrainConfig(**values))
    assert any(needle in line for line in caught.value.problems), caught.value.problems
    assert not (tmp_path / "out").exists()


def test_an_empty_prompt_is_called_empty_and_a_missing_one_required(tiny_llama, capsys):
    code, errors, _ = cli(capsys, "generate", tiny_llama, "--prompt", "")
    assert code == 2
    one_line(errors, "--prompt is empty")
    code, errors, _ = cli(capsys, "generate", tiny_llama, "--prompt", "  \n ")
    one_line(errors, "--prompt is empty")
    code, errors, _ = cli(capsys, "generate", tiny_llama)
    assert code == 2
    one_line(errors, "--prompt is required")


def test_more_ica_components_than_channels_is_one_line_before_anything_is_collected(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    code, errors, printed = cli(capsys, "templates", tiny_llama, data, "--ica_components", "100", "--output",
                                tmp_path / "t.json")
    assert code == 2
    one_line(errors, "--ica_components 100 is more than the 64 MLP channels captured (2 layers x 32)")
    assert not (tmp_path / "t.json").exists()


class _Stdin:
    """stdin as a terminal program sees it: text on top, the raw bytes underneath."""

    def __init__(self, raw: bytes):
        self.buffer = io.BytesIO(raw)

    def isatty(self) -> bool:
        return False


def test_chat_refuses_lines_that_are_not_text_or_too_long_and_keeps_going(tiny_llama, monkeypatch, capsys):
    from functionalnetworkssft import generate

    seen = []
    real = generate.reply

    def recording_reply(model, tokenizer, messages, *args, **kwargs):
        seen.append([m["content"] for m in messages])
        return real(model, tokenizer, messages, 2)

    monkeypatch.setattr(generate, "reply", recording_reply)
    huge = ("word " * 200_000).encode()  # 1 MB on one line, for a model that reads 256 positions
    monkeypatch.setattr(sys, "stdin", _Stdin(b"\xff\xfe broken\nnul\x00here\n" + huge + b"\nHello\n"))
    assert main(["chat", str(tiny_llama), "--max_new_tokens", "2"]) == 0
    said = capsys.readouterr().err
    assert "(that line is not UTF-8 text; nothing was sent)" in said
    assert "(that line holds a NUL character; nothing was sent)" in said
    assert "tokens long and the model reads at most 256; shorten it.)" in said
    assert seen[-1] == ["Hello"]  # the refused lines never joined the conversation


def test_a_reply_never_runs_past_the_model_context(tiny_llama, capsys):
    assert main(["generate", str(tiny_llama), "--prompt", "Hi", "--max_new_tokens", "1000000000000"]) == 0
    assert "(the reply is capped at" in capsys.readouterr().err
    code, errors, _ = cli(capsys, "generate", tiny_llama, "--prompt", "word " * 2000)
    assert code == 2
    one_line(errors, "tokens long and the model reads at most 256")


def test_trainer_entries_that_fnsft_sets_or_derives_are_refused_naming_the_flag(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\ndataset_name_or_path: d.jsonl\noutput_dir: o\ntrainer:\n"
                      "  chat_template_path: other.jinja\n  assistant_only_loss: false\n  dataset_text_field: body\n"
                      "  truncation_mode: keep_end\n  loss_type: nll\n")
    code, errors, _ = cli(capsys, "train", "--config", config)
    assert code == 2
    assert [line.split("error: ", 1)[1] for line in errors] == [
        "trainer: chat_template_path is set by fnsft; use its flag (--chat_template_path) or leave it out.",
        "trainer: assistant_only_loss is set by fnsft; use its flag (--train_on_prompt) or leave it out.",
        "trainer: dataset_text_field is set by fnsft; use its flag (--dataset_text_field) or leave it out.",
        "trainer: truncation_mode is set by fnsft; fnsft decides it; leave it out."]


def test_every_field_fnsft_passes_to_sftconfig_is_refused_in_trainer():
    import ast
    import inspect

    from functionalnetworkssft.training import trainer
    from functionalnetworkssft.training.config import MANAGED_TRAINER_FIELDS

    tree = ast.parse(inspect.getsource(trainer.sft_config))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") ==
                "SFTConfig")
    passed = {keyword.arg for keyword in call.keywords if keyword.arg}
    assert passed and passed <= set(MANAGED_TRAINER_FIELDS), passed - set(MANAGED_TRAINER_FIELDS)


def test_asking_a_dataset_for_more_samples_than_it_has_is_refused_naming_both_counts(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:12] if len(TOY) >= 12 else (TOY * 12)[:12])
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: ./never-loaded\noutput_dir: {tmp_path / 'out'}\ndatasets:\n"
                      f"  - path: {data}\n    samples: 100\n")
    code, errors, printed = cli(capsys, "train", "--config", config)
    assert code == 2
    one_line(errors, f"datasets: {data} asks for 100 samples, but its split 'train' has 12 examples")
    assert "Data:" not in printed and not (tmp_path / "out").exists()


def test_an_export_under_a_file_size_limit_is_one_line_and_leaves_no_file(tiny_llama, tmp_path):
    import resource

    from hostile import error_lines, no_traceback, run_fnsft

    limit = 50_000  # the f32 GGUF of the tiny model is larger: ulimit -f stops the write
    result = run_fnsft("export-gguf", tiny_llama, "--outfile", tmp_path / "model.gguf", "--outtype", "f32",
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1
    no_traceback(result.stderr)
    one_line(error_lines(result.stderr), f"a file size limit was reached (ulimit -f allows {limit} bytes per file)")
    assert not (tmp_path / "model.gguf").exists()


def test_an_outfile_name_the_modelfile_cannot_hold_is_refused(tiny_llama, tmp_path, capsys):
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "evil\nADAPTER x.gguf")
    assert code == 2
    one_line(errors, "the name holds a line break or control character")
    assert list(tmp_path.iterdir()) == []
