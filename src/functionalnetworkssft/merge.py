"""Merge a PEFT LoRA adapter into its base model: streaming, exact, verified.

The base model is never loaded as a model. Its safetensors shards are read one row block at a time; each tensor a
LoRA adapter touches gets its delta added in float32 and is cast once back to the tensor's own dtype; every other
tensor is copied byte for byte. Peak memory is therefore one row block plus the adapter, whatever the model's size.
The output goes to a hidden folder beside the target and is renamed into place only once complete and verified.

Semantics follow PEFT's LoRA layers exactly (scaling, rsLoRA, DoRA, rank/alpha patterns, fan_in_fan_out for
Conv1D, lora_bias, modules_to_save, trainable tokens, resized embeddings), with one deliberate difference: where
input and output embeddings are tied and the adapter changes only one of them, the merge unties them, so that the
merged model computes what base+adapter computed (PEFT's merge_and_unload adds the delta to the shared tensor).

QLoRA: PEFT does not record that an adapter was trained on a quantized base. When the adapter folder holds
`fnsft_training.json` (written by `fnsft train`), the merge reads from it:
  quantization               "4bit" | "8bit" | null
  quantized_modules          module names whose weights were quantized in training (embeddings and lm_head never)
  bnb_4bit_quant_type        "nf4" (default) or "fp4"
  bnb_4bit_use_double_quant  true (default)
  bnb_4bit_blocksize         64 (default)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from functionalnetworkssft.config import MERGE_REPORT, TRAINING_RECORD, arg, looks_like_local_path, parse
from functionalnetworkssft.errors import MergeError, UsageError, first_line
from functionalnetworkssft.merge_io import (
    BaseWeights,
    PlannedTensor,
    TensorInfo,
    parse_size,
    plan_shards,
    row_blocks,
    sha256_file,
    write_shards,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# init_lora_weights values that only choose A and B; all others (pissa, olora, corda, loftq, ...) rewrite the base
# weights when the adapter is created, so the adapter is meaningless on the untouched base.
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# LoraConfig options that select a LoRA variant this engine does not implement.
UNSUPPORTED_OPTIONS = ("target_parameters", "alora_invocation_tokens", "arrow_config", "velora_config",
                       "monteclora_config", "use_bdlora", "kasa_config", "layer_replication", "use_qalora",
                       "megatron_config", "mica")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "processor_config.json")


@dataclass
class MergeConfig:
    """Merge a PEFT LoRA adapter into its base model, streaming one tensor at a time, and verify the result."""

    adapter_path: str = arg("Folder of the PEFT LoRA adapter (adapter_config.json + adapter weights).")
    output_dir: str = arg("Folder for the merged model; written beside it first and renamed into place when done.")
    base_model_name_or_path: str | None = arg(
        "Base model folder or Hub id. Default: base_model_name_or_path from adapter_config.json.", default=None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "Dtype of the merged floating-point tensors. auto keeps each tensor's own dtype (no fp32 blow-up).",
        default="auto")
    max_shard_size: str = arg("Largest output shard, e.g. 5GB (10^9 bytes) or 2GiB.", default="5GB")
    verify: Literal["auto", "on", "off"] = arg(
        "Compare the merged model with base+adapter on probe inputs after writing. auto: when both fit in memory.",
        default="auto")
    device: Literal["cpu", "cuda"] = arg("Where deltas are computed and verification runs.", default="cpu")
    qlora_merge_base: Literal["original", "dequantized"] = arg(
        "For adapters trained on a 4/8-bit base (fnsft_training.json): merge into the original weights, or into "
        "the quantization round trip of exactly the layers that were quantized in training.", default="original")
    trust_remote_code: bool = arg("Allow model code from the base's repository to run (to read its architecture).",
                                  default=False)


@dataclass
class MergeReport:
    output_dir: str
    base_model: str
    adapter_path: str
    dtype: str
    lora_modules: int = 0
    variants: list[str] = field(default_factory=list)
    replaced_tensors: list[str] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    total_size: int = 0
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    qlora: dict[str, Any] | None = None
    tokenizer_from: str | None = None
    seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=lambda: {"status": "off"})
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        status = self.verification.get("status")
        return True if status == "passed" else False if status == "failed" else None

    def summary(self) -> str:
        size = f"{self.total_size / 1e9:.2f} GB" if self.total_size >= 1e8 else f"{self.total_size / 1e6:.1f} MB"
        extra = f" + {len(self.replaced_tensors)} replaced tensors" if self.replaced_tensors else ""
        qlora = f", QLoRA base: {self.qlora['merge_base']}" if self.qlora else ""
        line = (f"merged {self.lora_modules} LoRA modules{extra} into {self.base_model} -> {self.output_dir} "
                f"({self.dtype}, {self.shards} shard{'s' if self.shards != 1 else ''}, {size}{qlora}) "
                f"in {self.seconds:.1f} s; ")
        v = self.verification
        if v.get("status") in ("passed", "failed"):
            line += (f"verification {v['status']}: max |logit diff| {v['max_abs_logit_diff']:.2e} "
                     f"(tolerance {v['tolerance']:.1e}), top-1 agreement {v['top1_agreement']:.1%}, "
                     f"greedy {'equal' if v['greedy_equal'] else 'near-tie only' if v.get('greedy_ok') else 'DIFFERENT'}")
        else:
            line += f"verification {v.get('status')}" + (f": {v['reason']}" if v.get("reason") else "")
        return line


# ---------------------------------------------------------------------------------------------------------------
# Adapter


@dataclass
class LoraTarget:
    """One LoRA-adapted module, with its factors in float32 and the layout of the weight it changes."""

    module: str
    kind: str  # "linear" (weight stored out x in), "conv1d" (in x out) or "embedding" (vocab x dim)
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def out_major(self) -> bool:
        # Rows of the stored weight are output features only for nn.Linear; Conv1D and Embedding store the
        # transpose of B @ A, which is why PEFT transposes their delta (fan_in_fan_out).
        return self.kind == "linear"

    def add_delta_rows(self, block: torch.Tensor, start: int, stop: int) -> None:
        """block += scaling * (B @ A)[rows start:stop], in one fused multiply-add with no delta tensor."""
        A, B = self.A.to(block.device), self.B.to(block.device)
        if self.out_major:
            block.addmm_(B[start:stop], A, alpha=self.scaling)
        else:
            block.addmm_(A[:, start:stop].T, B.T, alpha=self.scaling)


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    targets: dict[str, LoraTarget] = field(default_factory=dict)  # module name -> target
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> full tensor
    trainable_tokens: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # module -> rows
    files: list[Path] = field(default_factory=list)
    # Parameters the adapter file holds only because PEFT saves a targeted embedding's base weight with it.
    base_copies: set[str] = field(default_factory=set)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name at a dot boundary."""
    import re

    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise UsageError(f"--adapter_path {folder}: no such folder.")
    if not path.is_file():
        raise UsageError(f"--adapter_path {folder}: no adapter_config.json; point it at a PEFT adapter folder "
                         "(e.g. OUTPUT/final_model or OUTPUT/adapter).")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc}).") from None
    problems = []
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        problems.append(f"{path}: adapter type {peft_type} is not supported by fnsft merge, which merges LoRA "
                        "adapters (incl. rsLoRA, DoRA, rank/alpha patterns); merge it with PEFT's "
                        "PeftModel.from_pretrained(base, adapter).merge_and_unload().")
    else:
        init = config.get("init_lora_weights", True)
        if init not in SAFE_INITS:
            problems.append(f"{path}: init_lora_weights={init!r} rewrote the base weights when the adapter was "
                            "created, so it cannot be merged into the original base; convert it to a plain LoRA "
                            "with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first.")
        for option in UNSUPPORTED_OPTIONS:
            if config.get(option) not in (None, False, [], {}):
                problems.append(f"{path}: LoRA option {option}={config[option]!r} is not supported by fnsft merge; "
                                "merge this adapter with PEFT's merge_and_unload().")
    if problems:
        raise UsageError(problems)
    return config


