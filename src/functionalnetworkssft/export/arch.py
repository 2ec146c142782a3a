"""Architectures the exporter knows: their GGUF architecture name, metadata and tensor layout.

What llama.cpp expects is what its own converter writes (convert_hf_to_gguf.py): Llama-family q/k projections are
permuted from the rotate-half layout transformers uses into llama.cpp's interleaved one, GPT-2's Conv1D weights are
transposed into Linear layout, and a tied output embedding is left out (llama.cpp falls back to the input one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from functionalnetworkssft.errors import FnsftError


class UnsupportedModel(FnsftError):
    """A model the GGUF exporter does not know how to write."""


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # general.architecture
    permute_qk: bool  # Llama-family rope layout
    conv1d: bool  # GPT-2: weights stored transposed


ARCHITECTURES = {
    "llama": Architecture("llama", permute_qk=True, conv1d=False),
    "mistral": Architecture("llama", permute_qk=True, conv1d=False),
    "qwen2": Architecture("qwen2", permute_qk=False, conv1d=False),
    "gpt2": Architecture("gpt2", permute_qk=False, conv1d=True),
}

# Buffers some checkpoints carry that are not weights (causal masks, cached rotary frequencies).
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def architecture(config: dict[str, Any]) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"GGUF export does not support model_type '{model_type}'; supported: "
                               f"{', '.join(sorted(ARCHITECTURES))}.")
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type not in ("default", "linear", "llama3", None):
        raise UnsupportedModel(f"GGUF export does not support rope scaling '{rope_type}' (supported: none, linear, "
                               "llama3).")
    return ARCHITECTURES[model_type]


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def add_metadata(writer, arch: Architecture, config: dict[str, Any]) -> None:
    """The hyperparameters llama.cpp reads for this architecture."""
    if arch.gguf_arch == "gpt2":
        hidden = config["n_embd"]
        writer.add_block_count(config["n_layer"])
        writer.add_context_length(config.get("n_ctx") or config["n_positions"])
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(config.get("n_inner") or 4 * hidden)
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
        return
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(_first(config, "max_position_embeddings", default=2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(_first(config, "num_key_value_heads", default=heads))
    writer.add_layer_norm_rms_eps(_first(config, "rms_norm_eps", default=1e-6))
    writer.add_rope_freq_base(float(rope_theta(config)))
    head_dim = _first(config, "head_dim", default=hidden // heads)
    if config.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    scaling = config.get("rope_scaling") or {}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def rope_theta(config: dict[str, Any]) -> float:
    parameters = config.get("rope_parameters") or {}
    return _first(config, "rope_theta", default=parameters.get("rope_theta", 10000.0))


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama-3.1's frequency scaling, which llama.cpp reads from a `rope_freqs.weight` tensor."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    base = rope_theta(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factors = []
    for freq in freqs:
        wavelength = 2 * np.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half q/k rows into llama.cpp's interleaved pairs (per head)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@dataclass
class ExportTensor:
    gguf_name: str
    source: str | None  # the checkpoint tensor, or None for one computed here
    shape: tuple[int, ...]  # after the transform
    transform: Callable[[np.ndarray], np.ndarray]
    computed: np.ndarray | None = None


def tensors(arch: Architecture, config: dict[str, Any], names_and_shapes: list[tuple[str, tuple[int, ...]]]
            ) -> list[ExportTensor]:
    """Every tensor of the GGUF file, in order, with where it comes from and how it is transformed."""
    import gguf

    blocks = config.get("n_layer") if arch.gguf_arch == "gpt2" else config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch.upper()), blocks)
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    out: list[ExportTensor] = []
    unmapped = []
    for name, shape in names_and_shapes:
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unmapped.append(name)
            continue
        transform: Callable[[np.ndarray], np.ndarray] = _identity
        if arch.permute_qk and ".q_proj." in name:
            transform = _bind_permute(heads)
        elif arch.permute_qk and ".k_proj." in name:
            transform = _bind_permute(kv_heads)
        elif arch.conv1d and name.endswith(".weight") and len(shape) == 2 and any(
                part in name for part in (".c_attn.", ".c_proj.", ".c_fc.")):
            transform, shape = np.transpose, (shape[1], shape[0])
        out.append(ExportTensor(mapped, name, tuple(shape), transform))
    if unmapped:
        raise UnsupportedModel(f"GGUF export: no llama.cpp name for tensor(s) {', '.join(unmapped[:3])}"
                               f"{' ...' if len(unmapped) > 3 else ''}; this checkpoint's layout is not supported.")
    factors = llama3_rope_factors(config) if arch.gguf_arch == "llama" else None
    if factors is not None:
        out.append(ExportTensor("rope_freqs.weight", None, factors.shape, _identity, factors))
    return out


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _bind_permute(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda array: _permute(array, heads)
