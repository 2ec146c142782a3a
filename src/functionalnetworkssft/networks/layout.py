"""Where a causal LM keeps its decoder layers and their MLP blocks, and which rows of which weight write each MLP
output channel. Llama-style models (Llama, Qwen, Mistral, SmolLM2: `model.layers[i].mlp.down_proj`, an nn.Linear
whose weight rows are output channels) and GPT-2 style (`transformer.h[i].mlp.c_proj`, a Conv1D whose weight
columns are output channels) are supported; anything else is one line naming what was looked for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from functionalnetworkssft.errors import UsageError

# (path to the list of decoder layers, name of the MLP's output projection inside the block's `mlp`)
LAYOUTS = (("model.layers", "down_proj"), ("transformer.h", "c_proj"))
LOOKED_FOR = "model.layers[i].mlp.down_proj (Llama, Qwen, Mistral) or transformer.h[i].mlp.c_proj (GPT-2)"


@dataclass(frozen=True)
class Block:
    index: int
    mlp: Any  # the block's MLP module: its output is the hidden-size channels ICA looks at
    projection_name: str  # "down_proj" or "c_proj"

    @property
    def projection(self):
        return getattr(self.mlp, self.projection_name)


def decoder_blocks(model) -> list[Block]:
    """The MLP of every decoder layer, in order. `model` may be a PEFT model or a bare transformers model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path, projection in LAYOUTS:
        layers = base
        for part in path.split("."):
            layers = getattr(layers, part, None)
        if layers is not None and len(layers) and all(hasattr(getattr(layer, "mlp", None), projection)
                                                      for layer in layers):
            return [Block(i, layer.mlp, projection) for i, layer in enumerate(layers)]
    raise UsageError(f"{type(base).__name__}: no decoder MLPs found; functional networks look for {LOOKED_FOR}.")


def hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))


def parse_layers(spec: str | None, count: int, flag: str) -> list[int]:
    """'0:4,9:' -> [0, 1, 2, 3, 9, ..., count-1]; single indices and negative ones (-1 is the last) work too."""
    if spec is None or not spec.strip():
        return list(range(count))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(-?\d*)(:?)(-?\d*)", part)
        if not part or not match or (not match.group(2) and not match.group(1)):
            raise UsageError(f"{flag} {spec!r}: '{part}' is not a layer index or START:END range (e.g. 0:4,9:).")
        start, colon, stop = match.groups()
        if colon:
            indices = range(count)[slice(int(start) if start else None, int(stop) if stop else None)]
        else:
            index = int(start)
            if not -count <= index < count:
                raise UsageError(f"{flag} {spec!r}: layer {index} does not exist; the model has {count} layers.")
            indices = [index % count]
        chosen.update(indices)
    if not chosen:
        raise UsageError(f"{flag} {spec!r} selects no layer of the model's {count}.")
    return sorted(chosen)
