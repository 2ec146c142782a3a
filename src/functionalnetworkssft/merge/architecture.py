"""What the merge needs to know about the base model's layers: each adapted module's kind (Linear, Conv1D,
Embedding), the shape of its weight and whether it has a bias, the input and output embeddings, and whether they
are tied.

transformers answers all of it by building the model on the meta device, but importing a model's code costs about
2.5 s of single-core start-up (measured on 2 cores: config 0.8 s, modeling code 1.0 s on top of transformers
itself), which is most of a `--verify off` merge of a 2 GB model. For the common case the files settle every
question: a plain causal LM whose config unties the embeddings, an adapter made only of LoRA factors on 2-D weights
stored under the adapter's own names, and modeling code that has no Conv1D (so every such weight is an nn.Linear,
or an nn.Embedding where PEFT saved lora_embedding_* factors). Anything else (tied or nested configs, remote code,
resized or replaced tensors, trainable tokens, a quantized training base, unfamiliar layouts) is asked of
transformers, as before; the two answers are compared in the tests on every layout they cover.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.merge.experts import Wrapped
from functionalnetworkssft.merge.layout import Layout


# The pieces of LoRA on a matrix (incl. DoRA and lora_bias); anything else needs the model's code to interpret.
MATRIX_PIECES = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A.weight",
                 "lora_embedding_B.weight", "lora_magnitude_vector.weight"}


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear", "conv1d", "embedding", or the class name of any other module
    shape: tuple[int, ...]  # the weight as the module stores it (Conv1D: in x out); () without a weight
    has_bias: bool


@dataclass
class Architecture:
    layers: dict[str, Layer]  # by module name as the model (and the adapter) spells it
    prefix: str  # transformers' base_model_prefix, for checkpoints saved without it ("" when names match as stored)
    input_embedding: str | None
    output_embedding: str | None
    tie_word_embeddings: bool | None
    vocab_size: int | None
    source: str  # "files" or "transformers", for the tests and the curious
    layout: Layout = field(default_factory=Layout)  # checkpoint names of renamed or fused parameters
    wrapped: dict[str, Wrapped] = field(default_factory=dict)  # the adapter's LoRA on parameters, by module


def architecture(base_dir: Path, raw_config: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                 pieces: dict[str, dict[str, Any]], adapter_config: dict[str, Any], *, replaces_tensors: bool,
                 quantized_training: bool, trust_remote_code: bool) -> Architecture:
    if not (replaces_tensors or quantized_training or adapter_config.get("target_parameters")):
        known = from_files(raw_config, tensor_shapes, pieces, adapter_config)
        if known is not None:
            return known
    return from_transformers(base_dir, trust_remote_code, tensor_shapes, adapter_config)


def from_files(raw_config: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
               pieces: dict[str, dict[str, Any]], adapter_config: dict[str, Any]) -> Architecture | None:
    """The architecture read from config.json, the checkpoint's tensor names and shapes and the adapter's pieces;
    None as soon as any of them leaves a question that only the model's code answers."""
    if raw_config.get("tie_word_embeddings") is not False or type(raw_config.get("vocab_size")) is not int:
        return None
    if raw_config.get("auto_map") or any(isinstance(v, dict) and "model_type" in v for v in raw_config.values()):
        return None  # remote code, or a composite model whose text part has its own config
    if adapter_config.get("fan_in_fan_out") or adapter_config.get("modules_to_save"):
        return None
    architectures = raw_config.get("architectures")
    model_type = raw_config.get("model_type")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)
            and isinstance(model_type, str) and re.fullmatch(r"[A-Za-z0-9_-]+", model_type)
            and _code_has_no_conv1d(model_type, architectures[0])):
        return None
    layers: dict[str, Layer] = {}
    for module, parts in pieces.items():
        shape = tensor_shapes.get(f"{module}.weight")
        if shape is None or len(shape) != 2 or set(parts) - MATRIX_PIECES \
                or any(parts[k].dim() != 2 for k in ("lora_A.weight", "lora_embedding_A.weight") if k in parts):
            return None  # stored under another name, not a matrix (convolutions), or trainable tokens
        kind = "embedding" if "lora_embedding_A.weight" in parts else "linear"
        layers[module] = Layer(kind, shape, f"{module}.bias" in tensor_shapes)
    return Architecture(layers, "", None, None, False, raw_config["vocab_size"], "files")


def _code_has_no_conv1d(model_type: str, architecture_name: str) -> bool:
    """True when transformers' own modeling file for model_type defines architecture_name and neither it nor the
    modeling files it imports from mention Conv1D. Read as text: importing it is the cost being avoided."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return False
    models = Path(spec.submodule_search_locations[0]) / "models"
    folder = model_type.replace("-", "_")
    first = models / folder / f"modeling_{folder}.py"
    seen: set[Path] = set()
    pending = [first]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return False
        if path == first and not re.search(rf"^class {re.escape(architecture_name)}\(", text, re.MULTILINE):
            return False
        if "Conv1D" in text:
            return False
        for package, module in re.findall(r"^from \.\.(\w+)\.(modeling_\w+) import", text, re.MULTILINE):
            pending.append(models / package / f"{module}.py")
    return True


def from_transformers(base_dir: Path, trust_remote_code: bool, tensor_shapes: dict[str, tuple[int, ...]] | None = None,
                      adapter_config: dict[str, Any] | None = None) -> Architecture:
    """The architecture of the model transformers builds from base_dir's config, on the meta device; with the
    checkpoint's tensors, where its parameters are stored, and with an adapter that targets parameters, what each of
    its ParamWrappers adapts."""
    import warnings

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from functionalnetworkssft.errors import MergeError, first_line

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"{base_dir}: cannot read the model's architecture ({first_line(exc)}); "
                         "add --trust_remote_code for models with custom code.") from None

    def layer(module: nn.Module) -> Layer:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        kind = ("embedding" if isinstance(module, nn.Embedding) else "conv1d" if isinstance(module, Conv1D)
                else "linear" if isinstance(module, nn.Linear) else type(module).__name__)
        return Layer(kind, tuple(weight.shape) if isinstance(weight, torch.Tensor) else (),
                     isinstance(bias, torch.Tensor))

    names = {id(m): n for n, m in model.named_modules()}
    in_layer, out_layer = model.get_input_embeddings(), model.get_output_embeddings()
    in_emb = names.get(id(in_layer)) if in_layer is not None else None
    out_emb = names.get(id(out_layer)) if out_layer is not None else None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tie = getattr(text, "tie_word_embeddings", None)
    arch = Architecture({n: layer(m) for n, m in model.named_modules()}, getattr(model, "base_model_prefix", "") or "",
                        in_emb, out_emb, tie, getattr(text, "vocab_size", None), "transformers")
    if tensor_shapes is not None:
        from functionalnetworkssft.merge.layout import checkpoint_layout

        arch.layout = checkpoint_layout(model, tensor_shapes)
    if adapter_config and adapter_config.get("target_parameters"):
        from functionalnetworkssft.merge.experts import wrapped_parameters

        arch.wrapped = wrapped_parameters(model, adapter_config)
    return arch


def declares_quantization(record_path: Path) -> bool:
    """Whether an fnsft_training.json says the adapter was trained on a quantized base (an unreadable record counts
    as yes, so that the full reader reports what is wrong with it)."""
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return True
    return not isinstance(record, dict) or record.get("quantization") not in (None, "none", False)
