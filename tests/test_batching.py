"""Padding-free batches and packed rows compute exactly what the examples compute one at a time, for assistant-only
masks too; gradient checkpointing works with LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONVERSATIONS, TOY, build_tokenizer, write_jsonl
from functionalnetworkssft import data
from hostile import cli


def examples(tokenizer, count=5):
    rows = []
    for messages in CONVERSATIONS[:count]:
        # Different lengths: keep a varying number of turns.
        example = data.tokenize_example(tokenizer, {"messages": messages[: 3 + 2 * (len(rows) % 2)]}, False, 512)
        labels = [t if m else -100 for t, m in zip(example["input_ids"], example["assistant_masks"])]
        rows.append({"input_ids": example["input_ids"], "labels": labels})
    return rows


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss per example, the way the Trainer's loss sees each token."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["padding_free", "packing"])
def test_per_example_losses_in_a_packed_batch_equal_the_examples_run_alone(tiny_llama, attn, mode):
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = build_tokenizer(chat=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32).eval()
    model.config.use_cache = False  # as fnsft train sets it
    rows = examples(tokenizer)
    with torch.no_grad():
        alone = [loss_sums(model(input_ids=torch.tensor([r["input_ids"]])).logits[0], torch.tensor(r["labels"]))
                 for r in rows]
    if mode == "packing":
        import datasets

        packed = pack_dataset(datasets.Dataset.from_list(rows), seq_length=10_000, strategy="bfd")
        features = [dict(row) for row in packed]
    else:
        features = rows
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    together = {}
    for begin, end in zip(starts[:-1], starts[1:]):
        ids = batch["input_ids"][0, begin:end].tolist()
        together[tuple(ids)] = loss_sums(logits[begin:end], batch["labels"][0, begin:end])
    assert len(together) == len(rows)
    for row, expected in zip(rows, alone):
        torch.testing.assert_close(together[tuple(row["input_ids"])], expected, atol=1e-5, rtol=1e-5)
    trained = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    assert int((batch["labels"] != -100).sum()) == trained  # the same tokens are trained, nothing across boundaries


@pytest.mark.parametrize("flags", [[], ["--packing"], ["--no_padding_free"], ["--no_padding_free", "--group_by_length"]])
def test_each_batching_mode_trains(tiny_llama, tmp_path, capsys, flags):
    data_file = write_jsonl(tmp_path / "d.jsonl", TOY[:16])
    out = tmp_path / "out"
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data_file,
                          "--output_dir", out, "--use_peft", "--max_steps", "4", "--validation_split", "0",
                          "--learning_rate", "1e-2", "--logging_steps", "1", "--lora_dropout", "0", *flags)
    assert code == 0, errors
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_with_lora_gives_the_same_update_as_without(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    data_file = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    weights = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        out = tmp_path / name
        code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data_file,
                              "--output_dir", out, "--use_peft", "--max_steps", "2", "--validation_split", "0",
                              "--learning_rate", "1e-2", "--lora_dropout", "0", *extra)
        assert code == 0, errors
        weights.append(load_file(out / "final_model" / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(v) for k, v in weights[1].items() if "lora_B" in k)  # the adapters did learn
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=1e-5)


def test_liger_kernels_are_checked_up_front(tmp_path, capsys):
    import importlib.util

    assert importlib.util.find_spec("liger_kernel") is None  # not installed here: the flag must say how to get it
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", "./none", "--dataset_name_or_path", "d.jsonl",
                          "--output_dir", tmp_path / "out", "--use_liger_kernel")
    assert code == 2
    assert errors == ["fnsft train: error: --use_liger_kernel needs the liger-kernel package: pip install liger-kernel."]
