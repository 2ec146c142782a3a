"""Training behaviour: it learns, full fine-tuning works, evaluation can be off, a killed run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY, write_jsonl
from hostile import train_with_callback
from functionalnetworkssft.cli import main



def train(*args: str) -> int:
    return main(["train", *args])


def log_losses(out: Path) -> tuple[list[float], list[float]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


def test_training_lowers_the_loss_on_a_learnable_task(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "out"
    code = train("--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--output_dir",
                 str(out), "--learning_rate", "1e-2", "--max_steps", "30", "--per_device_train_batch_size", "8",
                 "--logging_steps", "5", "--eval_steps", "10", "--validation_split", "0.1")
    assert code == 0
    train_losses, eval_losses = log_losses(out)
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert eval_losses[-1] < 0.5 * eval_losses[0]


def test_lora_learns_the_task_and_samples_show_it(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "out"
    code = train("--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--output_dir",
                 str(out), "--use_peft", "--lora_r", "8", "--learning_rate", "1e-2", "--max_steps", "30",
                 "--per_device_train_batch_size", "8", "--validation_split", "0.1", "--eval_steps", "10",
                 "--sample_prompts", "Tell me about item 99.")
    assert code == 0
    _, eval_losses = log_losses(out)
    assert eval_losses[-1] < eval_losses[0]
    samples = json.loads((out / "samples.json").read_text())
    assert samples["Tell me about item 99."]["after"].startswith("It is blue")
    assert not samples["Tell me about item 99."]["before"].startswith("It is blue")


def test_full_fine_tuning_saves_a_whole_model_and_no_adapter(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY[:8])
    out = tmp_path / "out"
    code = train("--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--output_dir",
                 str(out), "--max_steps", "2", "--validation_split", "0")
    assert code == 0
    final = {p.name for p in (out / "final_model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= final
    assert not any(name.startswith("adapter") for name in final)
    assert not (out / "adapter").exists() and not (out / "merged_model").exists()
    before = load_file(tiny_llama / "model.safetensors")
    after = load_file(out / "final_model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_validation_split_zero_trains_without_evaluation(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    assert train("--model_name_or_path", str(tiny_gpt2), "--dataset_name_or_path", str(data), "--output_dir",
                 str(out), "--use_peft", "--max_steps", "2", "--validation_split", "0", "--eval_steps", "1") == 0
    train_losses, eval_losses = log_losses(out)
    assert train_losses and not eval_losses


def test_existing_validation_split_is_used(tiny_gpt2, tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TOY[:12]),
                          "validation": datasets.Dataset.from_list(TOY[12:15])}).save_to_disk(str(folder))
    out = tmp_path / "out"
    assert train("--model_name_or_path", str(tiny_gpt2), "--dataset_name_or_path", str(folder), "--output_dir",
                 str(out), "--use_peft", "--max_steps", "2", "--eval_steps", "1") == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)


KILL_AT_SAVE = train_with_callback("""
class Callback(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_run_resumes_to_the_same_final_step_and_weights(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY[:24])
    common = ["--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--use_peft",
              "--lora_dropout", "0", "--max_steps", "9", "--save_steps", "3", "--per_device_train_batch_size", "2",
              "--validation_split", "0", "--learning_rate", "1e-3"]
    straight = tmp_path / "straight"
    assert train(*common, "--output_dir", str(straight)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_STEP": "6"}
    result = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, *common, "--output_dir", str(killed)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert (killed / "checkpoint-6").is_dir() and not (killed / "final_model").exists()

    # Without a resume flag the folder is refused, so an interrupted run is never silently overwritten.
    assert train(*common, "--output_dir", str(killed)) == 2
    assert train(*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest") == 0
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    resumed = load_file(killed / "final_model" / "adapter_model.safetensors")
    reference = load_file(straight / "final_model" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-5, rtol=1e-4)


def test_overwrite_output_dir_replaces_only_run_outputs(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_gpt2), "--dataset_name_or_path", str(data), "--output_dir", str(out),
            "--use_peft", "--max_steps", "2", "--save_steps", "1", "--validation_split", "0"]
    assert train(*args) == 0
    (out / "notes.txt").write_text("mine")
    assert train(*args, "--max_steps", "1", "--overwrite_output_dir") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.parametrize("flag, quantization", [("--use_4bit", "4bit"), ("--use_8bit", "8bit")])
def test_quantized_lora_trains_records_its_layers_and_merges_into_full_precision(tiny_llama, tmp_path, flag,
                                                                                 quantization):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    assert train("--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--output_dir",
                 str(out), "--use_peft", flag, "--max_steps", "2", "--validation_split", "0",
                 "--merge_adapter_with_base") == 0
    record = json.loads((out / "final_model" / "fnsft_training.json").read_text())
    assert record["quantization"] == quantization
    assert "model.layers.0.mlp.down_proj" in record["quantized_modules"]
    assert not any("embed" in name or "lm_head" in name for name in record["quantized_modules"])
    config = json.loads((out / "merged_model" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


def test_a_failed_merge_leaves_training_successful_with_the_adapter_saved(tiny_llama, tmp_path, capsys,
                                                                           corrupt_merge):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--use_peft",
            "--max_steps", "2", "--validation_split", "0", "--merge_adapter_with_base", "--learning_rate", "1e-2"]
    assert train(*args, "--output_dir", str(out)) == 0
    err = capsys.readouterr().err
    assert "Merge failed:" in err and f"fnsft merge --adapter_path {out / 'final_model'}" in err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "merged_model").exists()


def test_a_failed_merge_with_upload_merged_model_fails_the_run_and_uploads_nothing(tiny_llama, tmp_path, capsys,
                                                                                    corrupt_merge, hub_server,
                                                                                    monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    assert train("--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--use_peft",
                 "--max_steps", "2", "--validation_split", "0", "--merge_adapter_with_base", "--push_to_hub",
                 "--upload_merged_model", "--hub_repo_id", "alice/never", "--output_dir", str(out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--upload_merged_model" in last and "merge failed" in last
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert hub_server.repo("alice/never") is None


def test_merged_model_keeps_the_base_dtype_although_training_ran_in_float32(tiny_llama_bf16, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    assert train("--model_name_or_path", str(tiny_llama_bf16), "--dataset_name_or_path", str(data), "--use_peft",
                 "--max_steps", "2", "--validation_split", "0", "--merge_adapter_with_base",
                 "--output_dir", str(out)) == 0
    config = json.loads((out / "merged_model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    weights = load_file(out / "merged_model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    report = json.loads((out / "merged_model" / "merge_report.json").read_text())
    assert report["verification"]["status"] == "passed"