def _load_adapter_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st), st
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True), binary
        except Exception as exc:
            raise MergeError(f"{binary}: refused to load: not a plain tensor file ({type(exc).__name__}); "
                             "re-save the adapter with safetensors.") from None
    raise MergeError(f"--adapter_path {folder}: no adapter_model.safetensors or adapter_model.bin.")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """'m.q_proj.lora_A.weight' -> ('m.q_proj', 'lora_A', 'weight'); None for a full tensor."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in LORA_PARTS or (part == "token_adapter" and parts[i + 1:i + 2] == ["trainable_tokens_delta"]):
            rest = parts[i + 1:]
            if part == "token_adapter":
                part, rest = "trainable_tokens_delta", rest[1:]
            param = rest[-1] if rest and rest[-1] in ("weight", "bias") else "weight"
            return ".".join(parts[:i]), part, param
        if part.startswith(("lora_", "ia3_", "vera_", "hada_", "lokr_", "oft_", "boft_")):
            raise UsageError(f"adapter tensor {key}: unknown adapter parameter '{part}'; fnsft merge supports PEFT "
                             "LoRA adapters only.")
    return None


def _full_tensor_name(key: str) -> str | None:
    """The base tensor a full adapter tensor replaces; None for the frozen original PEFT saves beside a copy."""
    parts = key.split(".")
    if "original_module" in parts:
        return None
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save":
            # 'modules_to_save.<adapter>.weight' in a raw state dict, 'modules_to_save.weight' once PEFT saved it.
            i += 2 if i + 2 < len(parts) else 1
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def load_adapter(folder: Path, config: dict[str, Any], modules: dict[str, Any]) -> Adapter:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    tensors, path = _load_adapter_tensors(folder)
    adapter = Adapter(folder, config, tensors, files=[folder / "adapter_config.json", path])
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        split = _split_key(name)
        if split is None:
            target = _full_tensor_name(name)
            if target is None or (target in adapter.replacements and ".modules_to_save." not in name):
                continue  # a trained modules_to_save copy wins over other copies of the same tensor
            adapter.replacements[target] = tensor
            if ".base_layer." in name:
                adapter.base_copies.add(target)
        else:
            module, part, param = split
            pieces.setdefault(module, {})[f"{part}.{param}"] = tensor
    for module, parts in pieces.items():
        if module not in modules:
            raise MergeError(f"{folder}: the adapter changes module {module}, which the base model does not have; "
                             "is --base_model_name_or_path the model this adapter was trained on?")
        layer = modules[module]
        if "trainable_tokens_delta.weight" in parts:
            adapter.trainable_tokens[module] = (_token_indices(config, module), parts.pop("trainable_tokens_delta.weight"))
            if not parts:
                continue
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if isinstance(layer, nn.Embedding):
            kind, a_key, b_key = "embedding", "lora_embedding_A.weight", "lora_embedding_B.weight"
            expected_a, expected_b = (r, layer.num_embeddings), (layer.embedding_dim, r)
        elif isinstance(layer, (nn.Linear, Conv1D)):
            kind, a_key, b_key = ("conv1d" if isinstance(layer, Conv1D) else "linear"), "lora_A.weight", "lora_B.weight"
            weight = layer.weight
            out_f, in_f = (weight.shape[1], weight.shape[0]) if kind == "conv1d" else tuple(weight.shape)
            expected_a, expected_b = (r, in_f), (out_f, r)
        else:
            raise UsageError(f"{folder}: LoRA on {module} ({type(layer).__name__}) is not supported by fnsft merge "
                             "(it merges Linear, Conv1D and Embedding layers); merge with PEFT's merge_and_unload().")
        if a_key not in parts or b_key not in parts:
            raise MergeError(f"{folder}: module {module} has {sorted(parts)} but lacks {a_key} or {b_key}; "
                             "the adapter file is incomplete.")
        A, B = parts.pop(a_key).float(), parts.pop(b_key).float()
        if tuple(A.shape) != expected_a or tuple(B.shape) != expected_b:
            raise MergeError(f"{folder}: {module} has LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} but the base "
                             f"layer needs A{expected_a} B{expected_b} (rank from adapter_config.json: r={r}); the "
                             "adapter does not belong to this base model or its config does not match its weights.")
        target = LoraTarget(module, kind, A, B, scaling)
        if "lora_magnitude_vector.weight" in parts:
            target.magnitude = parts.pop("lora_magnitude_vector.weight").float()
        if "lora_B.bias" in parts:
            target.bias = parts.pop("lora_B.bias").float() * scaling
            if getattr(layer, "bias", None) is None:
                raise MergeError(f"{folder}: {module} has lora_bias but the base layer has no bias; PEFT cannot "
                                 "merge it either.")
        if parts:
            raise UsageError(f"{folder}: module {module} has adapter tensors {sorted(parts)} that fnsft merge does "
                             "not implement; merge with PEFT's merge_and_unload().")
        adapter.targets[module] = target
    adapter.tensors = {}  # the targets hold what is needed; the raw file contents are not kept twice
    return adapter


def _token_indices(config: dict[str, Any], module: str) -> list[int]:
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        for key, value in indices.items():
            if module == key or module.endswith("." + key):
                return list(value)
        raise MergeError(f"adapter_config.json: trainable_token_indices names no entry for {module}.")
    if indices is None:
        raise MergeError(f"adapter_config.json: the adapter holds trainable token rows for {module} but "
                         "trainable_token_indices is missing.")
    return list(indices)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA


@dataclass
class QuantSpec:
    quantization: str  # "4bit" | "8bit"
    modules: list[str]
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    inferred: bool = False

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the quantized training layer saw it, in the weight's own dtype."""
        import bitsandbytes.functional as bnbf

        if self.quantization == "4bit":
            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=self.blocksize,
                                               compress_statistics=self.double_quant, quant_type=self.quant_type)
            return bnbf.dequantize_4bit(packed, state).to(weight.dtype)
        # bitsandbytes' Int8Params quantizes row-wise (absmax) from float16.
        codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return bnbf.int8_vectorwise_dequant(codes, scales).to(weight.dtype)


