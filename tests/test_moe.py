"""A mixture of experts with fnsft's defaults: LoRA reaches the stacked expert weights, where PEFT has no dropout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import families
from conftest import CONVERSATIONS, write_jsonl


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return families.build(families.BY_NAME["qwen3-moe"], tmp_path_factory.mktemp("moe") / "qwen3-moe")


def test_a_dropout_asked_for_on_expert_weights_is_refused_in_one_line_before_training(qwen3_moe, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": m} for m in CONVERSATIONS[:8]])
    run = subprocess.run([str(Path(sys.executable).with_name("fnsft")), "train", "--model_name_or_path",
                          str(qwen3_moe), "--dataset_name_or_path", str(data), "--output_dir", str(tmp_path / "out"),
                          "--use_peft", "--lora_dropout", "0.1", "--max_steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip() and "Warning" not in line]
    refusal = "fnsft train: error: --lora_dropout 0.1: LoRA reaches this model's stacked expert weights"
    assert any(line.startswith(refusal) and "--lora_dropout 0" in line for line in lines), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "final_model").exists()


def test_the_attention_alone_keeps_the_default_dropout(qwen3_moe, tmp_path, capsys):
    from functionalnetworkssft import TrainConfig, train

    train(TrainConfig(model_name_or_path=str(qwen3_moe), output_dir=str(tmp_path / "out"), use_peft=True,
                      lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], max_steps=1, validation_split=0,
                      forgetting_probe="off"), train_dataset=[{"messages": m} for m in CONVERSATIONS[:8]])
    import json

    adapter = json.loads((tmp_path / "out" / "final_model" / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.05 and not adapter.get("target_parameters")
    assert "LoRA: dropout 0" not in capsys.readouterr().out


def test_per_expert_layer_names_reach_the_stacked_experts_and_a_half_pair_is_one_line(qwen3_moe):
    """Recipes written for per-expert layers (gate_proj, up_proj, down_proj) reach transformers 5's stacked experts
    through PEFT's mapping; gate_proj without up_proj (stacked together) is refused with PEFT's reason, once."""
    from transformers import AutoModelForCausalLM

    from functionalnetworkssft import modeling

    model = AutoModelForCausalLM.from_pretrained(qwen3_moe)
    assert modeling.lora_problems(model, ["q_proj", "gate_proj", "up_proj", "down_proj"], 8) == []
    problems = modeling.lora_problems(model, ["gate_proj"], 8)
    assert len(problems) == 1 and "gate_proj without also targeting up_proj" in problems[0]
    assert "nonsense matches no layer" in modeling.lora_problems(model, ["q_proj", "nonsense"], 8)[0]
