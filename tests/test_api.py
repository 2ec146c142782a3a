"""The Python API: train on in-memory data, get the outputs and metrics back, and exceptions instead of exits."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_documented_example_runs(tiny_llama, tmp_path, monkeypatch, capsys):
    # `python examples/python_api.py MODEL OUT`, run as __main__ in this process, where the stack it imports is
    # already loaded: a failure raises, or exits through SystemExit.
    monkeypatch.setattr(sys, "argv", [str(ROOT / "examples" / "python_api.py"), str(tiny_llama), str(tmp_path / "out")])
    runpy.run_path(sys.argv[0], run_name="__main__")
    stdout = capsys.readouterr().out
    assert "train_loss" in stdout and "eval_loss" in stdout
    assert "verification passed" in stdout
    assert (tmp_path / "out" / "merged_model" / "model.safetensors").is_file()


def test_train_takes_lists_of_records_in_any_format_and_returns_metrics(tiny_llama, tmp_path):
    from functionalnetworkssft import TrainConfig, train

    rows = [{"instruction": f"Describe item {i}.", "output": "It is blue."} for i in range(16)]
    result = train(TrainConfig(model_name_or_path=str(tiny_llama), output_dir=str(tmp_path / "out"), use_peft=True,
                               max_steps=2, validation_split=0),
                   train_dataset=rows[:12], eval_dataset=rows[12:])
    assert result.output_dir == tmp_path / "out"
    assert result.metrics["train_loss"] > 0 and "eval_loss" in result.metrics
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_problems_are_raised_as_exceptions_with_the_cli_messages(tiny_llama, tmp_path):
    from functionalnetworkssft import TrainConfig, train
    from functionalnetworkssft.errors import DataError, UsageError

    with pytest.raises(UsageError) as caught:
        train(TrainConfig(model_name_or_path=str(tiny_llama), output_dir=str(tmp_path / "o"), lora_r=0,
                          use_peft=True))
    assert caught.value.problems == ["--lora_r must be positive (got 0).",
                                     "--dataset_name_or_path is missing; give a path or Hub id (or `datasets:` "
                                     "entries in the config file)."]
    with pytest.raises(DataError, match="match no supported format"):
        train(TrainConfig(model_name_or_path=str(tiny_llama), output_dir=str(tmp_path / "o")),
              train_dataset=[{"foo": 1}])
    with pytest.raises(DataError, match="expected a datasets.Dataset or a list of records"):
        train(TrainConfig(model_name_or_path=str(tiny_llama), output_dir=str(tmp_path / "o")),
              train_dataset="not data")
    assert not (tmp_path / "o").exists()


def test_the_package_imports_lightly_and_exposes_the_api():
    code = "import sys, functionalnetworkssft as f; assert 'torch' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    # Resolving the names imports the stack: done here, in the test process, where it is already loaded.
    from functionalnetworkssft import TrainConfig, merge_adapter, push, train

    assert all(callable(f) for f in (TrainConfig, merge_adapter, push, train))
