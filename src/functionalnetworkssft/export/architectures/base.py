"""What every architecture's export shares: the hyperparameters llama.cpp reads for any model, the tensor plan (each
GGUF tensor with the checkpoint tensors it comes from and the change of layout between them, and back), and the
layout changes the families use.

What llama.cpp expects is what its own converter (convert_hf_to_gguf.py) writes; the tests compare the two on a tiny
model of every family. Each change of layout comes with its inverse, which reads the file back for verification.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from functionalnetworkssft.errors import FnsftError


class UnsupportedModel(FnsftError):
    """A model the GGUF exporter does not know how to write."""


Array = np.ndarray


@dataclass(frozen=True)
class Layout:
    """A change of a tensor's layout between the checkpoint and the file, and back."""

    forward: Callable[[Array], Array]
    inverse: Callable[[Array], Array]
    # The file's rows are the checkpoint's columns (GPT-2's Conv1D): quantization blocks then run along the other
    # axis, which the verification's rounding must follow.
    transposes: bool = False


IDENTITY = Layout(lambda a: a, lambda a: a)
TRANSPOSE = Layout(np.transpose, np.transpose, transposes=True)


def permute_rope(heads: int) -> Layout:
    """transformers' rotate-half q/k rows into llama.cpp's interleaved pairs, per head (Llama-family rope)."""
    def forward(a: Array) -> Array:
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    def inverse(a: Array) -> Array:
        return a.reshape(heads, a.shape[0] // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    return Layout(forward, inverse)


def shift(offset: float) -> Layout:
    """Gemma's norms compute x * (1 + w); llama.cpp's compute x * w, so the file holds w + 1."""
    return Layout(lambda a: a + np.float32(offset), lambda a: a - np.float32(offset))


def regroup(groups: int, order: tuple[int, ...]) -> Layout:
    """Rows in `groups` blocks, each of parts in `order` as stored (e.g. GPT-NeoX's per-head q, k, v), regrouped
    part by part: all first parts, then all second parts, ... (llama.cpp's q, k, v)."""
    parts = len(order)

    def forward(a: Array) -> Array:
        blocks = a.reshape(groups, parts, -1, *a.shape[1:])
        return np.concatenate([blocks[:, part].reshape(-1, *a.shape[1:]) for part in order]).reshape(a.shape)

    def inverse(a: Array) -> Array:
        pieces = np.split(a.reshape(-1, *a.shape[1:]), parts)
        restored = np.empty((groups, parts, a.shape[0] // groups // parts, *a.shape[1:]), dtype=a.dtype)
        for index, part in enumerate(order):
            restored[:, part] = pieces[index].reshape(groups, -1, *a.shape[1:])
        return restored.reshape(a.shape)

    return Layout(forward, inverse)


@dataclass
class ExportTensor:
    gguf_name: str
    sources: tuple[str, ...]  # checkpoint tensors; several are stacked on a new first axis (a layer's experts)
    shape: tuple[int, ...]  # as written
    layout: Layout = IDENTITY
    computed: Array | None = None  # a tensor the file needs that the checkpoint does not hold


@dataclass(frozen=True)
class Architecture:
    model_type: str
    gguf_arch: str  # general.architecture
    permute_qk: bool = False  # Llama-family rope
    norm_offset: float = 0.0  # Gemma
    # Extra hyperparameters after the common ones, the family's own tensor layouts, and what it cannot export.
    metadata: Callable[[Any, dict[str, Any]], None] | None = None
    layout_of: Callable[[str, tuple[int, ...], dict[str, Any]], Layout | None] | None = None
    problem: Callable[[dict[str, Any]], str | None] | None = None
    computed: Callable[[dict[str, Any]], list[ExportTensor]] | None = None


# Buffers some checkpoints carry that are not weights (causal masks, cached rotary frequencies).
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".attention.bias",
                    ".attention.masked_bias")
EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")


def first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def rope(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of the full-attention layers, from transformers 5's rope_parameters or older keys."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(parameters, dict):
        return {}
    parameters = parameters.get("full_attention", parameters)
    if "rope_theta" not in parameters and config.get("rope_theta") is not None:
        parameters = {**parameters, "rope_theta": config["rope_theta"]}
    return parameters


def rope_type(config: dict[str, Any]) -> str:
    parameters = rope(config)
    return parameters.get("rope_type", parameters.get("type", "default")) or "default"


def head_dim(config: dict[str, Any]) -> int:
    return first(config, "head_dim", default=config["hidden_size"] // config["num_attention_heads"])


class Metadata:
    """Collects the writer's add_* calls so that a family can replace a common value (a key written twice is an
    error in the file), then writes them in order."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[Any, ...]] = {}

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda *args: self.calls.__setitem__(name, args)

    def write(self, writer) -> None:
        for name, args in self.calls.items():
            getattr(writer, name)(*args)


def common_metadata(writer, config: dict[str, Any]) -> None:
    """The hyperparameters llama.cpp's converter writes for every model that has them (its TextModel)."""
    import gguf

    writer.add_block_count(first(config, "num_hidden_layers", "n_layer"))
    if (context := first(config, "max_position_embeddings", "n_ctx", "n_positions")) is not None:
        writer.add_context_length(context)
    if (width := first(config, "hidden_size", "n_embd")) is not None:
        writer.add_embedding_length(width)
    if (ff := first(config, "intermediate_size", "n_inner")) is not None:
        writer.add_feed_forward_length(ff)
    if (heads := first(config, "num_attention_heads", "n_head")) is not None:
        writer.add_head_count(heads)
    if (kv_heads := config.get("num_key_value_heads")) is not None:
        writer.add_head_count_kv(kv_heads)
    parameters, kind = rope(config), rope_type(config)
    if kind == "linear" and parameters.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
    elif kind == "yarn" and parameters.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
        writer.add_rope_scaling_orig_ctx_len(parameters["original_max_position_embeddings"])
    if parameters.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(parameters["rope_theta"]))
    local = (config.get("rope_parameters") or {}).get("sliding_attention") \
        if isinstance(config.get("rope_parameters"), dict) else None
    if isinstance(local, dict) and local.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if (eps := first(config, "rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if (eps := first(config, "layer_norm_eps", "layer_norm_epsilon")) is not None:
        writer.add_layer_norm_eps(float(eps))
    if (experts := first(config, "num_local_experts", "num_experts")) is not None:
        writer.add_expert_count(experts)
    if (used := first(config, "num_experts_per_tok")) is not None:
        writer.add_expert_used_count(used)
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def plan(arch: Architecture, config: dict[str, Any], names_and_shapes: list[tuple[str, tuple[int, ...]]]
         ) -> list[ExportTensor]:
    """Every tensor of the GGUF file, in order, with where it comes from and how it is laid out."""
    import gguf

    blocks = first(config, "num_hidden_layers", "n_layer")
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch),
                                        blocks)
    heads = first(config, "num_attention_heads", "n_head")
    kv_heads = first(config, "num_key_value_heads", default=heads)
    grouped: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    entries: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []
    for name, shape in names_and_shapes:
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        expert = EXPERT.match(name)
        if expert:
            key = f"{expert.group(1)}.{expert.group(3)}"
            if key not in grouped:
                entries.append((key, (), ()))
            grouped.setdefault(key, []).append((int(expert.group(2)), name, tuple(shape)))
        else:
            entries.append((name, (name,), tuple(shape)))
    out: list[ExportTensor] = []
    unmapped = []
    for name, sources, shape in entries:
        if name in grouped:
            members = sorted(grouped[name])
            if [index for index, _, _ in members] != list(range(len(members))) or \
                    len({s for _, _, s in members}) != 1:
                raise UnsupportedModel(f"GGUF export: the experts of {name} are not numbered 0..n-1 with one shape.")
            sources, shape = tuple(n for _, n, _ in members), (len(members), *members[0][2])
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unmapped.append(name)
            continue
        layout = arch.layout_of(name, shape, config) if arch.layout_of else None
        if layout is None:
            layout = IDENTITY
            if arch.permute_qk and ".q_proj." in name:
                layout = permute_rope(heads)
            elif arch.permute_qk and ".k_proj." in name:
                layout = permute_rope(kv_heads)
            elif arch.norm_offset and name.endswith("norm.weight"):
                layout = shift(arch.norm_offset)
        written = tuple(shape[::-1]) if layout.transposes and len(shape) == 2 else tuple(shape)
        out.append(ExportTensor(mapped, sources, written, layout))
    if unmapped:
        raise UnsupportedModel(f"GGUF export: no llama.cpp name for tensor(s) {', '.join(unmapped[:3])}"
                               f"{' ...' if len(unmapped) > 3 else ''}; this checkpoint's layout is not supported.")
    if arch.computed is not None:
        out += arch.computed(config)
    return out

