"""Template files: the functional networks of one model, in the format earlier tools read and write.

    {"name": ..., "layout": {"captured_layers_sorted": [0, 1, ...], "hidden_size": 576},
     "templates": {"0": {"29": [12, 407, ...], ...}, ...},   # component id -> layer index -> channels
     "provenance": {"model": ..., "datasets": [...], "parameters": {...}, "seed": 0, "fnsft_version": ...}}

Written with sorted keys and no timestamps, so the same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import UsageError

MAX_TEMPLATE_BYTES = 64 << 20


@dataclass
class Templates:
    name: str
    layers: list[int]  # the layers whose channels were captured, sorted
    hidden_size: int
    components: dict[int, dict[int, list[int]]]  # component id -> layer -> sorted channels
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        text = json.dumps({
            "name": self.name,
            "layout": {"captured_layers_sorted": sorted(self.layers), "hidden_size": self.hidden_size},
            "templates": {str(c): {str(layer): sorted(chs) for layer, chs in sorted(layers.items()) if chs}
                          for c, layers in sorted(self.components.items())},
            "provenance": self.provenance,
        }, indent=1, sort_keys=True)
        # Channel lists on one line each: a template of a large model stays readable and diffable.
        return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]",
                      lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"

    def write(self, path: Path) -> None:
        from functionalnetworkssft.outputs import write_text_atomic

        write_text_atomic(path, self.to_json())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def problems_for(self, layer_count: int, hidden_size: int, source: str) -> list[str]:
        """Why these templates cannot belong to a model with this many layers and this hidden size."""
        found = []
        if self.hidden_size != hidden_size:
            found.append(f"{source} was made for hidden size {self.hidden_size}, but the model has {hidden_size}; it "
                         "belongs to another model.")
        if self.layers and max(self.layers) >= layer_count:
            found.append(f"{source} captured layer {max(self.layers)}, but the model has {layer_count} layers; it "
                         "belongs to another model.")
        return found

    def network(self, component_ids: list[int] | None, layers: list[int], source: str) -> dict[int, list[int]]:
        """The union of the chosen components' channels per layer, limited to `layers` (all components if None)."""
        ids = sorted(self.components) if component_ids is None else component_ids
        unknown = [c for c in ids if c not in self.components]
        if unknown:
            raise UsageError(f"--ica_component_ids: {', '.join(map(str, unknown))} not in {source}, which has "
                             f"components {', '.join(map(str, sorted(self.components)))}.")
        union: dict[int, set[int]] = {}
        for component in ids:
            for layer, channels in self.components[component].items():
                if layer in layers:
                    union.setdefault(layer, set()).update(channels)
        return {layer: sorted(channels) for layer, channels in sorted(union.items()) if channels}


def read_templates(path: str | Path, flag: str = "--ica_template_path") -> Templates:
    """A template file, checked field by field; any problem is one line naming the file and the key."""
    path = Path(path)
    where = f"{flag} {path}"
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise UsageError(f"{where}: larger than {MAX_TEMPLATE_BYTES >> 20} MiB; not a template file.")
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file.") from None
    except IsADirectoryError:
        raise UsageError(f"{where} is a folder; give a template JSON file.") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"{where}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
                         ) from None

    def bad(what: str) -> UsageError:
        return UsageError(f"{where}: {what}; write it with `fnsft templates`.")

    if not isinstance(loaded, dict):
        raise bad("expected a JSON object")
    layout = loaded.get("layout")
    if not isinstance(layout, dict):
        raise bad("no 'layout' object")
    layers, hidden = layout.get("captured_layers_sorted"), layout.get("hidden_size")
    if not isinstance(layers, list) or not all(_index(x) is not None for x in layers):
        raise bad("layout.captured_layers_sorted must be a list of layer indices")
    if _index(hidden) is None or _index(hidden) == 0:
        raise bad("layout.hidden_size must be a positive whole number")
    hidden = _index(hidden)
    layers = sorted({_index(x) for x in layers})
    raw = loaded.get("templates")
    if not isinstance(raw, dict) or not raw:
        raise bad("'templates' must map component ids to {layer: [channels]}")
    components: dict[int, dict[int, list[int]]] = {}
    for key, per_layer in raw.items():
        component = _index(key)
        if component is None or not isinstance(per_layer, dict):
            raise bad(f"component {key!r} must be a whole number mapping layers to channel lists")
        if component in components:  # "0" and "00": one would silently replace the other
            raise bad(f"component {component} appears twice (as {key!r} and another spelling)")
        components[component] = {}
        for layer_key, channels in per_layer.items():
            layer = _index(layer_key)
            if layer is None or layer not in layers:
                raise bad(f"component {key}: layer {layer_key!r} is not among the captured layers")
            if layer in components[component]:
                raise bad(f"component {key}: layer {layer} appears twice (as {layer_key!r} and another spelling)")
            if not isinstance(channels, list) or not all((c := _index(ch)) is not None and c < hidden
                                                         for ch in channels):
                raise bad(f"component {key}, layer {layer_key}: channels must be indices below {hidden}")
            components[component][layer] = sorted({_index(ch) for ch in channels})
    provenance = loaded.get("provenance") if isinstance(loaded.get("provenance"), dict) else {}
    return Templates(str(loaded.get("name") or path.stem), layers, hidden, components, provenance)


def _index(value: Any) -> int | None:
    """A non-negative whole number, from an int or its decimal string (JSON object keys are strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    # ASCII digits only: str.isdigit also accepts "²" and "¹", which int() refuses.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None
