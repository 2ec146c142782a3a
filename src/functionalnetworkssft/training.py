"""`fnsft train`: the whole run, top to bottom.

check flags, output folder and checkpoint -> check Hub access -> hold the output folder -> read data -> load
tokenizer, tokenize -> load model -> (training starts: record it) train -> save final_model/ and adapter/ -> merge ->
upload. Everything that can be rejected is rejected before the model is loaded, and nothing is written to the output
folder before training starts.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from functionalnetworkssft import __version__, checkpoints, data, distributed, hub, modeling, networks
from functionalnetworkssft.config import TRAINING_RECORD, TrainConfig
from functionalnetworkssft.errors import FnsftError, UsageError, describe_write_error, first_line
from functionalnetworkssft.outputs import OutputFolder, read_manifest
from functionalnetworkssft.paths import looks_like_local_path


@dataclass
class TrainResult:
    """What `train` returns: where the outputs are, and the final training (and validation) metrics."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


def train(config: TrainConfig, train_dataset=None, eval_dataset=None) -> TrainResult:
    """`fnsft train` from Python: the same checks, outputs and one-line messages, raised as exceptions (FnsftError;
    UsageError for bad settings) instead of exiting. `train_dataset`/`eval_dataset` may be datasets.Dataset objects
    or lists of records in any supported format; `config.dataset_name_or_path` may then be left empty."""
    return run(config, train_dataset, eval_dataset)


