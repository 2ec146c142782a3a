"""Write a GGUF file a tensor at a time.

The header and tensor table are written first from shapes alone (the size of each tensor in its output type is
known before its data is read); then each tensor is read from the checkpoint, transformed, converted and appended.
Memory holds one tensor (and its converted copy), whatever the model's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from functionalnetworkssft.export import architectures as archs
from functionalnetworkssft.export.vocab import add_tokenizer

# Output type -> (GGML type of the large matrices, general.file_type).
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
# The k-quants, by llama.cpp's file type (llama_ftype). The gguf package (0.19) can read them but not write them, so
# they are made by llama.cpp's own quantizer from an f16 file, with llama.cpp's rules for which tensor gets which
# type (Q4_K_M keeps some layers' attention-value and feed-forward-down projections and the output at Q6_K).
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


@dataclass
class Written:
    path: Path
    tensors: int
    bytes: int
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    fallbacks: list[str] = field(default_factory=list)  # tensors kept in F16: rows not a multiple of the block
    tokenizer: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None  # the source's model_type


OUTPUT, TIED_OUTPUT = "output.weight", "token_embd.weight"


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, tied: bool = False):
    """The GGML type of one tensor, as llama.cpp's converter chooses it: vectors, norms, biases and position
    embeddings stay F32; a matrix whose rows don't fill whole quantization blocks falls back to F16."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith(("_norm.weight", ".ffn_gate_inp.weight")) or not name.endswith(".weight") \
            or name.startswith("position_embd"):
        return kinds.F32
    wanted = getattr(kinds, OUTTYPES[outtype][0])
    if wanted == kinds.Q4_0 and name in (OUTPUT, TIED_OUTPUT if tied else OUTPUT):
        # The output projection is where 4-bit error hurts most; llama.cpp's own 4-bit presets keep it at higher
        # precision too (there Q6_K, which gguf-py cannot write; Q8_0 here).
        wanted = kinds.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return kinds.F16
    return wanted


def write_gguf(model_dir: Path, outfile: Path, outtype: str, name: str, progress=None) -> Written:
    """Write the GGUF to `outfile` (the caller's staging name) and flush it to disk."""
    import gguf

    from functionalnetworkssft.merge.io import BaseWeights

    config = read_config(model_dir)
    arch = archs.architecture(config)
    weights = BaseWeights(model_dir)
    try:
        plan = archs.plan(arch, config, [(n, weights.info(n).shape) for n in weights.names()])
        writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        try:
            archs.add_metadata(writer, arch, config)
        except (KeyError, TypeError) as exc:
            raise archs.UnsupportedModel(f"{model_dir / 'config.json'}: missing or malformed hyperparameter "
                                         f"{exc}; it is not a complete {config.get('model_type')} config.") from None
        writer.add_file_type(OUTTYPES[outtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer = add_tokenizer(writer, model_dir, config.get("vocab_size") or 0)
        written = Written(outfile, len(plan), 0, tokenizer=tokenizer, architecture=config.get("model_type"))
        tied = not any(tensor.gguf_name == OUTPUT for tensor in plan)  # the input embedding is the output too
        types = []
        for tensor in plan:
            kind = tensor_type(tensor.gguf_name, tensor.shape, outtype, tied)
            if kind == gguf.GGMLQuantizationType.F16 and OUTTYPES[outtype][0] not in ("F16", "F32") and \
                    len(tensor.shape) > 1 and tensor.gguf_name.endswith(".weight"):
                written.fallbacks.append(tensor.gguf_name)
            types.append(kind)
            byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, kind) if kind not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else tensor.shape
            item = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(kind, 1)
            nbytes = int(np.prod(byte_shape)) * item
            dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
                kind, np.uint8)
            writer.add_tensor_info(tensor.gguf_name, byte_shape, np.dtype(dtype), nbytes,
                                   raw_dtype=None if dtype is not np.uint8 else kind)
            written.types[kind.name] = written.types.get(kind.name, 0) + 1
        try:
            writer.write_header_to_file(outfile)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor, kind in zip(plan, types):
                try:
                    array = np.ascontiguousarray(tensor.layout.forward(read_sources(tensor, weights)),
                                                 dtype=np.float32)
                except ValueError as exc:  # a layout from config.json's head counts that the tensor cannot have
                    raise archs.UnsupportedModel(
                        f"{model_dir / 'config.json'}: missing or malformed hyperparameter: {tensor.sources[0]} of "
                        f"shape {tuple(tensor.shape)} does not fit it ({exc}).") from None
                writer.write_tensor_data(gguf.quants.quantize(array, kind) if kind != gguf.GGMLQuantizationType.F32
                                         else array)
                if progress is not None:
                    progress.update(1)
            for handle in writer.fout or []:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            writer.close()
        written.bytes = outfile.stat().st_size
        return written
    finally:
        weights.close()


def read_sources(tensor: archs.ExportTensor, weights) -> np.ndarray:
    """The tensor's checkpoint data in float32, as the file's layout change expects it (experts stacked)."""
    if tensor.computed is not None:
        return tensor.computed
    if len(tensor.sources) == 1:
        return weights.read(tensor.sources[0]).float().numpy()
    return np.stack([weights.read(source).float().numpy() for source in tensor.sources])


def read_config(model_dir: Path) -> dict[str, Any]:
    import json

    from functionalnetworkssft.errors import FnsftError

    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FnsftError(f"{model_dir}: no config.json; point at a transformers model folder (merged_model/ or "
                         "final_model/ of a full fine-tune).") from None
    except (OSError, ValueError) as exc:
        raise FnsftError(f"{path}: unreadable ({exc}).") from None
    if not isinstance(config, dict):
        raise FnsftError(f"{path}: expected a JSON object.")
    return {**config, **_normalised(model_dir, config)}


def _normalised(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The config as transformers reads it: older spellings (Pythia's rotary_pct and rotary_emb_base) in their
    current form and the defaults a config.json may leave out (Falcon-7B's context length). A config transformers
    cannot read (remote code, an unknown model type) is used as it is."""
    if config.get("auto_map"):
        return {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).to_dict()
    except Exception:  # the architecture check names what is wrong with such a config
        return {}
