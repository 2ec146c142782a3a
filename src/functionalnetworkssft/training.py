"""`fnsft train`: the whole run, top to bottom.

check flags -> check Hub access -> read data -> load tokenizer, tokenize -> load model -> train -> save final_model/
and adapter/ -> merge -> upload. Everything that can be rejected is rejected before the model is loaded.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from functionalnetworkssft import __version__, data, hub, modeling
from functionalnetworkssft.config import RUN_OUTPUTS, TRAINING_RECORD, TrainConfig, latest_checkpoint, parse
from functionalnetworkssft.errors import FnsftError, UsageError, first_line


def main(argv: list[str] | None, prog: str = "fnsft train") -> None:
    run(parse(TrainConfig, argv, prog))


def run(cfg: TrainConfig) -> Path:
    problems = cfg.problems()
    if problems:
        raise UsageError(problems)
    out = Path(cfg.output_dir)
    if cfg.push_to_hub:
        # A missing or read-only token must fail now, not after hours of training.
        hub_token = hub.resolve_token(cfg.hub_token)
        hub.preflight(cfg.hub_repo_id, hub_token, private=cfg.hub_private, revision=cfg.hub_revision)

    raw = data.load(cfg.dataset_name_or_path, cfg.dataset_config_name, cfg.validation_split, cfg.seed)
    source = modeling.resolve(cfg.model_name_or_path)
    tokenizer = modeling.load_tokenizer(source, cfg.trust_remote_code)
    train_set, eval_set = data.tokenize(raw, tokenizer, cfg.max_seq_length, cfg.train_on_prompt)
    _describe_data(raw, train_set, eval_set, tokenizer)

    _prepare_output_dir(cfg, out)
    dtype = modeling.training_dtype(cfg.torch_dtype, source)
    quant = modeling.quantization_config(cfg.use_4bit, cfg.use_8bit, dtype)
    model = modeling.load_model(source, dtype, quant, cfg.trust_remote_code)
    quantized_modules = modeling.quantized_module_names(model) if quant is not None else []

    samples = {p: {"before": _reply(model, tokenizer, p, cfg.sample_max_new_tokens)} for p in cfg.sample_prompts}
    trainer = _build_trainer(cfg, model, tokenizer, train_set, eval_set, quant is not None)
    resume = str(latest_checkpoint(out)) if cfg.resume_from_checkpoint == "latest" else cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume)
    if eval_set is not None:
        trainer.evaluate()

    final_dir = out / "final_model"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(final_dir)
    # PEFT's auto-card records local paths and the pickled TrainingArguments is not portable; checkpoints keep it.
    for stray in ("README.md", "training_args.bin"):
        (final_dir / stray).unlink(missing_ok=True)
    record = _training_record(cfg, source, raw, quant, quantized_modules)
    (final_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    trainer.save_state()
    _plot_loss(trainer.state.log_history, out / "loss.png")
    if cfg.use_peft:
        shutil.copytree(final_dir, out / "adapter", dirs_exist_ok=True)
    for prompt in samples:
        samples[prompt]["after"] = _reply(trainer.model, tokenizer, prompt, cfg.sample_max_new_tokens)
    _report_samples(samples, out)
    print(f"Training done: {trainer.state.global_step} steps; final model in {final_dir}")

    del trainer, model
    gc.collect()
    if cfg.merge_adapter_with_base:
        _merge(cfg, source, final_dir, out / "merged_model")
    if cfg.push_to_hub:
        upload = out / "merged_model" if cfg.upload_merged_model else final_dir
        url = hub.push_folder(upload, cfg.hub_repo_id, token=hub_token, private=cfg.hub_private,
                              revision=cfg.hub_revision, commit_message=cfg.hub_commit_message)
        print(f"Uploaded {upload} to {url}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Steps


def _describe_data(raw: data.RawData, train_set, eval_set, tokenizer) -> None:
    trained = sum(sum(mask) for mask in train_set["assistant_masks"])
    total = sum(len(ids) for ids in train_set["input_ids"])
    template = "its chat template" if data.has_chat_template(tokenizer) else "EOS-separated turns (no chat template)"
    print(f"Data: {len(train_set)} training and {len(eval_set) if eval_set is not None else 0} validation examples "
          f"({raw.format} format, rendered with {template}); {total} tokens, {trained} of them trained.")


def _prepare_output_dir(cfg: TrainConfig, out: Path) -> None:
    """Clear what an earlier run wrote (only with --overwrite_output_dir) and record this run's configuration."""
    import yaml

    if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint and out.is_dir():
        for entry in out.iterdir():
            if entry.name in RUN_OUTPUTS or (entry.is_dir() and entry.name.startswith("checkpoint-")):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run_config.yaml", "w", encoding="utf-8") as handle:
        handle.write(f"# fnsft train --config {out / 'run_config.yaml'}  (fnsft {__version__})\n")
        yaml.safe_dump(cfg.to_yaml_dict(), handle, sort_keys=False)


