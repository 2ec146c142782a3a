"""Architectures the GGUF exporter knows: their GGUF name, hyperparameters and tensor layout.

    base      what every architecture shares: common hyperparameters, the tensor plan, layout changes
    families  each family's differences from the common case, and what llama.cpp cannot compute
"""

from __future__ import annotations

from typing import Any

from functionalnetworkssft.export.architectures.base import (Architecture, ExportTensor, Layout, Metadata,
                                                             UnsupportedModel, common_metadata, plan)
from functionalnetworkssft.export.architectures.families import ARCHITECTURES, llama3_rope_factors

__all__ = ["ARCHITECTURES", "Architecture", "ExportTensor", "Layout", "UnsupportedModel", "add_metadata",
           "architecture", "llama3_rope_factors", "plan"]


def architecture(config: dict[str, Any]) -> Architecture:
    """The architecture of a config.json, or UnsupportedModel saying why it cannot be exported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"GGUF export does not support model_type '{model_type}'; supported: "
                               f"{', '.join(sorted(ARCHITECTURES))}.")
    arch = ARCHITECTURES[model_type]
    try:
        problem = arch.problem(config) if arch.problem else None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise UnsupportedModel(f"GGUF export: config.json is missing or has a malformed hyperparameter ({exc}); "
                               f"it is not a complete {model_type} config.") from None
    if problem:
        raise UnsupportedModel(f"GGUF export of this {model_type} model: {problem}.")
    for key in ("num_hidden_layers", "n_layer"):
        if key in config and not (isinstance(config[key], int) and config[key] > 0):
            raise UnsupportedModel(f"GGUF export: config.json's {key} is {config[key]!r}, not a positive count.")
    if not any(isinstance(config.get(key), int) for key in ("num_hidden_layers", "n_layer")):
        raise UnsupportedModel(f"GGUF export: config.json has no layer count (num_hidden_layers); it is not a "
                               f"complete {model_type} config.")
    return arch


def add_metadata(writer, arch: Architecture, config: dict[str, Any]) -> None:
    """The hyperparameters llama.cpp reads for this architecture."""
    collected = Metadata()
    common_metadata(collected, config)
    if arch.metadata is not None:
        arch.metadata(collected, config)
    collected.write(writer)