def run(cfg: TrainConfig, train_dataset=None, eval_dataset=None) -> TrainResult:
    out = Path(cfg.output_dir)
    # In a data-parallel run (torchrun, accelerate launch) every process trains; only the main one owns the folder.
    main = distributed.is_main()
    in_memory = train_dataset is not None
    problems = [p for p in cfg.problems() if not (in_memory and p.startswith("--dataset_name_or_path is missing"))]
    if eval_dataset is not None and not in_memory:
        problems.append("eval_dataset needs train_dataset (or give the evaluation data in the dataset's validation "
                        "split).")
    folder = OutputFolder(out, writes=_writes(cfg), inputs=_inputs(cfg), overwrite=cfg.overwrite_output_dir,
                          resuming=bool(cfg.resume_from_checkpoint), writer=main)
    resume: checkpoints.Latest | None = None
    templates = chat_template = None
    if not problems and cfg.chat_template_path:
        try:
            chat_template = modeling.read_chat_template(cfg.chat_template_path)
        except UsageError as exc:
            problems += exc.problems
    if not problems:  # paths are only worth checking once every flag has a usable value
        problems += folder.problems()
        templates, template_problems = _given_templates(cfg, out)
        problems += template_problems
        resume_problems, resume = _resume_checkpoint(cfg, out, templates)
        problems += resume_problems
    if problems:
        raise UsageError(problems)
    if cfg.push_to_hub and main:
        # A missing or read-only token must fail now, not after hours of training.
        hub_token = hub.resolve_token(cfg.hub_token)
        hub.preflight(cfg.hub_repo_id, hub_token, private=cfg.hub_private, revision=cfg.hub_revision)

    with folder.claim("fnsft train"):
        if in_memory:
            raw = data.from_memory(train_dataset, eval_dataset, cfg.validation_split, cfg.seed, cfg.dataset_text_field)
        else:
            evaluation = data.Source(cfg.eval_dataset_name_or_path, cfg.dataset_config_name) \
                if cfg.eval_dataset_name_or_path else None
            raw = data.load_sources(cfg.sources(), evaluation, cfg.validation_split, cfg.seed,
                                    cfg.dataset_text_field)
        source = modeling.resolve(cfg.model_name_or_path, revision=cfg.model_revision)
        problem = modeling.remote_code_problem(source, cfg.trust_remote_code)
        if problem:
            raise UsageError(problem)
        tokenizer = modeling.load_tokenizer(source, cfg.trust_remote_code, chat_template)
        train_set, eval_set = data.tokenize(raw, tokenizer, cfg.max_seq_length, cfg.train_on_prompt,
                                            cfg.dataset_num_proc)
        _describe_data(raw, train_set, eval_set, tokenizer)

        dtype = modeling.training_dtype(cfg.torch_dtype, source)
        quant = modeling.quantization_config(cfg.use_4bit, cfg.use_8bit, dtype)
        model = modeling.load_model(source, dtype, quant, cfg.trust_remote_code, cfg.attn_implementation)
        if cfg.use_peft and (problems := modeling.lora_problems(model, cfg.lora_target_modules, cfg.lora_r)):
            raise UsageError(problems)
        quantized_modules = modeling.quantized_module_names(model) if quant is not None else []
        network = _plan_network(cfg, model, train_set, templates) if cfg.mask_mode != "none" else None

        samples = {p: {"before": _reply(model, tokenizer, p, cfg.sample_max_new_tokens)}
                   for p in (cfg.sample_prompts if main else [])}
        guard = _RunGuard(folder, _shape_settings(cfg, network.templates if network is not None else None))
        inference_cache = getattr(model.config, "use_cache", None)  # training turns the KV cache off
        try:
            trainer = _build_trainer(cfg, model, tokenizer, train_set, eval_set, quant is not None, guard)
        except ValueError as exc:  # TRL, PEFT and transformers check the combination they are given
            raise UsageError(f"the trainer refused this configuration: {first_line(exc)}") from None
        if network is not None:
            network.attach(trainer.model, cfg.use_peft, cfg.mask_forward, guard)
        print(f"Batching: {_describe_batching(cfg, model)}.")

        # Training starts: from here on the folder holds this run, and its record says what the run wrote.
        folder.begin()
        try:
            _write_run_config(cfg, folder.record("run_config.yaml"))
            if network is not None and network.built and main:
                network.templates.write(folder.record(networks.TEMPLATES_FILE))
            resume_path = _announce_resume(resume, folder, main) if resume is not None else None
            metrics = dict(trainer.train(resume_from_checkpoint=resume_path).metrics)
            if eval_set is not None:
                metrics.update(trainer.evaluate())
            if network is not None:
                network.detach()  # inference, samples and the merge run the model as it is, with no hooks
            if inference_cache is not None:
                model.config.use_cache = inference_cache
            final_dir = _save_results(cfg, folder, trainer, tokenizer, source, raw, quant, quantized_modules, samples,
                                      network)
            del trainer, model
            gc.collect()
            if not main:
                return TrainResult(out, metrics)  # the main process merges and uploads
            if cfg.merge_adapter_with_base:
                _merge(cfg, source, final_dir, folder.record("merged_model"))
            if cfg.convert_to_gguf:
                exported = out / ("merged_model" if cfg.use_peft else "final_model")
                for name in (GGUF_FILE, GGUF_FILE + ".json", GGUF_FILE + ".rejected", "Modelfile"):
                    folder.record(name)
                _export_gguf(cfg, exported, out / GGUF_FILE)
        except BaseException as exc:
            folder.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise _training_failure(exc, guard, out) from None
        folder.finish("complete")
    if cfg.push_to_hub:
        upload = out / ("merged_model" if cfg.upload_merged_model else "final_model")
        extra = (out / GGUF_FILE, out / (GGUF_FILE + ".json"), out / "Modelfile") if cfg.upload_gguf else ()
        url = hub.push_folder(upload, cfg.hub_repo_id, token=hub_token, private=cfg.hub_private,
                              revision=cfg.hub_revision, commit_message=cfg.hub_commit_message, extra_files=extra)
        print(f"Uploaded {upload} to {url}")
    return TrainResult(out, metrics)


# ---------------------------------------------------------------------------------------------------------------
# Before anything is loaded