def _build_trainer(cfg: TrainConfig, model, tokenizer, train_set, eval_set, quantized: bool):
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if cfg.use_peft:
        targets = cfg.lora_target_modules
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear" if targets == ["all-linear"] else targets,
                                 task_type="CAUSAL_LM")
        if quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    half = model.dtype if model.dtype in (torch.bfloat16, torch.float16) else None
    evaluating = eval_set is not None
    args = SFTConfig(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        learning_rate=cfg.effective_learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of the steps
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.effective_eval_steps if evaluating else None,
        report_to="none" if cfg.report_to == ["none"] else cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=half == torch.bfloat16,
        fp16=half == torch.float16,
        max_length=cfg.max_seq_length,
        dataset_num_proc=None,
    )

    class Trainer(SFTTrainer):
        def create_model_card(self, *args, **kwargs) -> None:
            """TRL's card names no base model; the Hub step writes one with real metadata instead."""

    return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                   processing_class=tokenizer, peft_config=peft_config)


def _training_record(cfg: TrainConfig, source: modeling.ModelSource, raw: data.RawData, quant,
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
        "base_dtype": modeling.checkpoint_dtype(source),
        "dataset": cfg.dataset_name_or_path,
        "dataset_format": raw.format,
        "method": ("qlora" if cfg.use_4bit else "lora-8bit" if cfg.use_8bit else "lora") if cfg.use_peft else "full",
        "quantization": "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
        "quantized_modules": quantized_modules,
        # Read back from the BitsAndBytesConfig that loaded the model: what a faithful QLoRA merge must replay.
        "bnb_4bit_quant_type": quant.bnb_4bit_quant_type if cfg.use_4bit else None,
        "bnb_4bit_use_double_quant": quant.bnb_4bit_use_double_quant if cfg.use_4bit else None,
        "hyperparameters": hyper,
    }


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "validation loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    from functionalnetworkssft.generate import reply

    return reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)


def _report_samples(samples: dict[str, dict[str, str]], out: Path) -> None:
    if not samples:
        return
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    for prompt, replies in samples.items():
        print(f"\nPrompt: {prompt}\n  before training: {replies['before']}\n  after training:  {replies['after']}")
    print()


def _merge(cfg: TrainConfig, source: modeling.ModelSource, adapter_dir: Path, merged_dir: Path) -> None:
    """Merge with the project's engine; a failure leaves the adapter saved and says how to retry."""
    from functionalnetworkssft.merge import merge_adapter

    try:
        report = merge_adapter(adapter_dir, merged_dir, base_model=source.path,
                               trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # training succeeded: no merge problem may take the adapter with it
        print(f"Merge failed: {first_line(exc)}\nThe adapter is saved in {adapter_dir}; retry with: fnsft merge "
              f"--adapter_path {adapter_dir} --output_dir {merged_dir}", file=sys.stderr)
        if cfg.upload_merged_model:
            raise FnsftError("--upload_merged_model: nothing to upload because the merge failed; the adapter is "
                             f"saved in {adapter_dir}.") from exc
        return
    print(report.summary())
