"""Never train garbage silently: a run whose trained weights stop being finite stops at once, with one line, before
such weights are saved, and keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY, write_jsonl
from hostile import cli, one_line


def test_a_diverging_run_stops_before_saving_bad_weights_and_keeps_the_good_checkpoint(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:16])
    out = tmp_path / "out"
    # The first step runs at learning rate 0 (warm-up starts there), so checkpoint-1 is good; the second step's
    # update overflows float32.
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", out, "--use_peft", "--max_steps", "4", "--save_steps", "1",
                          "--warmup_ratio", "0.5", "--learning_rate", "1e39", "--validation_split", "0",
                          "--per_device_train_batch_size", "2")
    assert code == 1
    one_line(errors, "training diverged at step 2: a trained weight became NaN or infinite",
             "the newest good checkpoint is checkpoint-1", "Lower --learning_rate (now 1e+39)")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "final_model").exists()
    weights = load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((out / "fnsft_outputs.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_model_trains_on_cpu_without_gpu_mixed_precision(tiny_llama, tmp_path, capsys, dtype):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out", "--use_peft", "--max_steps", "1", "--validation_split",
                          "0", "--torch_dtype", dtype)
    assert code == 0, errors


def test_a_combination_the_trainer_refuses_is_one_usage_line(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out", "--use_peft", "--lora_target_modules", "lm_head",
                          "--max_steps", "1")
    assert code == 2
    one_line(errors, "the trainer refused this configuration: Applying a PEFT adapter to `lm_head` is not supported")
    assert not (tmp_path / "out").exists()


def test_a_lora_rank_no_layer_can_use_is_refused_before_training(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out", "--use_peft", "--lora_r", "100000", "--max_steps", "1")
    assert code == 2
    one_line(errors, "--lora_r 100000 exceeds what any layer of this model can use (at most 32, the narrower side")
    assert not (tmp_path / "out").exists()
