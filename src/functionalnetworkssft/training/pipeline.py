"""`fnsft train`: the whole run, top to bottom.

check flags, output folder and checkpoint -> check Hub access -> hold the output folder -> read data -> load
tokenizer, tokenize -> load model -> (training starts: record it) train -> save final_model/ and adapter/ -> merge ->
export -> upload. Everything that can be rejected is rejected before the model is loaded, and nothing is written to
the output folder before training starts. Each stage is one call here; its code lives in the module named for it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from functionalnetworkssft import checkpoints, data, distributed, forgetting, hub, modeling, networks
from functionalnetworkssft.errors import UsageError, first_line
from functionalnetworkssft.outputs import OutputFolder
from functionalnetworkssft.training.after import GGUF_FILE, export_model, merge_model
from functionalnetworkssft.training.config import TrainConfig
from functionalnetworkssft.training.guard import RunGuard, train_steps, training_failure
from functionalnetworkssft.training.preflight import (
    EVERY_ENTRY,
    announce_resume,
    given_templates,
    inputs,
    resume_checkpoint,
    shape_settings,
    writes,
)
from functionalnetworkssft.training.results import describe_data, sample_reply, save_results, write_run_config
from functionalnetworkssft.training.trainer import (
    build_trainer,
    describe_batching,
    plan_network,
    prepare_quantized,
    settle_lora_dropout,
)


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
    # In a data-parallel run (torchrun, accelerate launch) every process trains; only the main one owns the folder.
    main = distributed.is_main()
    in_memory = train_dataset is not None
    problems = [p for p in cfg.problems() if not (in_memory and p.startswith("--dataset_name_or_path is missing"))]
    if eval_dataset is not None and not in_memory:
        problems.append("eval_dataset needs train_dataset (or give the evaluation data in the dataset's validation "
                        "split).")
    if problems:  # paths are only worth checking once every flag has a usable value
        raise UsageError(problems)
    out = Path(cfg.output_dir)
    folder = OutputFolder(out, writes=writes(cfg), inputs=inputs(cfg), overwrite=cfg.overwrite_output_dir,
                          resuming=bool(cfg.resume_from_checkpoint), writer=main, known=EVERY_ENTRY)
    resume: checkpoints.Latest | None = None
    templates = chat_template = None
    if cfg.chat_template_path:
        try:
            chat_template = modeling.read_chat_template(cfg.chat_template_path)
        except UsageError as exc:
            problems += exc.problems
    if not problems:
        problems += folder.problems()
        templates, template_problems = given_templates(cfg, out)
        problems += template_problems
        resume_problems, resume = resume_checkpoint(cfg, out, templates)
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
        tokenizer = modeling.load_tokenizer(source, cfg.trust_remote_code, chat_template,
                                            f"--chat_template_path {cfg.chat_template_path}")
        train_set, eval_set = data.tokenize(raw, tokenizer, cfg.max_seq_length, cfg.train_on_prompt,
                                            cfg.dataset_num_proc)
        describe_data(raw, train_set, eval_set, tokenizer)

        dtype = modeling.training_dtype(cfg.torch_dtype, source)
        quant = modeling.quantization_config(cfg.use_4bit, cfg.use_8bit, dtype)
        model = modeling.load_model(source, dtype, quant, cfg.trust_remote_code, cfg.attn_implementation)
        if cfg.use_peft and (problems := modeling.lora_problems(model, cfg.lora_target_modules, cfg.lora_r)):
            raise UsageError(problems)
        if cfg.use_peft and (line := settle_lora_dropout(cfg, model)) and main:
            print(line)
        if cfg.use_peft and quant is not None:
            model = prepare_quantized(cfg, model)
        quantized_modules = modeling.quantized_module_names(model) if quant is not None else []
        network = plan_network(cfg, model, train_set, templates) if cfg.mask_mode != "none" else None

        total_tokens, _ = data.token_counts(train_set)
        forgetting_plan = forgetting.ForgettingPlan.create(cfg, model, tokenizer, forgetting.fingerprint(source, cfg),
                                                           total_tokens / max(1, len(train_set)))

        samples = {p: {"before": sample_reply(model, tokenizer, p, cfg.sample_max_new_tokens)}
                   for p in (cfg.sample_prompts if main else [])}
        guard = RunGuard(folder, shape_settings(cfg, network.templates if network is not None else None))
        inference_cache = getattr(model.config, "use_cache", None)  # training turns the KV cache off
        try:
            trainer = build_trainer(cfg, model, tokenizer, train_set, eval_set, guard, forgetting_plan)
        except ValueError as exc:  # TRL, PEFT and transformers check the combination they are given
            raise UsageError(f"the trainer refused this configuration: {first_line(exc)}") from None
        if network is not None:
            network.attach(trainer.model, cfg.use_peft, cfg.mask_forward, guard)
            if network.forward is not None and forgetting_plan is not None:
                forgetting_plan.pause_while_measuring(network.forward.paused)
        print(f"Batching: {describe_batching(cfg, model)}.")

        # Training starts: from here on the folder holds this run, and its record says what the run wrote.
        folder.begin()
        try:
            write_run_config(cfg, folder.record("run_config.yaml"))
            if network is not None and network.built and main:
                network.templates.write(folder.record(networks.TEMPLATES_FILE))
            resume_path = announce_resume(resume, folder, main) if resume is not None else None
            metrics = train_steps(trainer, resume_path)
            if eval_set is not None:
                metrics.update(trainer.evaluate())
            if network is not None:
                network.detach()  # inference, samples and the merge run the model as it is, with no hooks
            if inference_cache is not None:
                model.config.use_cache = inference_cache
            final_dir = save_results(cfg, folder, trainer, tokenizer, source, raw, quant, quantized_modules, samples,
                                      network, forgetting_plan)
            del trainer, model
            gc.collect()
            if not main:
                return TrainResult(out, metrics)  # the main process merges and uploads
            if cfg.merge_adapter_with_base:
                merge_model(cfg, source, final_dir, folder.record("merged_model"))
            if cfg.convert_to_gguf:
                exported = out / ("merged_model" if cfg.use_peft else "final_model")
                for name in (GGUF_FILE, GGUF_FILE + ".json", GGUF_FILE + ".rejected", "Modelfile"):
                    folder.record(name)
                export_model(cfg, exported, out / GGUF_FILE)
        except BaseException as exc:
            folder.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise training_failure(exc, guard, out) from None
        folder.finish("complete")
    if cfg.push_to_hub:
        upload = out / ("merged_model" if cfg.upload_merged_model else "final_model")
        extra = (out / GGUF_FILE, out / (GGUF_FILE + ".json"), out / "Modelfile") if cfg.upload_gguf else ()
        url = hub.push_folder(upload, cfg.hub_repo_id, token=hub_token, private=cfg.hub_private,
                              revision=cfg.hub_revision, commit_message=cfg.hub_commit_message, extra_files=extra)
        print(f"Uploaded {upload} to {url}")
    return TrainResult(out, metrics)