def _writes(cfg: TrainConfig) -> tuple[str, ...]:
    """The entries of output_dir this run may create (fnmatch patterns)."""
    names = ["final_model", "trainer_state.json", "run_config.yaml", "loss.png", "checkpoint-*"]
    if cfg.mask_mode != "none" and cfg.ica_template_path is None:
        names.append(networks.TEMPLATES_FILE)
    if cfg.use_peft:
        names.append("adapter")
    if cfg.merge_adapter_with_base:
        names.append("merged_model")
    if cfg.convert_to_gguf:
        names += [GGUF_FILE, GGUF_FILE + ".json", GGUF_FILE + ".rejected", "Modelfile"]
    if cfg.sample_prompts:
        names.append("samples.json")
    if {"tensorboard", "all"} & set(cfg.report_to):
        names.append("runs")  # the Trainer's TensorBoard folder
    return tuple(names)


def _inputs(cfg: TrainConfig) -> dict[str, str]:
    """The local files and folders this run reads; nothing it writes or removes may contain them."""
    found = {}
    for flag, value in (*(("--dataset_name_or_path", source.name) for source in cfg.sources()),
                        ("--eval_dataset_name_or_path", cfg.eval_dataset_name_or_path),
                        ("--model_name_or_path", cfg.model_name_or_path),
                        ("--config", cfg.config_file),
                        ("--chat_template_path", cfg.chat_template_path),
                        ("--resume_from_checkpoint", cfg.resume_from_checkpoint)):
        if value and value != "latest" and (Path(value).expanduser().exists() or looks_like_local_path(value)):
            found[flag] = str(Path(value).expanduser())
    return found


def _shape_settings(cfg: TrainConfig, templates: networks.Templates | None = None) -> dict[str, Any]:
    """What a checkpoint of this run holds, to be compared when a run resumes from it."""
    settings: dict[str, Any] = {"use_peft": cfg.use_peft, "mask_mode": cfg.mask_mode}
    if cfg.use_peft:
        settings.update(lora_r=cfg.lora_r, lora_target_modules=list(cfg.lora_target_modules))
    if cfg.mask_mode != "none":
        settings.update(ica_component_ids=sorted(cfg.ica_component_ids), ica_mask_layers=cfg.ica_mask_layers or "all")
        if templates is not None:
            settings["ica_template"] = templates.sha256[:16]
    return settings


def _given_templates(cfg: TrainConfig, out: Path) -> tuple[networks.Templates | None, list[str]]:
    """The template file the mask comes from, read now: --ica_template_path, or the one an earlier run of this
    folder built (so that resuming recomputes nothing)."""
    if cfg.mask_mode == "none":
        return None, []
    path = cfg.ica_template_path
    if path is None and cfg.resume_from_checkpoint and (out / networks.TEMPLATES_FILE).is_file():
        path = str(out / networks.TEMPLATES_FILE)
    if path is None:
        return None, []
    try:
        templates = networks.read_templates(path)
        if cfg.ica_component_ids:
            templates.network(cfg.ica_component_ids, templates.layers, path)
    except UsageError as exc:
        return None, exc.problems
    return templates, []


def _resume_checkpoint(cfg: TrainConfig, out: Path, templates: networks.Templates | None = None
                       ) -> tuple[list[str], checkpoints.Latest | None]:
    """The checkpoint to resume from, or why it cannot be used (incomplete, missing, saved with other shapes)."""
    given = cfg.resume_from_checkpoint
    if not given:
        return [], None
    if given == "latest":
        found = checkpoints.latest(out)
        if found.path is None:
            skipped = "; ".join(f"{p.name} is incomplete ({why})" for p, why in found.skipped)
            return [f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {out}"
                    + (f" ({skipped})" if skipped else "") + "; start without it."], None
    else:
        path = Path(given)
        if not path.is_dir():
            return [f"--resume_from_checkpoint {given}: no such checkpoint folder; give a checkpoint-N folder or "
                    "'latest'."], None
        reason = checkpoints.incomplete_reason(path)
        if reason is not None:
            return [f"--resume_from_checkpoint {given}: not a complete Trainer checkpoint ({reason}); give another "
                    "checkpoint-N folder or 'latest'."], None
        found = checkpoints.Latest(path, [])
    return checkpoints.settings_problems(found.path, _shape_settings(cfg, templates)), found


