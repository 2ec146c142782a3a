"""The seed's commands, run for real on tiny local models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONVERSATIONS

SEED_FULL_EXAMPLE = """
python -m functionalnetworkssft.fnsft_trainer \\
    --model_name_or_path microsoft/DialoGPT-medium \\
    --dataset_name_or_path ./data/my_conversations.json \\
    --output_dir ./models/my_chatbot \\
    --use_peft \\
    --merge_adapter_with_base \\
    --lora_r 16 \\
    --lora_alpha 32 \\
    --lora_dropout 0.1 \\
    --num_train_epochs 3 \\
    --per_device_train_batch_size 4 \\
    --gradient_accumulation_steps 4 \\
    --learning_rate 2e-4 \\
    --warmup_ratio 0.03 \\
    --logging_steps 10 \\
    --save_steps 500 \\
    --eval_steps 500
"""

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "fnsft_training.json"} | TOKENIZER_FILES


def seed_argv(model: Path) -> list[str]:
    """The reference document's full example, word for word, with a local model in place of DialoGPT-medium."""
    words = SEED_FULL_EXAMPLE.replace("\\\n", " ").split()
    assert words[:3] == ["python", "-m", "functionalnetworkssft.fnsft_trainer"]
    words[words.index("microsoft/DialoGPT-medium")] = str(model)
    return [sys.executable] + words[1:]


def run_cli(argv: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def seed_run(tiny_gpt2, tmp_path_factory):
    work = tmp_path_factory.mktemp("seed")
    data = work / "data" / "my_conversations.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"messages": m} for m in CONVERSATIONS]))
    result = run_cli(seed_argv(tiny_gpt2), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "models" / "my_chatbot", result


def test_a_run_fetches_no_kernel_from_the_hub_and_says_nothing_about_it(seed_run):
    """PEFT imports bitsandbytes, whose CPU backend looked up a Hub kernel: every run's first stderr line said so."""
    _, result = seed_run
    assert "kernels-community" not in result.stderr and "publisher trust" not in result.stderr, result.stderr[:500]


def test_seed_full_example_writes_the_documented_layout(seed_run):
    out, _ = seed_run
    top = {p.name for p in out.iterdir()}
    assert {"final_model", "adapter", "merged_model", "trainer_state.json", "run_config.yaml", "loss.png"} <= top
    assert any(name.startswith("checkpoint-") for name in top)
    assert {p.name for p in (out / "final_model").iterdir()} == ADAPTER_FILES
    assert {p.name for p in (out / "adapter").iterdir()} == ADAPTER_FILES
    merged = {p.name for p in (out / "merged_model").iterdir()}
    assert {"config.json", "generation_config.json"} | TOKENIZER_FILES <= merged
    assert any(name.endswith(".safetensors") for name in merged)
    assert not any(name.startswith("adapter_") for name in merged)
    state = json.loads((out / "trainer_state.json").read_text())
    # 32 training examples, batch 4 x accumulation 4 -> 2 optimizer steps per epoch, 3 epochs.
    assert state["global_step"] == 6
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_merged_model_computes_what_base_plus_adapter_computed(seed_run, tiny_gpt2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = seed_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with_adapter = PeftModel.from_pretrained(base, out / "final_model").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = (logits(merged, ids) - logits(with_adapter, ids)).abs().max().item()
    assert diff < 1e-4
    # The adapter really changed the model, so the comparison above is not trivially base vs base.
    assert (logits(merged, ids) - logits(AutoModelForCausalLM.from_pretrained(tiny_gpt2), ids)).abs().max() > 1e-6
    assert merged.dtype == torch.float32


def test_seed_python_example_loads_and_generates(seed_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = seed_run
    model = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged_model")
    inputs = tokenizer("Hello, how are you?", return_tensors="pt")
    outputs = model.generate(**inputs, max_length=50)
    response = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert response.startswith("Hello, how are you?")
    assert outputs.shape[1] > inputs["input_ids"].shape[1]


def test_run_config_is_saved_and_rerunnable(seed_run):
    import yaml

    out, _ = seed_run
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["lora_r"] == 16 and saved["learning_rate"] == 2e-4 and saved["use_peft"] is True


def test_module_and_console_script_are_the_same_command(tmp_path):
    via_module = run_cli([sys.executable, "-m", "functionalnetworkssft.fnsft_trainer", "--help"], cwd=tmp_path)
    via_script = run_cli([str(Path(sys.executable).parent / "fnsft"), "train", "--help"], cwd=tmp_path)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    for flag in ("--model_name_or_path", "--dataset_name_or_path", "--output_dir", "--use_peft",
                 "--merge_adapter_with_base", "--push_to_hub", "--upload_merged_model", "--hub_repo_id", "--lora_r",
                 "--lora_alpha", "--lora_dropout", "--num_train_epochs", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--learning_rate", "--warmup_ratio", "--logging_steps",
                 "--save_steps", "--eval_steps", "--config", "--max_steps", "--max_seq_length",
                 "--lora_target_modules", "--use_4bit", "--use_8bit", "--torch_dtype", "--seed", "--validation_split",
                 "--resume_from_checkpoint", "--overwrite_output_dir", "--report_to", "--trust_remote_code"):
        assert flag in via_module.stdout, flag
