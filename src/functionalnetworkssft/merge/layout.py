"""Where each parameter of the model transformers builds lives in the checkpoint.

transformers 5 renames some tensors on load (GPT-NeoX's `embed_out` is the model's `lm_head`; Mixtral's
`block_sparse_moe` is `mlp`) and fuses others (a mixture of experts keeps one stacked `experts.gate_up_proj` per layer
where the checkpoint stores `experts.{e}.gate_proj` and `experts.{e}.up_proj`), and reverses both on save. The merge
writes checkpoint tensors and the adapter names model parameters, so both directions come from transformers' own
conversion mapping, applied to the checkpoint's names exactly as loading applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor inside a fused parameter: expert `expert` (the stacked first axis), rows
    [offset, offset + rows) of that expert's matrix (the concatenated second axis)."""

    disk: str
    expert: int
    offset: int
    rows: int


@dataclass
class Layout:
    disk_of: dict[str, str] = field(default_factory=dict)  # parameter -> checkpoint name, where they differ
    fused: dict[str, list[Piece]] = field(default_factory=dict)  # parameter -> its checkpoint tensors
    unsupported: dict[str, str] = field(default_factory=dict)  # parameter -> why it cannot be split back

    def disk(self, name: str) -> str:
        return self.disk_of.get(name, name)


def checkpoint_layout(model, shapes: dict[str, tuple[int, ...]]) -> Layout:
    """The layout of `model` (built on the meta device) over a checkpoint with these tensor names and shapes."""
    layout = Layout()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter,
                                                     WeightRenaming, rename_source_key)
    except ImportError:  # a transformers without conversion mappings stores parameters under their own names
        return layout
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    parameters = dict(model.state_dict(keep_vars=True))
    grouped: dict[str, list[tuple[int, int, str]]] = {}
    for disk in shapes:
        name, pattern = rename_source_key(disk, renamings, converters, getattr(model, "base_model_prefix", None),
                                          parameters)
        if pattern is None:
            if name != disk:
                layout.disk_of[name] = disk
            continue
        converter = by_pattern[pattern]
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            layout.unsupported[name] = (f"transformers builds it from {', '.join(converter.source_patterns)} with "
                                        f"{', '.join(type(op).__name__ for op in converter.operations)}")
            continue
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), disk)
        grouped.setdefault(name, []).append(
            (converter.source_patterns.index(pattern), int(expert.group(1)) if expert else 0, disk))
    for name, entries in grouped.items():
        pieces, offset = [], 0
        for part in sorted({part for part, _, _ in entries}):
            members = sorted((expert, disk) for p, expert, disk in entries if p == part)
            rows = shapes[members[0][1]][0]
            pieces += [Piece(disk, expert, offset, rows) for expert, disk in members]
            offset += rows
        layout.fused[name] = pieces
    return layout
