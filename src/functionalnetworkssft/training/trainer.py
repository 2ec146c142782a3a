"""How the model is trained: the LoRA and SFT configuration from fnsft's flags, TRL's trainer, and the functional
network that restricts it."""

from __future__ import annotations

import warnings
from pathlib import Path

from functionalnetworkssft import modeling, networks
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.forgetting import ForgettingPlan, ProbeAtEnds, guarded_loss
from functionalnetworkssft.training.config import TrainConfig
from functionalnetworkssft.training.guard import RunGuard


def batching(cfg: TrainConfig) -> tuple[bool, bool]:
    """(padding-free, grouped by length). Padding-free is the default: on the long-tailed chats of
    benchmarks/train_bench.py it trained as fast as length-grouped padded batches (within run-to-run noise) at 40% less
    peak memory, keeps the data order, and is what flash attention's varlen kernels are made for."""
    return (True, False) if cfg.packing else (cfg.padding_free, cfg.group_by_length)


def describe_batching(cfg: TrainConfig, model) -> str:
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    padding_free, grouped = batching(cfg)
    layout = ("packed rows of --max_seq_length tokens" if cfg.packing else
              "padding-free rows" if padding_free else "padded batches")
    return f"{layout}{', grouped by length' if grouped else ''} ({attention} attention)"


DEFAULT_LORA_DROPOUT = 0.05


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    dropout = DEFAULT_LORA_DROPOUT if cfg.lora_dropout is None else cfg.lora_dropout
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                      modules_to_save=cfg.lora_modules_to_save or None, task_type="CAUSAL_LM")


def settle_lora_dropout(cfg: TrainConfig, model) -> str | None:
    """PEFT puts LoRA on a mixture of experts' stacked expert weights (and its router) as LoRA on parameters, which
    has no dropout. Unless --lora_dropout was given, such a run uses 0 and says so; given above 0, it is refused
    before training. Returns the line to print, if any."""
    reached = modeling.lora_parameter_targets(model, lora_config(cfg))
    if not reached:
        if cfg.lora_dropout is None:
            cfg.lora_dropout = DEFAULT_LORA_DROPOUT
        return None
    if cfg.lora_dropout:
        raise UsageError(f"--lora_dropout {cfg.lora_dropout:g}: LoRA reaches this model's stacked expert weights "
                         f"({', '.join(reached)}), where PEFT has no dropout; pass --lora_dropout 0, or leave the "
                         "experts out with --lora_target_modules naming the attention layers (e.g. q_proj k_proj "
                         "v_proj o_proj).")
    if cfg.lora_dropout is None:
        cfg.lora_dropout = 0.0
        return (f"LoRA: dropout 0, because LoRA reaches this mixture of experts' stacked weights "
                f"({', '.join(reached)}), where PEFT has no dropout.")
    return None


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


def prepare_quantized(cfg: TrainConfig, model):
    """A quantized model made ready for LoRA (its other weights in float32, gradient checkpointing as configured).
    Done before anything reads the base (samples, networks, the forgetting probe's snapshot), so that they all read
    the base the adapter trains on."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def build_trainer(cfg: TrainConfig, model, tokenizer, train_set, eval_set, guard: RunGuard,
                  forgetting: ForgettingPlan | None = None):
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    # The adapter's initial weights come from the global generator: seed it here, so that they do not depend on
    # what ran before (samples, template building).
    set_seed(cfg.seed)
    peft_config = lora_config(cfg) if cfg.use_peft else None
    # Mixed precision is a GPU feature; on CPU a half-precision model simply trains in its own dtype.
    half = model.dtype if model.dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available() else None
    args = sft_config(cfg, eval_set is not None, half)
    # A packed row is exact only when the model builds its attention mask from the restarting positions, which it
    # does when no attention mask is given and no KV cache is built: training never needs one.
    model.config.use_cache = False

    probe = forgetting.probe if forgetting is not None else None
    forgetting_guard = forgetting.guard if forgetting is not None else None

    class Trainer(SFTTrainer):
        def create_model_card(self, *args, **kwargs) -> None:
            """TRL's card names no base model; the Hub step writes one with real metadata instead."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if forgetting_guard is None or not model.training or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return guarded_loss(self, forgetting_guard, model, inputs, num_items_in_batch,
                                lambda m, i, n: super(Trainer, self).compute_loss(m, i, num_items_in_batch=n))

        def evaluation_loop(self, *args, **kwargs):
            # In the evaluation's own record: every tracker and callback sees it beside eval_loss.
            output = super().evaluation_loop(*args, **kwargs)
            if probe is not None:
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                measured = probe.measure(self.accelerator.unwrap_model(self.model), self.state.global_step)
                output.metrics.update({f"{prefix}_{key}": value for key, value in measured.items()})
            return output

    callbacks = [guard] + ([ProbeAtEnds(probe)] if probe is not None else [])
    with warnings.catch_warnings():
        # PEFT adds rank and alpha patterns for a mixture of experts' fused gate_up_proj that its own matching then
        # misses, and warns about it on every MoE run; the adapter gets the configured rank, which the merge reads
        # from PEFT itself, so the warning tells the user nothing they can act on.
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if probe is not None:
        callbacks[-1].trainer = trainer
    if cfg.gradient_checkpointing and cfg.use_peft:
        # With frozen embeddings nothing upstream of the first checkpointed block requires grad, so the recomputed
        # blocks would give the adapters no gradient; TRL only does this for its deprecated flag's name.
        trainer.model.enable_input_require_grads()
    return trainer


def plan_network(cfg: TrainConfig, model, train_set, templates: networks.Templates | None) -> networks.NetworkPlan:
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

