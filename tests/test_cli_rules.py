"""Flag rules, config files and bad data: one line per problem, the right exit status, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from functionalnetworkssft.cli import main

MISSING_MODEL = "./no-such-model-folder"


def run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", *args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("fnsft train: error:")]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4)


def base_args(data: Path, out: Path) -> list[str]:
    # The model does not exist: a rule violation must be reported without ever trying to load it.
    return ["--model_name_or_path", MISSING_MODEL, "--dataset_name_or_path", str(data), "--output_dir", str(out)]


@pytest.mark.parametrize("flags, needle", [
    (["--merge_adapter_with_base"], "--merge_adapter_with_base needs --use_peft"),
    (["--use_peft", "--upload_merged_model"], "--upload_merged_model needs both --push_to_hub and "
                                              "--merge_adapter_with_base"),
    (["--use_peft", "--push_to_hub"], "--push_to_hub needs --hub_repo_id"),
    (["--use_peft", "--use_4bit", "--use_8bit"], "--use_4bit and --use_8bit exclude each other"),
    (["--use_4bit"], "--use_4bit (quantized training) needs --use_peft"),
    (["--use_8bit"], "--use_8bit (quantized training) needs --use_peft"),
    (["--validation_split", "1.5"], "--validation_split must be in [0, 1)"),
    (["--resume_from_checkpoint", "latest"], "no complete checkpoint-N folder"),
])
def test_each_flag_rule_exits_2_naming_the_flag_and_writes_nothing(capsys, tmp_path, data, flags, needle):
    out = tmp_path / "out"
    code, lines = run(capsys, *base_args(data, out), *flags)
    assert code == 2
    assert any(needle in line for line in lines), lines
    assert not out.exists()


def test_a_k_quant_export_without_llama_cpps_quantizer_is_refused_before_training(capsys, tmp_path, data,
                                                                                    monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp"
                        else find_spec(name, *a))
    out = tmp_path / "out"
    code, lines = run(capsys, *base_args(data, out), "--use_peft", "--merge_adapter_with_base", "--convert_to_gguf",
                      "--gguf_outtype", "q4_k_m")
    assert code == 2
    assert any("--gguf_outtype q4_k_m: k-quants are made by llama.cpp's quantizer" in line for line in lines), lines
    assert not out.exists()


def test_all_problems_are_reported_together(capsys, tmp_path, data):
    out = tmp_path / "out"
    code, lines = run(capsys, *base_args(data, out), "--merge_adapter_with_base", "--push_to_hub", "--use_4bit",
                      "--use_8bit", "--lora_r", "0")
    assert code == 2
    joined = "\n".join(lines)
    for needle in ("--merge_adapter_with_base", "--push_to_hub needs --hub_repo_id", "exclude each other",
                   "needs --use_peft: quantized", "--lora_r must be positive"):
        assert needle in joined
    assert len(lines) >= 5


def test_an_earlier_run_in_output_dir_is_protected(capsys, tmp_path, data):
    out = tmp_path / "out"
    (out / "final_model").mkdir(parents=True)
    (out / "fnsft_outputs.json").write_text(json.dumps({"entries": ["final_model", "trainer_state.json"]}))
    (out / "trainer_state.json").write_text("{}")
    code, lines = run(capsys, *base_args(data, out), "--use_peft")
    assert code == 2
    assert "--overwrite_output_dir" in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["final_model", "fnsft_outputs.json", "trainer_state.json"]


def test_unknown_flag_and_bad_value_are_one_line_usage_errors(capsys, tmp_path, data):
    code, lines = run(capsys, *base_args(data, tmp_path / "o"), "--lora_rank", "8")
    assert code == 2 and "--lora_rank" in lines[0]
    code, lines = run(capsys, *base_args(data, tmp_path / "o"), "--learning_rate", "fast")
    assert code == 2 and "--learning_rate" in lines[0]
    code, lines = run(capsys, *base_args(data, tmp_path / "o"), "--torch_dtype", "float8")
    assert code == 2 and "--torch_dtype" in lines[0]


def test_config_file_keys_are_flags_and_the_command_line_wins(tmp_path, data):
    from functionalnetworkssft.options import parse
    from functionalnetworkssft.training.config import TrainConfig

    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: m\ndataset_name_or_path: {data}\noutput_dir: o\nuse_peft: true\n"
                      "learning_rate: 2e-4\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = parse(TrainConfig, ["--config", str(config), "--lora_r", "32"], "fnsft train")
    assert cfg.use_peft is True
    assert cfg.learning_rate == 2e-4  # YAML reads "2e-4" as a string; it must still become a float
    assert cfg.lora_r == 32
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_unknown_config_keys_are_all_listed_with_suggestions(capsys, tmp_path, data):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nlearning_rat: 1e-4\nlora_rank: 8\n")
    code = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'learning_rat'; did you mean 'learning_rate'?" in err
    assert "unknown key 'lora_rank'" in err


def test_saved_run_config_masks_the_hub_token():
    from functionalnetworkssft.training.config import TrainConfig

    cfg = TrainConfig(model_name_or_path="m", dataset_name_or_path="d", output_dir="o", hub_token="hf_secret")
    assert "hf_secret" not in json.dumps(cfg.to_yaml_dict())


# ---------------------------------------------------------------------------------------------------------------
# Bad data: exit 1, one line, checked before the model is loaded.


def data_error(capsys, tmp_path, dataset: Path | str, model: str = MISSING_MODEL) -> tuple[int, list[str]]:
    return run(capsys, "--model_name_or_path", model, "--dataset_name_or_path", str(dataset), "--output_dir",
               str(tmp_path / "out"))


def test_malformed_json_line_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    code, lines = data_error(capsys, tmp_path, path)
    assert code == 1
    assert lines == [f"fnsft train: error: {path}: line 3: invalid JSON (Expecting value)."]
    assert not (tmp_path / "out").exists()


def test_empty_dataset_says_so(capsys, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    code, lines = data_error(capsys, tmp_path, path)
    assert code == 1 and "empty" in lines[0]


def test_unknown_columns_are_listed_with_supported_formats(capsys, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    code, lines = data_error(capsys, tmp_path, path)
    assert code == 1
    assert "['bar', 'foo']" in lines[0] and "messages" in lines[0] and "Alpaca" in lines[0]


def test_missing_dataset_file_names_the_path(capsys, tmp_path):
    code, lines = data_error(capsys, tmp_path, tmp_path / "nope.json")
    assert code == 1 and "nope.json: no such file" in lines[0]


def test_missing_model_names_the_path_after_the_data_is_checked(capsys, tmp_path, data):
    code, lines = data_error(capsys, tmp_path, data)
    assert code == 1 and MISSING_MODEL in lines[0] and "no such model" in lines[0]


def test_malformed_record_names_its_index(capsys, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]},
                                                 {"messages": [{"content": "no role"}]}])
    code, lines = data_error(capsys, tmp_path, path)
    assert code == 1 and "example 1" in lines[0]


def test_a_tracker_that_is_not_installed_is_a_usage_error(capsys, tmp_path, data):
    import importlib.util

    assert importlib.util.find_spec("wandb") is None  # the test environment does not ship it
    code, lines = run(capsys, *base_args(data, tmp_path / "o"), "--report_to", "wandb")
    assert code == 2 and "pip install wandb" in lines[0]


def test_the_optimizers_known_without_importing_transformers_are_transformers_names():
    from transformers.training_args import OptimizerNames

    from functionalnetworkssft.training.config import COMMON_OPTIMIZERS

    assert COMMON_OPTIMIZERS <= {o.value for o in OptimizerNames}


def _commands_configs():
    from functionalnetworkssft.training.config import TrainConfig
    from functionalnetworkssft.export.command import ExportConfig
    from functionalnetworkssft.generate import SamplingOptions
    from functionalnetworkssft.hub.command import PushConfig
    from functionalnetworkssft.merge.command import MergeConfig
    from functionalnetworkssft.networks.command import TemplatesConfig

    return [TrainConfig, MergeConfig, TemplatesConfig, PushConfig, ExportConfig, SamplingOptions]


@pytest.mark.parametrize("cls", _commands_configs(), ids=lambda c: c.__name__)
def test_flags_are_the_ones_transformers_argument_parser_makes(cls):
    """Our dataclass-to-flags builder stands in for HfArgumentParser (to spare every command the import): each flag
    must keep its spellings, defaults, arity, choices and value parsing."""
    import copy
    import types

    from transformers import HfArgumentParser

    from functionalnetworkssft.options import ALIASES, BOUNDS
    from functionalnetworkssft.options.flags import _field_flags

    def plain(f):
        f = copy.copy(f)
        f.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in (BOUNDS, ALIASES)})
        return f

    class Reference(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, dataclass_field):
            HfArgumentParser._parse_dataclass_field(parser, plain(dataclass_field))

    theirs = [a for a in Reference(cls)._actions if a.dest != "help"]
    ours = [a for a in _field_flags(cls)._actions if a.dest != "help"]
    assert [a.option_strings for a in ours] == [a.option_strings for a in theirs]
    for mine, reference in zip(ours, theirs):
        for attr in ("dest", "nargs", "const", "default", "choices", "required", "help"):
            assert getattr(mine, attr) == getattr(reference, attr), (mine.dest, attr)
        for text in [str(c) for c in reference.choices or ()] + (["yes", "0", "T"] if reference.const is True else []):
            assert mine.type(text) == reference.type(text), (mine.dest, text)


def test_parsing_a_command_line_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys; from functionalnetworkssft.options import parse; "
            "from functionalnetworkssft.training.config import TrainConfig; "
            "parse(TrainConfig, ['--model_name_or_path', 'm', '--dataset_name_or_path', 'd', '--output_dir', 'o', "
            "'--use_peft', '--lora_target_modules', 'q_proj', 'v_proj'], 'fnsft train'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_is_printed_like_every_cli_of_the_ecosystem(capsys):
    import tomllib

    from functionalnetworkssft import __version__

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"fnsft {declared}\n"
    assert "fnsft --version" in (main(["--help"]), capsys.readouterr().out)[1]
