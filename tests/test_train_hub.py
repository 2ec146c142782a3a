"""`fnsft train --push_to_hub`, the reference document's upload commands, against the test Hub server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SPEC_UPLOAD = """
python -m functionalnetworkssft.fnsft_trainer \\
    --model_name_or_path microsoft/DialoGPT-medium \\
    --dataset_name_or_path your_dataset \\
    --output_dir ./output \\
    --use_peft \\
    --merge_adapter_with_base \\
    --push_to_hub \\
    {extra}--hub_repo_id your-username/your-model \\
    --num_train_epochs 3
"""


def spec_argv(model: Path, dataset: Path, repo_id: str, merged: bool) -> list[str]:
    """The document's command with a local model, local data and a repo of the test account."""
    text = SPEC_UPLOAD.format(extra="--upload_merged_model \\\n    " if merged else "")
    words = text.replace("\\\n", " ").split()
    swap = {"microsoft/DialoGPT-medium": str(model), "your_dataset": str(dataset), "your-username/your-model": repo_id}
    return [sys.executable] + [swap.get(word, word) for word in words[1:]]


def run(argv, cwd, env):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_adapter_is_uploaded_by_default(hub_server, tiny_gpt2, conversations_json, tmp_path):
    result = run(spec_argv(tiny_gpt2, conversations_json, "alice/chat-adapter", merged=False), tmp_path,
                 hub_server.env(token=hub_server.token))
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub_server.files("alice/chat-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert not any(name == "model.safetensors" for name in files)
    assert b"library_name: peft" in files["README.md"]
    assert hub_server.repo("alice/chat-adapter")["private"] is True
    assert (tmp_path / "output" / "merged_model").is_dir()
    assert hub_server.token not in result.stdout + result.stderr


def test_merged_model_is_uploaded_with_upload_merged_model_and_loads_back(hub_server, tiny_gpt2, conversations_json,
                                                                          tmp_path, monkeypatch, capsys):
    from functionalnetworkssft.fnsft_trainer import main

    # The document's command, in this process (whose huggingface_hub the hub_server fixture points at): only its exit
    # status and what it uploaded are looked at.
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.chdir(tmp_path)
    argv = spec_argv(tiny_gpt2, conversations_json, "alice/chat-merged", merged=True)
    assert argv[1:3] == ["-m", "functionalnetworkssft.fnsft_trainer"]
    assert main(argv[3:]) == 0, capsys.readouterr().err[-3000:]
    files = hub_server.files("alice/chat-merged")
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)
    assert not any(name.startswith("adapter_") for name in files)
    assert b"library_name: transformers" in files["README.md"]
    import torch
    from transformers import AutoModelForCausalLM

    hub_server.activate(monkeypatch)
    remote = AutoModelForCausalLM.from_pretrained("alice/chat-merged", token=hub_server.token)  # private repo
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "output" / "merged_model")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, local(ids).logits)


def test_missing_token_fails_before_data_or_model_are_touched(hub_server, tiny_gpt2, conversations_json, tmp_path,
                                                             monkeypatch, capsys):
    from functionalnetworkssft.fnsft_trainer import main

    # The document's command, in this process (whose huggingface_hub the hub_server fixture points at, with no
    # token): only its exit status and its error line are looked at.
    monkeypatch.chdir(tmp_path)
    argv = spec_argv(tiny_gpt2, conversations_json, "alice/x", merged=False)
    assert argv[1:3] == ["-m", "functionalnetworkssft.fnsft_trainer"]
    assert main(argv[3:]) == 2
    stderr = capsys.readouterr().err
    assert "token" in stderr.lower() and "Traceback" not in stderr
    assert not (tmp_path / "output").exists()


def test_failed_upload_after_training_keeps_outputs_and_says_how_to_retry(hub_server, tiny_gpt2,
                                                                          conversations_json, tmp_path):
    hub_server.fail("commit", times=50, status=500)
    result = run(spec_argv(tiny_gpt2, conversations_json, "alice/flaky", merged=False), tmp_path,
                 hub_server.env(token=hub_server.token))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "intact" in last and "fnsft push --model_dir" in last and "alice/flaky" in last
    assert (tmp_path / "output" / "final_model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "output" / "merged_model" / "config.json").is_file()
    assert len(hub_server.calls("commit")) > 1  # retried before giving up


def test_a_token_given_as_a_flag_never_reaches_a_file_or_the_log(hub_server, tiny_gpt2, conversations_json,
                                                                 tmp_path):
    argv = spec_argv(tiny_gpt2, conversations_json, "alice/flag-token", merged=False)
    result = run(argv + ["--hub_token", hub_server.token, "--max_steps", "2"], tmp_path, hub_server.env(token=None))
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub_server.token not in result.stdout + result.stderr
    secret = hub_server.token.encode()
    leaked = [p for p in (tmp_path / "output").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []
    assert "***" in (tmp_path / "output" / "run_config.yaml").read_text()
    assert "adapter_config.json" in hub_server.files("alice/flag-token")