def read_training_record(folder: Path, modules: dict[str, Any], output_embedding: str | None) -> QuantSpec | None:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise MergeError(f"{path}: not valid JSON ({exc}).") from None
    quantization = record.get("quantization")
    if quantization in (None, "none", False):
        return None
    if quantization not in ("4bit", "8bit"):
        raise MergeError(f"{path}: quantization {quantization!r} is not one of 4bit, 8bit, null.")
    listed = record.get("quantized_modules")
    inferred = listed is None
    if listed is not None:
        # Names taken from a PEFT-wrapped model carry its prefix and the wrapped layer's '.base_layer'.
        listed = [".".join(p for p in m.removeprefix(ADAPTER_PREFIX).split(".") if p != "base_layer") for m in listed]
    if inferred:
        # transformers quantizes every Linear except the output head when no list was recorded.
        from torch import nn

        listed = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n != output_embedding]
    unknown = [m for m in listed if m not in modules]
    if unknown:
        raise MergeError(f"{path}: quantized module {unknown[0]} does not exist in the base model.")
    double_quant = record.get("bnb_4bit_use_double_quant")
    return QuantSpec(quantization, list(listed), str(record.get("bnb_4bit_quant_type") or "nf4"),
                     True if double_quant is None else bool(double_quant), int(record.get("bnb_4bit_blocksize") or 64),
                     inferred)


