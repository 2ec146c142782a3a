"""QLoRA: what a faithful merge must know about the quantized base an adapter was trained on, and how to replay
the quantization round trip of exactly those layers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from functionalnetworkssft.errors import MergeError
from functionalnetworkssft.merge.adapter import ADAPTER_PREFIX
from functionalnetworkssft.merge.architecture import Layer
from functionalnetworkssft.records import TRAINING_RECORD


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


def read_training_record(folder: Path, layers: dict[str, Layer], output_embedding: str | None) -> QuantSpec | None:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}).") from None
    if not isinstance(record, dict):
        raise MergeError(f"{path}: expected a JSON object, got a {type(record).__name__}.")
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
        listed = [n for n, layer in layers.items() if layer.kind == "linear" and n != output_embedding]
    unknown = [m for m in listed if m not in layers]
    if unknown:
        raise MergeError(f"{path}: quantized module {unknown[0]} does not exist in the base model.")
    double_quant = record.get("bnb_4bit_use_double_quant")
    return QuantSpec(quantization, list(listed), str(record.get("bnb_4bit_quant_type") or "nf4"),
                     True if double_quant is None else bool(double_quant), int(record.get("bnb_4bit_blocksize") or 64),
                     inferred)

