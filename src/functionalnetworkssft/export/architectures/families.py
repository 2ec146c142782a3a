"""The families the exporter writes, and how each differs from the common case (base.py): extra hyperparameters,
its own tensor layouts, and the settings llama.cpp cannot compute, which are refused rather than exported wrong."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from functionalnetworkssft.export.architectures.base import (TRANSPOSE, Architecture, ExportTensor, Layout,
                                                             first, head_dim, regroup, rope, rope_type)


def _llama(writer, config: dict[str, Any]) -> None:
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def _granite(writer, config: dict[str, Any]) -> None:
    _llama(writer, config)
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama-3.1's frequency scaling, which llama.cpp reads from a `rope_freqs.weight` tensor."""
    scaling = rope(config)
    if rope_type(config) != "llama3":
        return None
    dim = head_dim(config)
    base = float(scaling.get("rope_theta", 10000.0))
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


def _rope_freqs(config: dict[str, Any]) -> list[ExportTensor]:
    factors = llama3_rope_factors(config)
    return [] if factors is None else [ExportTensor("rope_freqs.weight", (), factors.shape, computed=factors)]


def _smollm3_problem(config: dict[str, Any]) -> str | None:
    # llama.cpp's SmolLM3 leaves out rope in every 4th layer, whatever the config says.
    layers = config["num_hidden_layers"]
    expected = [int((i + 1) % 4 != 0) for i in range(layers)]
    if config.get("no_rope_layers") not in (None, expected):
        return "its no_rope_layers differ from the every-4th-layer pattern llama.cpp implements"
    return None


def _gemma2(writer, config: dict[str, Any]) -> None:
    if config.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window") is not None:
        writer.add_sliding_window(config["sliding_window"])


def _sliding_problem(every: int, large_layers: int):
    """Gemma-2 alternates sliding and global layers, Gemma-3 has one global layer in 6: llama.cpp assumes it. It also
    scales attention by 1/sqrt(head_dim), except for the 27B models (by their layer count), which it scales by the
    hidden size per head: a query_pre_attn_scalar that is neither is refused."""
    def problem(config: dict[str, Any]) -> str | None:
        scalar = config.get("query_pre_attn_scalar")
        size = head_dim(config)
        if scalar is not None and scalar != size and not (
                config["num_hidden_layers"] == large_layers
                and scalar == config["hidden_size"] // config["num_attention_heads"]):
            return (f"its attention scale (query_pre_attn_scalar {scalar}) is not its head size ({size}), which is "
                    "what llama.cpp scales by")
        types = config.get("layer_types")
        expected = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                    for i in range(config["num_hidden_layers"])]
        if types is not None and types != expected:
            return f"its layer_types differ from the one-global-layer-in-{every} pattern llama.cpp implements"
        parameters = config.get("rope_parameters")
        scaling = (parameters.get("sliding_attention") or {}) if isinstance(parameters, dict) else {}
        if isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default":
            return "its sliding layers use rope scaling, which llama.cpp does not read"
        return None
    return problem


def _gemma3(writer, config: dict[str, Any]) -> None:
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window") is not None:
        writer.add_sliding_window(config["sliding_window"])


def _rope_dims(config: dict[str, Any]) -> int:
    return int(rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
               * config["hidden_size"]) // config["num_attention_heads"]


def _phi3(writer, config: dict[str, Any]) -> None:
    writer.add_rope_scaling_orig_ctx_len(first(config, "original_max_position_embeddings",
                                               default=config["max_position_embeddings"]))
    writer.add_rope_dimension_count(_rope_dims(config))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    long_factors = rope(config).get("long_factor")
    if long_factors:
        scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
        original = config["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _phi3_factors(config: dict[str, Any]) -> list[ExportTensor]:
    parameters = rope(config)
    if not parameters.get("long_factor"):
        return []
    return [ExportTensor(name, (), (len(parameters[key]),), computed=np.asarray(parameters[key], dtype=np.float32))
            for name, key in (("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight",
                                                                             "short_factor"))]


def _phi3_problem(config: dict[str, Any]) -> str | None:
    if rope_type(config) not in ("default", "longrope", "su"):
        return f"its rope scaling '{rope_type(config)}' is not one llama.cpp's Phi-3 reads (longrope)"
    return None


def _gpt2(writer, config: dict[str, Any]) -> None:
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])