# ---------------------------------------------------------------------------------------------------------------
# Planning: what each output tensor is made of


@dataclass
class TensorRecipe:
    """How one output tensor is computed from the base, in float32, block of rows by block of rows."""

    out_name: str
    source: str | None  # name in the base checkpoint, or None when the adapter supplies the whole tensor
    info: TensorInfo  # shape and dtype of the value before casting to the output dtype
    replacement: torch.Tensor | None = None
    lora: LoraTarget | None = None
    bias_add: torch.Tensor | None = None
    tokens: tuple[list[int], torch.Tensor] | None = None
    quant: QuantSpec | None = None

    @property
    def touched(self) -> bool:
        return any(x is not None for x in (self.replacement, self.lora, self.bias_add, self.tokens, self.quant))


def _source_reader(recipe: TensorRecipe, base: BaseWeights) -> Callable[[int, int], torch.Tensor]:
    if recipe.replacement is not None:
        full = recipe.replacement.to(recipe.info.dtype)
        return lambda start, stop: full[start:stop] if full.dim() else full
    if recipe.quant is not None:
        # Double quantization normalises block statistics over the whole tensor, so the round trip needs it whole.
        full = recipe.quant.roundtrip(base.read(recipe.source))
        return lambda start, stop: full[start:stop]
    return lambda start, stop: base.read_rows(recipe.source, start, stop)