def _announce_resume(found: checkpoints.Latest, folder: OutputFolder, main: bool) -> str:
    """Say which checkpoint the run continues from; remove this run's own incomplete ones that were skipped, so that
    the Trainer's rotation can never keep one of them in place of a complete checkpoint."""
    if not main:
        return str(found.path)
    recorded = set((read_manifest(folder.path) or {}).get("entries", []))
    for path, why in found.skipped:
        ours = path.parent == folder.path and path.name in recorded
        if ours:
            shutil.rmtree(path, ignore_errors=True)
        print(f"Skipped {path.name}: incomplete ({why}){'; removed it' if ours else ''}.")
    print(f"Resuming from {found.path}")
    return str(found.path)


# ---------------------------------------------------------------------------------------------------------------
# Training


class _Diverged(FnsftError):
    """A trained weight became NaN or infinite."""


class _RunGuard(TrainerCallback):
    """Keeps the output folder's record, marks each checkpoint complete once saved, and stops a run whose trained
    weights stop being finite before such weights can be saved."""

    def __init__(self, folder: OutputFolder, settings: dict[str, Any]):
        self.folder, self.settings = folder, settings
        self.saving: str | None = None
        self.last_saved: str | None = None
        self.restriction = None  # a functional-network UpdateRestriction, when training is masked
        self.args, self.step = None, 0

    def _before_save(self, state, control) -> None:
        if control.should_save and state.is_world_process_zero:
            self.saving = f"checkpoint-{state.global_step}"
            self.folder.record(self.saving)

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        checkpoints.write_marker(Path(args.output_dir) / name, self.settings)
        self.saving, self.last_saved = None, name

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        if self.restriction is not None:
            self.restriction.restore()

        trained = [p.detach() for p in model.parameters() if p.requires_grad] if model is not None else []
        if not trained:
            return
        with torch.no_grad():
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(trained))).all())
        if not finite:
            raise self.diverged(args, state.global_step + 1)

    def on_step_begin(self, args, state, control, **kwargs):
        self.args, self.step = args, state.global_step + 1

    def diverged(self, args, step: int) -> _Diverged:
        newest = self.last_saved or _newest(Path(args.output_dir))
        kept = f"the newest good checkpoint is {newest}" if newest else "no checkpoint was saved"
        return _Diverged(f"training diverged at step {step}: a trained weight became NaN or infinite, so the run "
                         f"stopped before saving it ({kept}). Lower --learning_rate (now {args.learning_rate:g}) "
                         "or check the data, then start again.")


def _plan_network(cfg: TrainConfig, model, train_set, templates: networks.Templates | None) -> networks.NetworkPlan:
    """The functional network the mask uses: from the template file, or built now from the training data."""
    built = templates is None
    if built:
        print(f"Building functional-network templates from the training data ({cfg.ica_components} components, "
              f"seed {cfg.seed}); they are saved as {networks.TEMPLATES_FILE} when training starts.")
        examples = networks.sample_rows(list(train_set["input_ids"]), networks.DEFAULT_SAMPLES, cfg.seed)
        templates, summary = networks.build_templates(
            model, examples, n_components=cfg.ica_components, threshold=cfg.ica_threshold,
            percentile=cfg.ica_percentile, z=cfg.ica_z, max_tokens=networks.DEFAULT_MAX_TOKENS, layers_spec=None,
            seed=cfg.seed, provenance={"model": Path(cfg.model_name_or_path).name,
                                       "datasets": [Path(source.name).name for source in cfg.sources()]})
        print(summary)
    source = cfg.ica_template_path or networks.TEMPLATES_FILE
    return networks.NetworkPlan.create(model, templates, cfg.mask_mode, cfg.ica_component_ids or None,
                                       cfg.ica_mask_layers, source, built)


def _newest(out: Path) -> str | None:
    found = checkpoints.latest(out).path
    return found.name if found is not None else None


