"""What a run leaves beside its weights: the data summary, run_config.yaml, final_model/ with its training record,
adapter/, trainer_state.json, loss.png and the sample replies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from functionalnetworkssft import __version__, data, distributed, forgetting, modeling, networks, tokenizer_files
from functionalnetworkssft.outputs import OutputFolder
from functionalnetworkssft.records import TRAINING_RECORD
from functionalnetworkssft.training.config import TrainConfig


def write_run_config(cfg: TrainConfig, path: Path) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# fnsft train --config {path}  (fnsft {__version__})\n")
        yaml.safe_dump(cfg.to_yaml_dict(), handle, sort_keys=False)


def describe_data(raw: data.RawData, train_set, eval_set, tokenizer) -> None:
    total, trained = data.token_counts(train_set)
    template = "its chat template" if data.has_chat_template(tokenizer) else "EOS-separated turns (no chat template)"
    print(f"Data: {len(train_set)} training and {len(eval_set) if eval_set is not None else 0} validation examples "
          f"({raw.format} format, rendered with {template}); {total} tokens, {trained} of them trained.")
    if len(raw.sources) > 1:
        for name, fmt, count in raw.sources:
            print(f"  {name}: {count} examples ({fmt} format)")


def save_results(cfg: TrainConfig, folder: OutputFolder, trainer, tokenizer, source: modeling.ModelSource,
                  raw: data.RawData, quant, quantized_modules: list[str], samples: dict[str, dict[str, str]],
                  network: networks.NetworkPlan | None,
                  forgetting_plan: forgetting.ForgettingPlan | None = None) -> Path:
    """final_model/ (+ its training record), trainer_state.json, loss.png, adapter/, samples.json."""
    final_dir = folder.record("final_model")
    trainer.save_model(str(final_dir))  # on every process: sharded engines gather the weights collectively
    trainer.accelerator.wait_for_everyone()
    if not distributed.is_main():
        return final_dir
    tokenizer.save_pretrained(final_dir)
    tokenizer_files.carry(source.path, final_dir, source.revision)
    # PEFT's auto-card records local paths and the pickled TrainingArguments is not portable; checkpoints keep it.
    for stray in ("README.md", "training_args.bin"):
        (final_dir / stray).unlink(missing_ok=True)
    record = training_record(cfg, source, raw, quant, quantized_modules)
    if network is not None:
        record["functional_networks"] = network.record()
    if forgetting_plan is not None:
        record["forgetting"] = forgetting_plan.record()
    (final_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    folder.record("trainer_state.json")
    trainer.save_state()
    plot_loss(trainer.state.log_history, folder.record("loss.png"))
    if cfg.use_peft:
        shutil.copytree(final_dir, folder.record("adapter"), dirs_exist_ok=True)
    for prompt in samples:
        samples[prompt]["after"] = sample_reply(trainer.model, tokenizer, prompt, cfg.sample_max_new_tokens)
    if samples:
        report_samples(samples, folder.record("samples.json"))
    print(f"Training done: {trainer.state.global_step} steps; final model in {final_dir}")
    summary = forgetting_plan.summary() if forgetting_plan is not None else None
    if summary:
        print(summary)
    return final_dir


def training_record(cfg: TrainConfig, source: modeling.ModelSource, raw: data.RawData, quant,
                     quantized_modules: list[str]) -> dict[str, Any]:
    """Saved beside the weights so that merge, generate and push need no extra flags."""
    hyper = {k: v for k, v in cfg.to_yaml_dict().items() if k in (
        "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_ratio",
        "max_seq_length", "seed", "train_on_prompt")}
    return {
        "fnsft_version": __version__,
        "base_model": source.given,
        "base_model_path": source.path,
        # The Hub repository of the base where known: what an upload names instead of local paths.
        "base_model_hub_id": source.hub_id,
        "base_dtype": modeling.checkpoint_dtype(source),
        "dataset": [source.name for source in cfg.sources()] or ["in-memory dataset"],
        "dataset_format": raw.format,
        "method": ("qlora" if cfg.use_4bit else "lora-8bit" if cfg.use_8bit else "lora") if cfg.use_peft else "full",
        "quantization": "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
        "quantized_modules": quantized_modules,
        # Read back from the BitsAndBytesConfig that loaded the model: what a faithful QLoRA merge must replay.
        "bnb_4bit_quant_type": quant.bnb_4bit_quant_type if cfg.use_4bit else None,
        "bnb_4bit_use_double_quant": quant.bnb_4bit_use_double_quant if cfg.use_4bit else None,
        "hyperparameters": hyper,
    }


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    kl = {h["step"]: h[f"eval_{forgetting.KL_KEY}"] for h in history if f"eval_{forgetting.KL_KEY}" in h}
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = []
    for points, label, style in ((train, "train loss", "-"), (evals, "validation loss", "o--")):
        if points:
            lines += ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if kl:
        # Forgetting is two orders of magnitude below the loss: its own axis.
        right = ax.twinx()
        lines += right.plot(list(kl), list(kl.values()), "s:", color="tab:red", label="forgetting: KL(base||tuned)")
        right.set_ylabel("KL(base||tuned), nats per token")
    ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    from functionalnetworkssft.generate import reply

    return reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)


def report_samples(samples: dict[str, dict[str, str]], path: Path) -> None:
    path.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    for prompt, replies in samples.items():
        print(f"\nPrompt: {prompt}\n  before training: {replies['before']}\n  after training:  {replies['after']}")
    print()
