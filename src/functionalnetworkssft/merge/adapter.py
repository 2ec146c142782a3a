"""A PEFT LoRA adapter as the merge reads it: the modules it changes, with their factors and scaling, and the whole
tensors it replaces. Options and layers this engine does not implement are refused by name, never dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft.errors import MergeError, UsageError
from functionalnetworkssft.merge.architecture import Architecture
from functionalnetworkssft.weights import DamagedFile, adapter_weights_file, load_tensors
from functionalnetworkssft.weights import read_adapter_config as read_valid_adapter_config

ADAPTER_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# init_lora_weights values that only choose A and B; all others (pissa, olora, corda, loftq, ...) rewrite the base
# weights when the adapter is created, so the adapter is meaningless on the untouched base.
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# LoraConfig options that select a LoRA variant this engine does not implement.
UNSUPPORTED_OPTIONS = ("alora_invocation_tokens", "arrow_config", "velora_config",
                       "monteclora_config", "use_bdlora", "kasa_config", "layer_replication", "use_qalora",
                       "megatron_config", "mica")


@dataclass
class LoraTarget:
    """One LoRA-adapted module, with its factors as stored and the layout of the weight it changes."""

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

    @property
    def untouched(self) -> torch.Tensor | None:
        """Output features the adapter leaves exactly as they are (all-zero B rows, no bias): what a
        functional-network mask holds. None when there are none, or when DoRA rescales every feature anyway."""
        if self.magnitude is not None or self.kind == "embedding":
            return None
        zero = (self.B == 0).all(dim=1)
        if self.bias is not None:
            zero &= self.bias == 0
        return zero if bool(zero.any()) else None

    def add_delta_rows(self, block: torch.Tensor, start: int, stop: int) -> None:
        """block += scaling * (B @ A)[rows start:stop], in one fused multiply-add with no delta tensor."""
        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.to(block.device, torch.float32)

        if self.out_major:
            block.addmm_(f32(self.B[start:stop]), f32(self.A), alpha=self.scaling)
        else:
            block.addmm_(f32(self.A[:, start:stop]).T, f32(self.B).T, alpha=self.scaling)


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    # module name -> {"lora_A.weight": tensor, ...} as read, until resolve_targets interprets them
    pieces: dict[str, dict[str, torch.Tensor]]
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
    """A valid adapter_config.json (weights.read_adapter_config) of a LoRA variant this engine merges."""
    config = read_valid_adapter_config(folder)
    path = folder / "adapter_config.json"
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
    path = adapter_weights_file(folder)
    try:
        return load_tensors(path), path
    except DamagedFile as exc:
        raise MergeError(f"{path}: {exc}.") from None


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


def read_adapter(folder: Path, config: dict[str, Any]) -> Adapter:
    """The adapter's tensors sorted into whole-tensor replacements and per-module LoRA pieces; what the pieces mean
    depends on the base's layers (resolve_targets)."""
    tensors, path = _load_adapter_tensors(folder)
    adapter = Adapter(folder, config, {}, files=[folder / "adapter_config.json", path])
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
            adapter.pieces.setdefault(module, {})[f"{part}.{param}"] = tensor
    return adapter


def resolve_targets(adapter: Adapter, arch: Architecture) -> None:
    """Turn each module's pieces into a LoraTarget (or trainable token rows) with the layout of its base layer; LoRA
    on a parameter becomes LoRA on each checkpoint tensor that parameter is built from."""
    from functionalnetworkssft.merge.experts import expert_targets

    folder, config, layers = adapter.folder, adapter.config, arch.layers
    for module, parts in adapter.pieces.items():
        if module in arch.wrapped:
            wrapped = arch.wrapped[module]
            for disk, A, B in expert_targets(module, wrapped, parts, arch.layout, folder):
                if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                    raise MergeError(f"{folder}: the LoRA factors of {module} hold NaN or infinite values; the "
                                     "training that produced this adapter diverged, so there is nothing sound to "
                                     "merge.")
                # Keyed by the checkpoint tensor, which the plan finds as it is (a module name + ".weight").
                adapter.targets[disk.removesuffix(".weight")] = LoraTarget(disk.removesuffix(".weight"), "linear", A,
                                                                           B, wrapped.scaling)
            continue
        if module not in layers:
            raise MergeError(f"{folder}: the adapter changes module {module}, which the base model does not have; "
                             "is --base_model_name_or_path the model this adapter was trained on?")
        layer = layers[module]
        parts = dict(parts)
        if "trainable_tokens_delta.weight" in parts:
            adapter.trainable_tokens[module] = (_token_indices(config, module), parts.pop("trainable_tokens_delta.weight"))
            if not parts:
                continue
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if layer.kind == "embedding":
            kind, a_key, b_key = "embedding", "lora_embedding_A.weight", "lora_embedding_B.weight"
            expected_a, expected_b = (r, layer.shape[0]), (layer.shape[1], r)
        elif layer.kind in ("linear", "conv1d"):
            kind, a_key, b_key = layer.kind, "lora_A.weight", "lora_B.weight"
            out_f, in_f = (layer.shape[1], layer.shape[0]) if kind == "conv1d" else layer.shape
            expected_a, expected_b = (r, in_f), (out_f, r)
        else:
            raise UsageError(f"{folder}: LoRA on {module} ({layer.kind}) is not supported by fnsft merge "
                             "(it merges Linear, Conv1D and Embedding layers); merge with PEFT's merge_and_unload().")
        if a_key not in parts or b_key not in parts:
            raise MergeError(f"{folder}: module {module} has {sorted(parts)} but lacks {a_key} or {b_key}; "
                             "the adapter file is incomplete.")
        # Kept as stored (converting to float32 is exact, and done a row block at a time by add_delta_rows).
        A, B = parts.pop(a_key), parts.pop(b_key)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise MergeError(f"{folder}: the LoRA factors of {module} hold NaN or infinite values; the training that "
                             "produced this adapter diverged, so there is nothing sound to merge.")
        if tuple(A.shape) != expected_a or tuple(B.shape) != expected_b:
            raise MergeError(f"{folder}: {module} has LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} but the base "
                             f"layer needs A{expected_a} B{expected_b} (rank from adapter_config.json: r={r}); the "
                             "adapter does not belong to this base model or its config does not match its weights.")
        target = LoraTarget(module, kind, A, B, scaling)
        if "lora_magnitude_vector.weight" in parts:
            target.magnitude = parts.pop("lora_magnitude_vector.weight").float()
        if "lora_B.bias" in parts:
            target.bias = parts.pop("lora_B.bias").float() * scaling
            if not layer.has_bias:
                raise MergeError(f"{folder}: {module} has lora_bias but the base layer has no bias; PEFT cannot "
                                 "merge it either.")
        if parts:
            raise UsageError(f"{folder}: module {module} has adapter tensors {sorted(parts)} that fnsft merge does "
                             "not implement; merge with PEFT's merge_and_unload().")
        adapter.targets[module] = target
    adapter.pieces = {}  # the targets hold what is needed; the raw file contents are not kept twice


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