def _training_failure(exc: BaseException, guard: _RunGuard, out: Path) -> BaseException:
    """The exception to report for a failure inside trainer.train: one line for what a user can fix."""
    if isinstance(exc, (FnsftError, KeyboardInterrupt)):
        return exc
    if isinstance(exc, RuntimeError) and "without overflow" in str(exc) and guard.args is not None:
        # The optimizer's own arithmetic overflowed (an update beyond float range): the same divergence, caught
        # one moment earlier than the finiteness check after the step.
        return guard.diverged(guard.args, guard.step)
    cause = describe_write_error(exc)
    if cause is None and guard.saving is None:
        return exc
    newest = _newest(out)
    where = f"could not write {out / guard.saving}" if guard.saving else "could not write to the output folder"
    kept = (f"the newest complete checkpoint is {newest}: resume with --resume_from_checkpoint latest"
            if newest else "no complete checkpoint was saved")
    return FnsftError(f"{where}: {cause or first_line(exc)}; {kept}.")


def _write_run_config(cfg: TrainConfig, path: Path) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# fnsft train --config {path}  (fnsft {__version__})\n")
        yaml.safe_dump(cfg.to_yaml_dict(), handle, sort_keys=False)


def _describe_data(raw: data.RawData, train_set, eval_set, tokenizer) -> None:
    total, trained = data.token_counts(train_set)
    template = "its chat template" if data.has_chat_template(tokenizer) else "EOS-separated turns (no chat template)"
    print(f"Data: {len(train_set)} training and {len(eval_set) if eval_set is not None else 0} validation examples "
          f"({raw.format} format, rendered with {template}); {total} tokens, {trained} of them trained.")
    if len(raw.sources) > 1:
        for name, fmt, count in raw.sources:
            print(f"  {name}: {count} examples ({fmt} format)")


def batching(cfg: TrainConfig) -> tuple[bool, bool]:
    """(padding-free, grouped by length). Padding-free is the default: on the long-tailed chats of
    benchmarks/train_bench.py it trained as fast as length-grouped padded batches (within run-to-run noise) at 40% less
    peak memory, keeps the data order, and is what flash attention's varlen kernels are made for."""
    return (True, False) if cfg.packing else (cfg.padding_free, cfg.group_by_length)


def _describe_batching(cfg: TrainConfig, model) -> str:
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    padding_free, grouped = batching(cfg)
    layout = ("packed rows of --max_seq_length tokens" if cfg.packing else
              "padding-free rows" if padding_free else "padded batches")
    return f"{layout}{', grouped by length' if grouped else ''} ({attention} attention)"


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                      modules_to_save=cfg.lora_modules_to_save or None, task_type="CAUSAL_LM")


def sft_config(cfg: TrainConfig, evaluating: bool, half=None):
    """The SFTConfig of a run: fnsft's flags, then any other field from the config file's `trainer:` mapping."""
    import torch
    from trl import SFTConfig

    padding_free, grouped = batching(cfg)
    evaluating = evaluating and cfg.eval_strategy != "no"
    return SFTConfig(
        **cfg.trainer_overrides,  # checked against SFTConfig's fields up front; fnsft's own flags are set below
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, say so: accelerate then runs several processes as data-parallel CPU workers (gloo).
        use_cpu=not torch.cuda.is_available(),
        # Every trained parameter takes part in every step (LoRA factors or all weights): no extra graph traversal.
        ddp_find_unused_parameters=False,
        learning_rate=cfg.effective_learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of the steps
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        eval_strategy=cfg.eval_strategy if evaluating else "no",
        eval_steps=cfg.effective_eval_steps if evaluating and cfg.eval_strategy == "steps" else None,
        load_best_model_at_end=cfg.load_best_model_at_end and evaluating,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        dataloader_num_workers=cfg.dataloader_num_workers,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        report_to="none" if cfg.report_to == ["none"] else cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16 or half == torch.bfloat16,
        fp16=cfg.fp16 or half == torch.float16,
        # Examples are already cut to --max_seq_length when tokenized; packing cuts rows to it as well.
        max_length=cfg.max_seq_length if cfg.packing else None,
        padding_free=padding_free,
        packing=cfg.packing,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if grouped else "random",
        use_liger_kernel=cfg.use_liger_kernel,
        dataset_num_proc=None,
    )


