"""The functional network one training run uses: from templates to per-layer masks, attached to the model for
training and detached before inference, and recorded beside the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.networks.layout import decoder_blocks, hidden_size, parse_layers
from functionalnetworkssft.networks.masks import ForwardMask, UpdateRestriction, keep_masks
from functionalnetworkssft.networks.templates import Templates


@dataclass
class NetworkPlan:
    templates: Templates
    mode: str
    component_ids: list[int] | None
    layers_spec: str | None
    layers: list[int]
    network: dict[int, list[int]]  # layer -> channels
    masks: dict[int, torch.Tensor]  # layer -> may change
    source: str
    built: bool
    restriction: UpdateRestriction | None = field(default=None, repr=False)
    forward: ForwardMask | None = field(default=None, repr=False)

    @classmethod
    def create(cls, model, templates: Templates, mode: str, component_ids: list[int] | None, layers_spec: str | None,
               source: str, built: bool) -> "NetworkPlan":
        blocks = decoder_blocks(model)
        hidden = hidden_size(model)
        problems = templates.problems_for(len(blocks), hidden, source)
        if problems:
            raise UsageError(problems)
        layers = parse_layers(layers_spec, len(blocks), "--ica_mask_layers")
        network = templates.network(component_ids, layers, source)
        if not network:
            chosen = "all components" if component_ids is None else f"components {' '.join(map(str, component_ids))}"
            raise UsageError(f"the network is empty: {chosen} of {source} have no channel in the layers "
                             f"{layers_spec or 'all'}; choose other --ica_component_ids or --ica_mask_layers.")
        return cls(templates, mode, component_ids, layers_spec, layers, network,
                   keep_masks(mode, network, layers, hidden), source, built)

    @property
    def channels(self) -> int:
        return sum(len(c) for c in self.network.values())

    def attach(self, model, use_peft: bool, mask_forward: bool, guard) -> None:
        """Hold the protected rows during training (the guard writes them back after every optimizer step)."""
        self.restriction = UpdateRestriction(model, self.masks, use_peft)
        guard.restriction = self.restriction
        frozen = [layer for layer, keep in self.masks.items() if not keep.any()]
        projection = decoder_blocks(model)[0].projection_name
        others = sum(1 for name, module in model.named_modules()
                     if hasattr(module, "lora_B") and not name.endswith(projection)) if use_peft else None
        print(f"Functional-network mask ({self.mode}): {self.channels} network channels in {len(self.network)} of "
              f"{len(self.masks)} masked layers; {projection} rows: {self.restriction.protected_rows} held, "
              f"{self.restriction.open_rows} may change"
              + (f"; {len(frozen)} masked layer(s) without network channels frozen in {projection}" if frozen else "")
              + (f"; {others} other LoRA modules train without restriction" if others else "") + ".")
        if mask_forward:
            self.forward = ForwardMask(model, self.masks)
            print("--mask_forward: the masked channels' MLP outputs are zeroed during training only; inference, the "
                  "samples and the merged model run without it.")

    def detach(self) -> None:
        if self.forward is not None:
            self.forward.remove()
        if self.restriction is not None:
            self.restriction.remove()

    def record(self) -> dict[str, Any]:
        return {
            "mask_mode": self.mode,
            "template": self.source.rsplit("/", 1)[-1],
            "template_sha256": self.templates.sha256,
            "template_built_from_training_data": self.built,
            "component_ids": self.component_ids if self.component_ids is not None else sorted(self.templates.components),
            "mask_layers": self.layers_spec or "all",
            "network_channels": self.channels,
            "channels_per_layer": {str(layer): len(c) for layer, c in self.network.items()},
            "held_rows": self.restriction.protected_rows if self.restriction else None,
            "open_rows": self.restriction.open_rows if self.restriction else None,
            "mask_forward": self.forward is not None,
        }