def compute_blocks(recipe: TensorRecipe, base: BaseWeights, out_dtype: torch.dtype | None,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Yield the merged tensor in row blocks, cast to out_dtype (None: float32, for comparisons)."""
    read = _source_reader(recipe, base)
    info, lora = recipe.info, recipe.lora
    if not recipe.touched or (recipe.replacement is not None and lora is None and recipe.tokens is None
                              and recipe.bias_add is None):
        for start, stop in row_blocks(info):
            block = read(start, stop)
            yield block.to(out_dtype) if out_dtype is not None else block.float()
        return
    factor = None
    if lora is not None and lora.magnitude is not None:
        factor = _dora_factor(recipe, read, device)

    def merged(start: int, stop: int) -> torch.Tensor:
        block = read(start, stop).to(device=device, dtype=torch.float32, copy=True)
        if lora is not None:
            # In place: a block's float32 working set is the block and its delta, nothing more.
            lora.add_delta_rows(block, start, stop)
            if factor is not None:
                block.mul_(factor[start:stop].view(-1, 1) if lora.out_major else factor.view(1, -1))
        if recipe.bias_add is not None:
            block = block + recipe.bias_add.to(device)
        if recipe.tokens is not None:
            indices, rows = recipe.tokens
            for position, index in enumerate(indices):
                if start <= index < stop:
                    block[index - start] = rows[position].float()
        return block

    for start, stop in row_blocks(info):
        block = merged(start, stop)
        yield (block.to(out_dtype) if out_dtype is not None else block).cpu()


def _dora_factor(recipe: TensorRecipe, read, device: torch.device) -> torch.Tensor:
    """magnitude / ||W + delta|| with the norm taken per output feature, as PEFT's DoRA merge does."""
    lora = recipe.lora
    assert lora is not None and lora.magnitude is not None

    def rows(start: int, stop: int) -> torch.Tensor:
        block = read(start, stop).to(device=device, dtype=torch.float32, copy=True)
        lora.add_delta_rows(block, start, stop)
        return block

    if lora.out_major:
        norm = torch.cat([torch.linalg.norm(rows(s, e), dim=1) for s, e in row_blocks(recipe.info)])
    else:
        # Output features are the stored columns here: accumulate their squares over row blocks.
        sumsq = torch.zeros(recipe.info.shape[1], dtype=torch.float64, device=device)
        for s, e in row_blocks(recipe.info):
            sumsq += rows(s, e).double().square().sum(dim=0)
        norm = sumsq.sqrt().float()
    return lora.magnitude.to(device) / norm


@dataclass
class Plan:
    recipes: list[TensorRecipe]
    vocab_size: int | None
    tie_word_embeddings: bool | None
    notes: list[str]


def _resolve(base: BaseWeights, param: str, prefix: str) -> str | None:
    if param in base.where:
        return param
    if prefix and param.startswith(prefix + ".") and param[len(prefix) + 1:] in base.where:
        return param[len(prefix) + 1:]
    if prefix and f"{prefix}.{param}" in base.where:
        return f"{prefix}.{param}"
    return None


def build_plan(base: BaseWeights, adapter: Adapter, skeleton: Any, model_config: Any, quant: QuantSpec | None,
               device: torch.device) -> Plan:
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    names = {id(m): n for n, m in skeleton.named_modules()}
    in_emb = names.get(id(skeleton.get_input_embeddings()))
    out_layer = skeleton.get_output_embeddings()
    out_emb = names.get(id(out_layer)) if out_layer is not None else None
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    tied = bool(getattr(text_config, "tie_word_embeddings", False)) and in_emb is not None and out_emb is not None
    notes: list[str] = []

    recipes: dict[str, TensorRecipe] = {}  # keyed by disk name; insertion order = base order
    param_of: dict[str, str] = {}
    for disk in base.names():
        recipes[disk] = TensorRecipe(disk, disk, base.info(disk))

    def recipe_for(param: str) -> TensorRecipe:
        disk = _resolve(base, param, prefix)
        if disk is None:
            raise MergeError(f"the adapter changes {param}, which is not in the base checkpoint "
                             f"{base.folder}; is this the base the adapter was trained on?")
        param_of[disk] = param
        return recipes[disk]

    out_weight = f"{out_emb}.weight" if out_emb else None
    in_weight = f"{in_emb}.weight" if in_emb else None
    out_on_disk = out_weight is not None and _resolve(base, out_weight, prefix) is not None
    # A tied checkpoint stores only the input embedding; the output head is then a second recipe on the same source.
    lm_head_recipe: TensorRecipe | None = None
    if tied and not out_on_disk:
        source = _resolve(base, in_weight, prefix)
        lm_head_recipe = TensorRecipe(out_weight, source, base.info(source))

    def target_recipe(param: str) -> TensorRecipe:
        if lm_head_recipe is not None and param == out_weight:
            return lm_head_recipe
        return recipe_for(param)

    for param, tensor in list(adapter.replacements.items()):
        recipe = target_recipe(param)
        if param in adapter.base_copies and recipe.source is not None and recipe.info.shape == tuple(tensor.shape) \
                and torch.equal(tensor.to(recipe.info.dtype), base.read(recipe.source)):
            del adapter.replacements[param]  # an unchanged copy of the base weight: nothing to replace
            continue
        recipe.replacement = tensor
        recipe.info = TensorInfo(recipe.out_name, recipe.info.dtype, tuple(tensor.shape))
    for module, target in adapter.targets.items():
        recipe = target_recipe(f"{module}.weight")
        recipe.lora = target
        if target.bias is not None:
            recipe_for(f"{module}.bias").bias_add = target.bias
    for module, tokens in adapter.trainable_tokens.items():
        target_recipe(f"{module}.weight").tokens = tokens
        # PEFT ties trainable tokens of the input embedding to a tied output embedding.
        if tied and module == in_emb and out_emb not in adapter.trainable_tokens:
            target_recipe(out_weight).tokens = tokens
    if quant is not None:
        for module in quant.modules:
            recipe_for(f"{module}.weight").quant = quant

    for recipe in recipes.values():
        if recipe.lora is not None and tuple(recipe.info.shape) != _lora_shape(recipe.lora):
            raise MergeError(f"{recipe.out_name}: base shape {recipe.info.shape} does not fit the adapter's LoRA "
                             f"factors for {recipe.lora.module}; the adapter belongs to another base model.")

    ordered = list(recipes.values())
    tie_out: bool | None = getattr(text_config, "tie_word_embeddings", None)
    if tied:
        in_recipe = target_recipe(in_weight)
        out_recipe = target_recipe(out_weight)
        if _same_value(in_recipe, out_recipe, base, device):
            if lm_head_recipe is None:
                notes.append("input and output embeddings stay tied")
        else:
            # The adapter changed one embedding but not the other: base+adapter computes with two different
            # matrices, so the merged model must store both and stop tying them.
            tie_out = False
            notes.append("input and output embeddings untied: the adapter changes only one of them")
            if lm_head_recipe is not None:
                ordered.append(lm_head_recipe)
    vocab = _vocab_after(recipes, lm_head_recipe, in_weight, prefix, base, text_config)
    return Plan(ordered, vocab, tie_out, notes)


def _lora_shape(target: LoraTarget) -> tuple[int, int]:
    if target.kind == "linear":
        return (target.B.shape[0], target.A.shape[1])
    return (target.A.shape[1], target.B.shape[0])


def _same_value(a: TensorRecipe, b: TensorRecipe, base: BaseWeights, device: torch.device) -> bool:
    if a is b or (not a.touched and not b.touched and a.source == b.source):
        return True
    if a.info.shape != b.info.shape:
        return False
    if a.lora is None and b.lora is None and a.source == b.source and a.tokens is b.tokens \
            and a.bias_add is None and b.bias_add is None and a.quant is b.quant \
            and (a.replacement is b.replacement or (a.replacement is not None and b.replacement is not None
                                                    and torch.equal(a.replacement, b.replacement))):
        return True
    for left, right in zip(compute_blocks(a, base, None, device), compute_blocks(b, base, None, device)):
        if not torch.allclose(left, right, rtol=1e-6, atol=1e-7):
            return False
    return True


def _vocab_after(recipes, lm_head_recipe, in_weight, prefix, base, text_config) -> int | None:
    vocab = getattr(text_config, "vocab_size", None)
    disk = _resolve(base, in_weight, prefix) if in_weight else None
    if disk is not None and recipes[disk].replacement is not None:
        return int(recipes[disk].info.shape[0])
    return vocab


# ---------------------------------------------------------------------------------------------------------------
# The merge


def _resolve_base(name: str, trust_remote_code: bool) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or looks_like_local_path(name):
        raise UsageError(f"--base_model_name_or_path {name}: no such model folder.")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "*.py", "*.tiktoken"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.model", "*.txt", "*.py"]))
        return folder
    except Exception as exc:  # network, auth, missing repo: all become one actionable line
        raise MergeError(f"--base_model_name_or_path {name}: not a local folder and could not be downloaded from "
                         f"the Hugging Face Hub ({type(exc).__name__}); pass a local model folder.") from None


def _skeleton(base_dir: Path, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"{base_dir}: cannot read the model's architecture ({first_line(exc)}); "
                         "add --trust_remote_code for models with custom code.") from None
    return config, model


def _usage_problems(dtype, verify, device, qlora_merge_base, max_shard_size) -> list[str]:
    problems = []
    if dtype != "auto" and dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16.")
    if verify not in ("auto", "on", "off"):
        problems.append(f"--verify {verify}: choose auto, on or off.")
    if device not in ("cpu", "cuda"):
        problems.append(f"--device {device}: choose cpu or cuda.")
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible; use --device cpu.")
    if qlora_merge_base not in ("original", "dequantized"):
        problems.append(f"--qlora_merge_base {qlora_merge_base}: choose original or dequantized.")
    try:
        parse_size(max_shard_size)
    except UsageError as exc:
        problems.extend(exc.problems)
    return problems


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output_dir {output} is a file; name a folder.")
    if output.is_dir() and any(output.iterdir()) and not (output / MERGE_REPORT).is_file():
        raise UsageError(f"--output_dir {output} exists and is not an earlier merge; choose a new or empty folder.")
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        # Leftovers of an interrupted merge into the same target.
        shutil.rmtree(stale, ignore_errors=True)


def _copy_side_files(base_dir: Path, adapter_dir: Path, staging: Path, config_dict: dict[str, Any]) -> str:
    tokenizer_dir = adapter_dir if any((adapter_dir / f).is_file() for f in ("tokenizer_config.json",
                                                                               "tokenizer.json")) else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            # Copied, not re-saved: re-saving a tokenizer under transformers 5 can drop its chat template.
            shutil.copyfile(tokenizer_dir / name, staging / name)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", staging / "generation_config.json")
    else:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config_dict)).save_pretrained(staging)
    if config_dict.get("auto_map"):
        for module_file in base_dir.glob("*.py"):
            shutil.copyfile(module_file, staging / module_file.name)
    return "adapter" if tokenizer_dir == adapter_dir else "base"