def _build_trainer(cfg: TrainConfig, model, tokenizer, train_set, eval_set, quantized: bool, guard: _RunGuard):
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    # The adapter's initial weights come from the global generator: seed it here, so that they do not depend on
    # what ran before (samples, template building).
    set_seed(cfg.seed)
    peft_config = lora_config(cfg) if cfg.use_peft else None
    if cfg.use_peft and quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    # Mixed precision is a GPU feature; on CPU a half-precision model simply trains in its own dtype.
    half = model.dtype if model.dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available() else None
    args = sft_config(cfg, eval_set is not None, half)
    # A packed row is exact only when the model builds its attention mask from the restarting positions, which it
    # does when no attention mask is given and no KV cache is built: training never needs one.
    model.config.use_cache = False

    class Trainer(SFTTrainer):
        def create_model_card(self, *args, **kwargs) -> None:
            """TRL's card names no base model; the Hub step writes one with real metadata instead."""

    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[guard])
    if cfg.gradient_checkpointing and cfg.use_peft:
        # With frozen embeddings nothing upstream of the first checkpointed block requires grad, so the recomputed
        # blocks would give the adapters no gradient; TRL only does this for its deprecated flag's name.
        trainer.model.enable_input_require_grads()
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# After training


def _save_results(cfg: TrainConfig, folder: OutputFolder, trainer, tokenizer, source: modeling.ModelSource,
                  raw: data.RawData, quant, quantized_modules: list[str], samples: dict[str, dict[str, str]],
                  network: networks.NetworkPlan | None) -> Path:
    """final_model/ (+ its training record), trainer_state.json, loss.png, adapter/, samples.json."""
    final_dir = folder.record("final_model")
    trainer.save_model(str(final_dir))  # on every process: sharded engines gather the weights collectively
    trainer.accelerator.wait_for_everyone()
    if not distributed.is_main():
        return final_dir
    tokenizer.save_pretrained(final_dir)
    # PEFT's auto-card records local paths and the pickled TrainingArguments is not portable; checkpoints keep it.
    for stray in ("README.md", "training_args.bin"):
        (final_dir / stray).unlink(missing_ok=True)
    record = _training_record(cfg, source, raw, quant, quantized_modules)
    if network is not None:
        record["functional_networks"] = network.record()
    (final_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    folder.record("trainer_state.json")
    trainer.save_state()
    _plot_loss(trainer.state.log_history, folder.record("loss.png"))
    if cfg.use_peft:
        shutil.copytree(final_dir, folder.record("adapter"), dirs_exist_ok=True)
    for prompt in samples:
        samples[prompt]["after"] = _reply(trainer.model, tokenizer, prompt, cfg.sample_max_new_tokens)
    if samples:
        _report_samples(samples, folder.record("samples.json"))
    print(f"Training done: {trainer.state.global_step} steps; final model in {final_dir}")
    return final_dir


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


def _report_samples(samples: dict[str, dict[str, str]], path: Path) -> None:
    path.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    for prompt, replies in samples.items():
        print(f"\nPrompt: {prompt}\n  before training: {replies['before']}\n  after training:  {replies['after']}")
    print()


GGUF_FILE = "model.gguf"


def _export_gguf(cfg: TrainConfig, model_dir: Path, outfile: Path) -> bool:
    """Export to GGUF; a failure leaves training successful, says how to retry, and stops only an upload that
    needs the file."""
    from functionalnetworkssft.export import export_gguf

    retry = f"fnsft export-gguf {model_dir} --outfile {outfile} --outtype {cfg.gguf_outtype}"
    if not (model_dir / "config.json").is_file():
        reason = "there is no merged model to export (the merge failed)"
    else:
        try:
            print(export_gguf(model_dir, outfile, outtype=cfg.gguf_outtype)["summary"])
            return True
        except Exception as exc:  # training succeeded: an export problem must not take the model with it
            reason = first_line(exc)
    print(f"GGUF export failed: {reason}\nThe model is saved in {model_dir}; retry with: {retry}", file=sys.stderr)
    if cfg.upload_gguf:
        raise FnsftError(f"--upload_gguf: nothing to upload because the GGUF export failed; retry with: {retry}")
    return False


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
