"""Restricting training to (preserve), or away from (lesion), a functional network.

A network is a set of (layer, channel) pairs: MLP output channels. What writes channel c of layer l is row c of
that layer's MLP output projection (down_proj; column c of GPT-2's Conv1D c_proj, and its bias entry), so that is
what the restriction acts on:

- `preserve`: in each masked layer only the network's rows may change; a masked layer with no network channel is
  frozen in that projection.
- `lesion`: the network's rows are protected; all other rows may change.

With LoRA the adapter's output rows (lora_B rows) of protected channels are held at zero; with full fine-tuning the
protected rows of the weight itself are held at their starting values. Two things make that exact: the gradient of
every protected entry is zeroed as it is computed (so the optimizer's moments never see it), and after every
optimizer step the protected entries are written back (so weight decay cannot move them either). The adapter and
checkpoints stay plain PEFT/transformers files, and the merged model needs no hooks: its protected rows are the
base's, bit for bit.

`--mask_forward` additionally multiplies the masked layers' MLP outputs by the keep mask during training (the
paper's intervention): lesion zeroes the network's channels, preserve zeroes all others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.networks.layout import decoder_blocks


def keep_masks(mode: str, network: dict[int, list[int]], layers: list[int], hidden: int) -> dict[int, torch.Tensor]:
    """Per masked layer, which output channels may change (True)."""
    masks = {}
    for layer in layers:
        channels = torch.tensor(network.get(layer, []), dtype=torch.long)
        if mode == "preserve":
            keep = torch.zeros(hidden, dtype=torch.bool)
            keep[channels] = True
        else:
            keep = torch.ones(hidden, dtype=torch.bool)
            keep[channels] = False
        masks[layer] = keep
    return masks


@dataclass
class _Held:
    param: torch.nn.Parameter
    protected: torch.Tensor  # bool over the param's channel axis
    axis: int  # 0: rows are channels (Linear weight, LoRA B, bias); 1: columns are channels (Conv1D weight)
    values: torch.Tensor  # the protected entries' starting values
    handle: object = None


class UpdateRestriction:
    """Holds the protected rows of the masked layers' output projections where they started."""

    def __init__(self, model, masks: dict[int, torch.Tensor], use_peft: bool):
        self.held: list[_Held] = []
        self.layers = len(masks)
        for block in decoder_blocks(model):
            if block.index not in masks:
                continue
            keep = masks[block.index]
            projection = block.projection
            if use_peft:
                lora_b = getattr(projection, "lora_B", None)
                if lora_b is None or "default" not in lora_b:
                    raise UsageError(f"--mask_mode needs the MLP output projection ({block.projection_name}) among "
                                     "--lora_target_modules (or all-linear): the mask acts on its output rows.")
                self._hold(lora_b["default"].weight, keep, axis=0)
            else:
                conv1d = type(projection).__name__ == "Conv1D"
                self._hold(projection.weight, keep, axis=1 if conv1d else 0)
                if getattr(projection, "bias", None) is not None:
                    self._hold(projection.bias, keep, axis=0)

    def _hold(self, param: torch.nn.Parameter, keep: torch.Tensor, axis: int) -> None:
        protected = (~keep).to(param.device)
        values = (param.detach()[protected] if axis == 0 else param.detach()[:, protected]).clone()
        gate = keep.to(device=param.device, dtype=param.dtype)
        gate = gate.view(-1, *([1] * (param.dim() - 1))) if axis == 0 else gate.view(1, -1)
        handle = param.register_hook(lambda grad, gate=gate: grad * gate)
        self.held.append(_Held(param, protected, axis, values, handle))

    @property
    def protected_rows(self) -> int:
        return sum(int(h.protected.sum()) for h in self.held if h.param.dim() == 2)

    @property
    def open_rows(self) -> int:
        return sum(int((~h.protected).sum()) for h in self.held if h.param.dim() == 2)

    @torch.no_grad()
    def restore(self) -> None:
        for held in self.held:
            if held.axis == 0:
                held.param[held.protected] = held.values
            else:
                held.param[:, held.protected] = held.values

    def remove(self) -> None:
        for held in self.held:
            held.handle.remove()


class ForwardMask:
    """Multiplies the masked layers' MLP outputs by their keep mask (training only: removed before inference)."""

    def __init__(self, model, masks: dict[int, torch.Tensor]):
        self.handles, self.active = [], True
        for block in decoder_blocks(model):
            if block.index in masks:
                gate = masks[block.index]
                self.handles.append(block.mlp.register_forward_hook(
                    lambda module, args, output, gate=gate:
                    output * gate.to(device=output.device, dtype=output.dtype) if self.active else output))

    @contextlib.contextmanager
    def paused(self):
        """The model as it is saved, for forwards that must not see the mask (the forgetting probe, the base). Only
        for forwards without a backward: gradient checkpointing would recompute them with the mask back on."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