def _write_config(base_dir: Path, staging: Path, plan: Plan, dtype_name: str) -> dict[str, Any]:
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype_name
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for key, value in (("vocab_size", plan.vocab_size), ("tie_word_embeddings", plan.tie_word_embeddings)):
        if value is None:
            continue
        if key in config or text is None or key not in text:
            config[key] = value
        if text is not None and key in text:
            text[key] = value
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _hash_inputs(base: BaseWeights, adapter: Adapter) -> dict[str, Any]:
    return {"base_files": {p.name: sha256_file(p) for p in base.files},
            "adapter_files": {p.name: sha256_file(p) for p in adapter.files}}


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, base_model: str | None = None,
                  dtype: str = "auto", max_shard_size: str = "5GB", verify: str = "auto", device: str = "cpu",
                  qlora_merge_base: str = "original", trust_remote_code: bool = False) -> MergeReport:
    """Merge the LoRA adapter in adapter_dir into its base; write a complete model folder to output_dir."""
    started = time.perf_counter()
    problems = _usage_problems(dtype, verify, device, qlora_merge_base, max_shard_size)
    if problems:
        raise UsageError(problems)
    adapter_dir, output = Path(adapter_dir), Path(output_dir)
    adapter_config = read_adapter_config(adapter_dir)
    base_name = base_model or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise UsageError(f"{adapter_dir / 'adapter_config.json'} names no base model; pass --base_model_name_or_path.")
    if output.resolve() in (adapter_dir.resolve(), Path(base_name).expanduser().resolve()):
        raise UsageError(f"--output_dir {output} is an input folder; choose a new folder for the merged model.")
    _prepare_output(output)
    base_dir = _resolve_base(str(base_name), trust_remote_code)
    raw_config = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").is_file() else {}
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "unknown")
        raise MergeError(f"{base_dir} is a pre-quantized checkpoint ({method}); merging into quantized weights "
                         "loses the adapter. Pass the original 16/32-bit model as --base_model_name_or_path.")
    model_config, skeleton = _skeleton(base_dir, trust_remote_code)
    modules = dict(skeleton.named_modules())
    out_layer = skeleton.get_output_embeddings()
    out_name = next((n for n, m in modules.items() if m is out_layer), None) if out_layer is not None else None
    quant = read_training_record(adapter_dir, modules, out_name)
    if qlora_merge_base == "dequantized" and quant is None:
        raise UsageError(f"--qlora_merge_base dequantized: {adapter_dir} has no {TRAINING_RECORD} recording a "
                         "4bit/8bit training base; drop the flag to merge into the original weights.")
    adapter = load_adapter(adapter_dir, adapter_config, modules)
    torch_device = torch.device(device)

    base = BaseWeights(base_dir)
    hasher = ThreadPoolExecutor(max_workers=1)
    hashes = hasher.submit(_hash_inputs, base, adapter)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        plan = build_plan(base, adapter, skeleton, model_config,
                          quant if qlora_merge_base == "dequantized" else None, torch_device)
        report = _write_merged(plan, base, adapter, staging, base_dir, dtype, parse_size(max_shard_size),
                               torch_device)
        report.base_model, report.adapter_path, report.output_dir = str(base_name), str(adapter_dir), str(output)
        if quant is not None:
            report.qlora = {"quantization": quant.quantization, "merge_base": qlora_merge_base,
                            "quantized_modules": len(quant.modules), "quantized_modules_inferred": quant.inferred,
                            "quant_type": quant.quant_type if quant.quantization == "4bit" else None,
                            "double_quant": quant.double_quant if quant.quantization == "4bit" else None,
                            "blocksize": quant.blocksize if quant.quantization == "4bit" else None}
        report.inputs = hashes.result()
        report.verification = _maybe_verify(verify, staging, base_dir, adapter_dir, base, plan, quant,
                                            qlora_merge_base, skeleton, report, torch_device, trust_remote_code)
        report.seconds = round(time.perf_counter() - started, 3)
        (staging / MERGE_REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
        if report.verification.get("status") == "failed":
            raise MergeError(f"verification failed, nothing written to {output}: {report.summary()}")
        _move_into_place(staging, output)
        return report
    finally:
        hasher.shutdown(wait=True)
        base.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_merged(plan: Plan, base: BaseWeights, adapter: Adapter, staging: Path, base_dir: Path, dtype: str,
                  max_shard_bytes: int, device: torch.device) -> MergeReport:
    from tqdm.auto import tqdm

    staging.mkdir(parents=True)
    planned: list[PlannedTensor] = []
    float_dtypes: dict[torch.dtype, int] = {}
    for recipe in plan.recipes:
        in_dtype = recipe.info.dtype
        out_dtype = DTYPES[dtype] if dtype != "auto" and in_dtype.is_floating_point else in_dtype
        out_info = TensorInfo(recipe.out_name, out_dtype, recipe.info.shape)
        if out_dtype.is_floating_point:
            float_dtypes[out_dtype] = float_dtypes.get(out_dtype, 0) + recipe.info.numel
        if not recipe.touched and out_dtype == in_dtype and base.raw_copyable(recipe.source):
            planned.append(PlannedTensor(out_info, lambda fd, name=recipe.source: base.copy_raw(name, fd), raw=True))
        else:
            planned.append(PlannedTensor(
                out_info, lambda r=recipe, d=out_dtype: compute_blocks(r, base, d, device)))
    shards = plan_shards(planned, max_shard_bytes)
    with tqdm(total=len(planned), unit="tensor", desc="merging", leave=False, disable=None) as progress:
        index = write_shards(staging, shards, progress)
    dtype_name = dtype if dtype != "auto" else str(max(float_dtypes, key=float_dtypes.get)).removeprefix("torch.")
    config = _write_config(base_dir, staging, plan, dtype_name)
    tokenizer_from = _copy_side_files(base_dir, adapter.folder, staging, config)
    variants = sorted({"dora" if t.magnitude is not None else "lora" for t in adapter.targets.values()}
                      | ({"rslora"} if adapter.config.get("use_rslora") else set())
                      | ({"lora_bias"} if any(t.bias is not None for t in adapter.targets.values()) else set())
                      | ({"fan_in_fan_out"} if any(t.kind == "conv1d" for t in adapter.targets.values()) else set())
                      | ({"trainable_tokens"} if adapter.trainable_tokens else set())
                      | ({"rank_pattern"} if adapter.config.get("rank_pattern") else set())
                      | ({"alpha_pattern"} if adapter.config.get("alpha_pattern") else set()))
    return MergeReport(
        output_dir="", base_model="", adapter_path="", dtype=dtype_name, lora_modules=len(adapter.targets),
        variants=variants, replaced_tensors=sorted(adapter.replacements), tensors=len(planned), shards=len(shards),
        total_size=index["metadata"]["total_size"], vocab_size=plan.vocab_size,
        tie_word_embeddings=config.get("tie_word_embeddings"), tokenizer_from=tokenizer_from, notes=plan.notes)


def _move_into_place(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.replaced-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _maybe_verify(verify, staging, base_dir, adapter_dir, base, plan, quant, qlora_merge_base, skeleton, report,
                  device, trust_remote_code) -> dict[str, Any]:
    if verify == "off":
        return {"status": "off"}
    import psutil

    params = sum(base.info(n).numel for n in base.names())
    need = 2 * 4 * params + (2 << 30)  # two float32 models plus working room
    available = psutil.virtual_memory().available
    if verify == "auto" and need > 0.8 * available:
        return {"status": "skipped", "reason": f"needs about {need / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} "
                                               "GiB available; pass --verify on to force it"}
    from functionalnetworkssft.merge_verify import verify_merge

    patches = {}
    if quant is not None and qlora_merge_base == "dequantized":
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
        for module in quant.modules:
            disk = _resolve(base, f"{module}.weight", prefix)
            patches[f"{module}.weight"] = quant.roundtrip(base.read(disk))
    lowest = report.dtype if report.dtype in ("bfloat16", "float16") else "float32"
    return verify_merge(staging, base_dir, adapter_dir, output_dtype=lowest, vocab_size=plan.vocab_size,
                        patches=patches, device=device, trust_remote_code=trust_remote_code)


def main(argv: list[str] | None, prog: str = "fnsft merge") -> None:
    config = parse(MergeConfig, argv, prog)
    report = merge_adapter(config.adapter_path, config.output_dir, base_model=config.base_model_name_or_path,
                           dtype=config.dtype, max_shard_size=config.max_shard_size, verify=config.verify,
                           device=config.device, qlora_merge_base=config.qlora_merge_base,
                           trust_remote_code=config.trust_remote_code)
    print(report.summary())
