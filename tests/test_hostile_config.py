"""Hostile flags and config files: values are values, never flags; bad shapes, non-finite numbers and YAML bombs are
one line each, exit status 2, before anything is read or written."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from conftest import write_jsonl
from functionalnetworkssft.options import load_yaml_file, parse
from functionalnetworkssft.training.config import TrainConfig
from functionalnetworkssft.errors import UsageError
from hostile import cli, one_line

MISSING_MODEL = "./no-such-model-folder"


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4)


def config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_yaml_list_value_that_looks_like_a_flag_stays_a_value(tmp_path):
    path = config(tmp_path, "model_name_or_path: m\ndataset_name_or_path: d\noutput_dir: o\n"
                            "sample_prompts: ['Hello', '--trust_remote_code', '--use_peft']\n"
                            "lora_target_modules: ['--push_to_hub']\n")
    cfg = parse(TrainConfig, ["--config", str(path)], "fnsft train")
    assert cfg.sample_prompts == ["Hello", "--trust_remote_code", "--use_peft"]
    assert cfg.lora_target_modules == ["--push_to_hub"]
    assert cfg.trust_remote_code is False and cfg.use_peft is False and cfg.push_to_hub is False
    assert cfg.config_file == str(path)


def test_config_equals_form_is_read_and_a_second_config_is_refused(tmp_path, capsys, data):
    path = config(tmp_path, f"model_name_or_path: m\ndataset_name_or_path: {data}\noutput_dir: o\nlora_r: 7\n")
    assert parse(TrainConfig, [f"--config={path}"], "fnsft train").lora_r == 7
    code, errors, _ = cli(capsys, "train", "--config", path, "--config", path)
    assert code == 2
    one_line(errors, "--config is given twice")


def test_values_of_the_wrong_shape_are_each_named_with_key_and_file(tmp_path, capsys):
    path = config(tmp_path, "model_name_or_path: m\ndataset_name_or_path: d\noutput_dir: o\n"
                            "lora_r: [8, 16]\nsample_prompts: {a: b}\nlearning_rate: true\nlora_alpha: many\n"
                            "max_steps: 2.5\ntorch_dtype: float8\nuse_peft: maybe\nreport_to: [[none]]\n")
    code, errors, _ = cli(capsys, "train", "--config", path)
    assert code == 2
    expected = {"lora_r": "a whole number, got a list", "sample_prompts": "a list of text values, got a mapping",
                "learning_rate": "a number, got true", "lora_alpha": "a whole number, got 'many'",
                "max_steps": "a whole number, got 2.5", "torch_dtype": "one of auto, float32",
                "use_peft": "true or false, got 'maybe'", "report_to": "got a list holding a mapping or list"}
    assert len(errors) == len(expected), errors
    for key, needle in expected.items():
        assert any(f"--config {path}: key '{key}'" in line and needle in line for line in errors), (key, errors)


def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 30):
        prev = chr(ord("a") + (level - 1) % 26) * (1 + (level - 1) // 26)
        name = chr(ord("a") + level % 26) * (1 + level // 26)
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    lines.append(f"sample_prompts: *{name}")
    path = config(tmp_path, "\n".join(lines) + "\n")  # 8^29 strings once expanded
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(UsageError, match=r"aliases \(\*name\) are not allowed"):
        load_yaml_file(str(path))
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2 and peak < 16 << 20, (seconds, peak)
    code, errors, _ = cli(capsys, "train", "--config", path)
    assert code == 2
    one_line(errors, str(path), "aliases (*name) are not allowed")


@pytest.mark.parametrize("text, needle", [
    ("lora_r: 4\nlora_r: 8\n", "key 'lora_r' appears twice"),
    ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("- a\n- b\n", "expected a mapping of flag names to values, got a list"),
    ("lora_r: 4\n\tbad: indent\n", "not valid YAML (line 2)"),
    ("{1: 2, model_name_or_path: m}\n", "unknown key '1'"),
])
def test_malformed_config_files_are_one_line(tmp_path, capsys, text, needle):
    code, errors, _ = cli(capsys, "train", "--config", config(tmp_path, text))
    assert code == 2
    one_line(errors, needle)


def test_huge_missing_binary_and_folder_config_files_are_one_line(tmp_path, capsys):
    huge = tmp_path / "huge.yaml"
    huge.write_text("sample_prompts:\n" + "  - x\n" * 300_000)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lora_r: \xff\xfe\n")
    for path, needle in ((huge, "larger than 1 MiB"), (binary, "not UTF-8"), (tmp_path / "nope.yaml", "no such file"),
                         (tmp_path, "is a folder")):
        code, errors, _ = cli(capsys, "train", "--config", path)
        assert code == 2
        one_line(errors, str(path), needle)


@pytest.mark.parametrize("flags, needles", [
    (["--learning_rate", "inf"], ["--learning_rate must be a finite number (got inf)"]),
    (["--learning_rate", "nan", "--lora_dropout", "nan", "--warmup_ratio=-inf", "--num_train_epochs", "nan"],
     ["--learning_rate must be a finite", "--lora_dropout must be a finite", "--warmup_ratio must be a finite",
      "--num_train_epochs must be a finite"]),
    (["--seed", "-1"], ["--seed must be in [0, 4294967296) (got -1)"]),
    (["--seed", str(2**40)], ["--seed must be in [0, 4294967296)"]),
    (["--max_seq_length", "0", "--save_total_limit", "-2"], ["--max_seq_length must be positive",
                                                             "--save_total_limit must be at least 0"]),
    (["--output_dir", " "], ["--output_dir is empty"]),
    (["--lora_target_modules", ""], ["--lora_target_modules needs at least one module name"]),
])
def test_hostile_numbers_and_empty_values_are_rejected_before_anything_is_read(capsys, tmp_path, data, flags,
                                                                               needles):
    out = tmp_path / "out"
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", MISSING_MODEL, "--dataset_name_or_path", data,
                          "--output_dir", out, *flags)
    assert code == 2
    assert len(errors) == len(needles), errors
    for needle in needles:
        assert any(needle in line for line in errors), (needle, errors)
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--max_new_tokens", "-5"], "--max_new_tokens must be positive (got -5)"),
    (["--temperature", "nan"], "--temperature must be a finite number (got nan)"),
    (["--temperature", "-1"], "--temperature must be at least 0 (got -1)"),
])
def test_generate_rejects_hostile_numbers_before_loading(capsys, flags, needle):
    code, errors, _ = cli(capsys, "generate", MISSING_MODEL, "--prompt", "hi", *flags)
    assert code == 2
    one_line(errors, needle)


def test_a_nul_byte_in_a_value_is_a_usage_error():
    cfg = TrainConfig(model_name_or_path="m\x00", dataset_name_or_path="d", output_dir="o")
    assert any("NUL byte" in p for p in cfg.problems())


def test_required_values_may_come_from_the_file_and_missing_ones_are_all_listed(tmp_path):
    with pytest.raises(UsageError) as caught:
        parse(TrainConfig, ["--config", str(config(tmp_path, "lora_r: 4\n"))], "fnsft train")
    lines = caught.value.problems
    assert [line.split(" is required")[0] for line in lines] == ["--model_name_or_path", "--output_dir"]