def _gpt2_layout(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> Layout | None:
    # GPT-2's Conv1D stores weights (in, out): llama.cpp reads (out, in).
    if name.endswith(".weight") and len(shape) == 2 and any(p in name for p in (".c_attn.", ".c_proj.", ".c_fc.")):
        return TRANSPOSE
    return None


def _gpt_neox(writer, config: dict[str, Any]) -> None:
    writer.add_rope_dimension_count(_rope_dims(config))
    writer.add_parallel_residual(bool(config.get("use_parallel_residual", True)))


def _gpt_neox_layout(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> Layout | None:
    # GPT-NeoX stores q, k, v per head; llama.cpp reads all q, then all k, then all v.
    if ".attention.query_key_value." in name:
        return regroup(config["num_attention_heads"], (0, 1, 2))
    return None


def _falcon_kv_heads(config: dict[str, Any]) -> int:
    # As transformers computes it: only the new decoder architecture reads num_kv_heads.
    if config.get("new_decoder_architecture"):
        return config.get("num_kv_heads") or config["num_attention_heads"]
    return 1 if config.get("multi_query", True) else config["num_attention_heads"]


def _falcon(writer, config: dict[str, Any]) -> None:
    writer.add_head_count_kv(_falcon_kv_heads(config))
    writer.add_tensor_data_layout("jploski")
    writer.add_feed_forward_length(config.get("ffn_hidden_size") or 4 * config["hidden_size"])


def _falcon_layout(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> Layout | None:
    # Stored in kv groups of (heads per group) queries, one key and one value; llama.cpp reads all queries, then the
    # keys, then the values ("jploski" layout).
    if ".query_key_value." not in name:
        return None
    kv_heads, heads = _falcon_kv_heads(config), config["num_attention_heads"]
    if not config.get("new_decoder_architecture") and kv_heads == heads:
        return regroup(heads, (0, 1, 2))  # per head q, k, v like GPT-NeoX
    per_group = heads // kv_heads + 2
    return _kv_groups(kv_heads, per_group)


def _kv_groups(groups: int, per_group: int) -> Layout:
    def forward(a: np.ndarray) -> np.ndarray:
        blocks = a.reshape(groups, per_group, -1, *a.shape[1:])
        return np.concatenate([blocks[:, :-2].reshape(-1, *a.shape[1:]), blocks[:, -2].reshape(-1, *a.shape[1:]),
                               blocks[:, -1].reshape(-1, *a.shape[1:])]).reshape(a.shape)

    def inverse(a: np.ndarray) -> np.ndarray:
        row = a.shape[0] // groups // per_group
        queries = groups * (per_group - 2) * row
        restored = np.empty((groups, per_group, row, *a.shape[1:]), dtype=a.dtype)
        restored[:, :-2] = a[:queries].reshape(groups, per_group - 2, row, *a.shape[1:])
        restored[:, -2] = a[queries:queries + groups * row].reshape(groups, row, *a.shape[1:])
        restored[:, -1] = a[queries + groups * row:].reshape(groups, row, *a.shape[1:])
        return restored.reshape(a.shape)

    return Layout(forward, inverse)


def _falcon_problem(config: dict[str, Any]) -> str | None:
    if config.get("alibi"):
        return "it uses ALiBi positions, which llama.cpp's Falcon does not"
    if config.get("bias"):
        return "its linear layers have biases, which llama.cpp's Falcon has no place for"
    if config.get("parallel_attn") is False:
        return "its attention and MLP run one after the other (parallel_attn false); llama.cpp's Falcon runs them " \
               "side by side"
    return None


def _qwen3_moe(writer, config: dict[str, Any]) -> None:
    if config.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


def _qwen_moe_problem(config: dict[str, Any]) -> str | None:
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        return "some of its layers are dense (mlp_only_layers, decoder_sparse_step), which llama.cpp's Qwen3-MoE " \
               "does not read"
    if config.get("norm_topk_prob") is False:
        return "it does not renormalise its top-k expert weights (norm_topk_prob false); llama.cpp always does"
    return None


def _sliding_llama_problem(config: dict[str, Any]) -> str | None:
    if config.get("sliding_window") and config.get("use_sliding_window", True) and \
            config.get("model_type") in ("mistral", "mixtral") and \
            config["sliding_window"] < config.get("max_position_embeddings", 0):
        return "it attends through a sliding window shorter than its context, which llama.cpp's llama does not"
    return None


def _all(*problems):
    def problem(config: dict[str, Any]) -> str | None:
        return next((found for check in problems if (found := check(config))), None)
    return problem


def _rope_problem(config: dict[str, Any]) -> str | None:
    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            return f"its {key} is {config[key]!r}, not a mapping"
    kind = rope_type(config)
    if kind not in ("default", "linear", "llama3", "yarn"):
        return f"its rope scaling '{kind}' is not supported (supported: none, linear, llama3, yarn)"
    return None


LLAMA_LIKE = dict(permute_qk=True, metadata=_llama, computed=_rope_freqs)
ARCHITECTURES = {arch.model_type: arch for arch in [
    Architecture("llama", "llama", **LLAMA_LIKE, problem=_rope_problem),
    Architecture("mistral", "llama", **LLAMA_LIKE, problem=_all(_rope_problem, _sliding_llama_problem)),
    Architecture("mixtral", "llama", **LLAMA_LIKE, problem=_all(_rope_problem, _sliding_llama_problem)),
    Architecture("granite", "granite", permute_qk=True, metadata=_granite, computed=_rope_freqs,
                 problem=_rope_problem),
    Architecture("smollm3", "smollm3", **LLAMA_LIKE, problem=_all(_rope_problem, _smollm3_problem)),
    Architecture("qwen2", "qwen2", problem=_rope_problem),
    Architecture("qwen3", "qwen3", problem=_rope_problem),
    Architecture("qwen3_moe", "qwen3moe", metadata=_qwen3_moe, problem=_all(_rope_problem, _qwen_moe_problem)),
    Architecture("gemma2", "gemma2", norm_offset=1.0, metadata=_gemma2, problem=_all(_rope_problem,
                                                                                       _sliding_problem(2, 46))),
    Architecture("gemma3_text", "gemma3", norm_offset=1.0, metadata=_gemma3, problem=_all(_rope_problem,
                                                                                            _sliding_problem(6, 62))),
    Architecture("phi3", "phi3", metadata=_phi3, computed=_phi3_factors, problem=_phi3_problem),
    Architecture("olmo2", "olmo2", problem=_rope_problem),
    Architecture("gpt2", "gpt2", metadata=_gpt2, layout_of=_gpt2_layout),
    Architecture("gpt_neox", "gptneox", metadata=_gpt_neox, layout_of=_gpt_neox_layout, problem=_rope_problem),
    Architecture("falcon", "falcon", metadata=_falcon, layout_of=_falcon_layout, problem=_falcon_problem),
]}
