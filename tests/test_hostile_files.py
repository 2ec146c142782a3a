"""Damaged, hostile and foreign files: one line naming the file and the fix, exit status 1 or 2, never a traceback,
never a huge allocation, never code run that the user did not allow."""

from __future__ import annotations

import json
import pickle
import re
import resource
import shutil
import struct
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from hostile import cli, error_lines, listing, no_traceback, one_line, run_fnsft
from test_merge import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "adapter", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"], tokenizer_from=tiny_llama)


def damaged_copy(folder: Path, tmp_path: Path, name: str, damage) -> Path:
    copy = tmp_path / f"{folder.name}-damaged"
    shutil.copytree(folder, copy)
    target = copy / name
    target.write_bytes(damage(target.read_bytes()))
    return copy


DAMAGE = {
    "truncated": (lambda b: b[: len(b) // 2], "the file ends before its last tensor"),
    "header length 2^62": (lambda b: struct.pack("<Q", 2**62) + b[8:], "its header claims 4611686018427387904 bytes"),
    "garbage header": (lambda b: b[:8] + b"\x00" * (len(b) - 8), "its header is not valid JSON"),
    "empty": (lambda b: b"", "the file is shorter than a safetensors header"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_file_is_one_line_for_merge_and_generate(adapter, tmp_path, capsys, damage):
    change, needle = DAMAGE[damage]
    broken = damaged_copy(adapter, tmp_path, "adapter_model.safetensors", change)
    code, errors, _ = cli(capsys, "merge", "--adapter_path", broken, "--output_dir", tmp_path / "merged")
    assert code == 1
    one_line(errors, f"{broken / 'adapter_model.safetensors'}: {needle}")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    code, errors, _ = cli(capsys, "generate", broken, "--prompt", "hi", "--max_new_tokens", "2")
    assert code == 1
    one_line(errors, f"{broken / 'adapter_model.safetensors'}: {needle}")


@pytest.mark.parametrize("damage", ["truncated", "header length 2^62"])
def test_a_damaged_base_model_is_one_line_for_merge_train_and_generate(tiny_llama, adapter, tmp_path, capsys, damage):
    change, needle = DAMAGE[damage]
    base = damaged_copy(tiny_llama, tmp_path, "model.safetensors", change)
    code, errors, _ = cli(capsys, "merge", "--adapter_path", adapter, "--base_model_name_or_path", base,
                          "--output_dir", tmp_path / "merged")
    assert code == 1
    one_line(errors, f"--base_model_name_or_path {base}: model.safetensors: {needle}", "re-download")
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", base, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out")
    assert code == 1
    one_line(errors, f"--model_name_or_path {base}: model.safetensors: {needle}")
    assert not (tmp_path / "out").exists()
    code, errors, _ = cli(capsys, "generate", base, "--prompt", "hi")
    assert code == 1
    one_line(errors, f"model {base}: model.safetensors: {needle}")


@pytest.mark.parametrize("weight_map", [{"lm_head.weight": "../../outside.safetensors"}, {"lm_head.weight": 7}],
                         ids=["path outside the folder", "not a name"])
def test_a_sharded_base_whose_index_names_no_file_beside_it_is_one_line_and_never_followed(
        tiny_llama, adapter, tmp_path, capsys, weight_map):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, errors, _ = cli(capsys, "merge", "--adapter_path", adapter, "--base_model_name_or_path", base,
                          "--output_dir", tmp_path / "merged")
    assert code == 1
    one_line(errors, "model.safetensors.index.json is damaged", "re-download")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("config, needle", [
    ([1, 2], "expected a JSON object of LoRA settings, got a list"),
    ({"peft_type": "LORA", "r": 0, "base_model_name_or_path": "x"}, "r must be a positive whole number (got 0)"),
    ({"peft_type": "LORA", "r": "8", "lora_alpha": float("nan")}, "r must be a positive whole number (got '8')"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_adapter_config_is_one_line_for_merge_and_generate(adapter, tmp_path, capsys, config, needle):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for argv in (["merge", "--adapter_path", broken, "--output_dir", tmp_path / "m"],
                 ["generate", broken, "--prompt", "hi"]):
        code, errors, _ = cli(capsys, *argv)
        assert code == 2
        assert errors and all(str(broken / "adapter_config.json") in e for e in errors), errors
        assert needle in errors[0]


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_adapter_is_refused_without_running_it(adapter, tmp_path, capsys):
    hostile = tmp_path / "hostile-adapter"
    shutil.copytree(adapter, hostile)
    (hostile / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (hostile / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    for argv in (["generate", hostile, "--prompt", "hi"],
                 ["merge", "--adapter_path", hostile, "--output_dir", tmp_path / "m"]):
        code, errors, _ = cli(capsys, *argv)
        assert code == 1
        one_line(errors, f"{hostile / 'adapter_model.bin'}: refused to load", "weights_only=True")
    assert not marker.exists()


@pytest.fixture
def remote_code_model(tiny_llama, tmp_path) -> tuple[Path, Path]:
    """A model whose architecture is Python in its folder; importing that Python creates a marker file."""
    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_llama, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="fnsft-custom", auto_map={"AutoConfig": "evil.Config",
                                                       "AutoModelForCausalLM": "evil.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_model_that_needs_remote_code_is_one_line_and_its_code_never_runs(remote_code_model, tmp_path, capsys):
    folder, marker = remote_code_model
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", folder, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out")
    assert code == 2
    one_line(errors, f"--model_name_or_path {folder}: the model's code ships in its folder", "--trust_remote_code")
    code, errors, _ = cli(capsys, "generate", folder, "--prompt", "hi")
    assert code == 2
    one_line(errors, f"model {folder}: the model's code ships in its folder")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_full_disk_during_a_merge_is_one_line_and_leaves_nothing(adapter, tmp_path):
    limit = 20_000  # the merged weights (about 100 kB) cannot be written: ulimit -f
    result = run_fnsft("merge", "--adapter_path", adapter, "--output_dir", tmp_path / "merged", "--verify", "off",
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1
    no_traceback(result.stderr)
    one_line(error_lines(result.stderr), "could not write the merged model: a file size limit was reached",
             f"nothing was written to {tmp_path / 'merged'}")
    assert listing(tmp_path) == []


def test_an_unexpected_failure_is_one_line_with_the_traceback_kept(monkeypatch, capsys):
    from functionalnetworkssft import generate

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(generate, "load_for_inference", broken)
    monkeypatch.delenv("FNSFT_DEBUG", raising=False)
    code, errors, _ = cli(capsys, "generate", "some-model", "--prompt", "hi")
    assert code == 1
    line = one_line(errors, "unexpected RuntimeError: boom (this is a bug in fnsft or a library it uses")
    log = Path(re.search(r"the traceback is in (\S+),", line).group(1))
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    log.unlink()


def test_an_adapter_holding_nan_is_refused_by_the_merge(adapter, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-adapter"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, broken / "adapter_model.safetensors")
    code, errors, _ = cli(capsys, "merge", "--adapter_path", broken, "--output_dir", tmp_path / "merged")
    assert code == 1
    one_line(errors, "hold NaN or infinite values", "diverged")
    assert not (tmp_path / "merged").exists()


def test_a_config_that_asks_for_more_weights_than_the_checkpoint_holds_is_refused(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "more-layers"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2: transformers would start layer 2 from random values
    (folder / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", folder, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out")
    assert code == 1
    one_line(errors, "the checkpoint lacks", "(first: model.layers.2.", "config.json does not match its weights")
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_does_not_compile_is_one_line_in_generate(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "bad-template"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    code, errors, _ = cli(capsys, "generate", folder, "--prompt", "hi", "--max_new_tokens", "2")
    assert code == 1
    one_line(errors, "the model's chat template cannot render this conversation: unexpected '}'")
