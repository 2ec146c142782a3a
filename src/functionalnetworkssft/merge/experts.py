"""LoRA on parameters (PEFT's `target_parameters`: a mixture of experts' stacked weights, a router's matrix) as plain
LoRA on the checkpoint tensors they come from.

PEFT's ParamWrapper adapts a stacked parameter W of shape (experts, out, in) with A of shape (experts * r, in) and
B of shape (out, experts * r), and adds, for each expert e,

    delta[e] = scaling * B.reshape(out, r, experts)[:, :, e] @ A.reshape(experts, r, in)[e]

(its get_delta_weight). Expert e's rows [offset, offset + rows) are one checkpoint tensor (layout.Piece), so its
delta is B_e[offset:offset + rows] @ A_e: a LoRA target on that tensor, which the merge writes like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from functionalnetworkssft.errors import MergeError, UsageError


@dataclass(frozen=True)
class Wrapped:
    """What one ParamWrapper of the adapter adapts."""

    parameter: str  # the model's parameter name (no PEFT wrapper parts)
    shape: tuple[int, ...]
    out_major: bool  # (experts, out, in) as PEFT reads it: it swaps in and out for a 3-d parameter
    r: int  # PEFT's rank and scaling for this wrapper (rank and alpha patterns applied)
    scaling: float


def wrapped_parameters(model, adapter_config: dict[str, Any]) -> dict[str, Wrapped]:
    """Each ParamWrapper PEFT puts into `model` (built on the meta device) for this adapter, by its module name as
    the adapter file spells it (a second parameter on the same module nests: `experts.base_layer`)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper

    import warnings

    settings = {k: v for k, v in adapter_config.items() if k in LoraConfig.__dataclass_fields__}
    settings.update(inference_mode=True)
    try:
        with warnings.catch_warnings():
            # PEFT's own rank and alpha patterns for a fused gate_up_proj, which its matching misses (a notice about
            # PEFT's config, nothing the user can act on); the ranks read below are the ones PEFT applies.
            warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
            inject_adapter_in_model(LoraConfig(**settings), model, low_cpu_mem_usage=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise MergeError(f"adapter_config.json: PEFT cannot place this adapter on the base ({exc}).") from None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = ".".join(part for part in name.split(".") if part != "base_layer")
            shape = tuple(module.get_param().shape)
            adapter = module.active_adapters[0]
            found[name] = Wrapped(f"{owner}.{module.parameter_name}", shape,
                                  out_major=len(shape) == 2 or bool(module._did_swap_in_out_features),
                                  r=int(module.r[adapter]), scaling=float(module.scaling[adapter]))
    return found


def expert_targets(module: str, wrapped: Wrapped, parts: dict[str, torch.Tensor], layout, folder
                   ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(checkpoint tensor, A, B) for each tensor the wrapped parameter is built from: linear LoRA factors whose
    product is that tensor's share of PEFT's delta."""
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        raise UsageError(f"{folder}: {module} has adapter tensors {sorted(parts)}; fnsft merge merges LoRA on "
                         "parameters with lora_A and lora_B only (PEFT allows nothing else there).")
    A, B, r = parts["lora_A.weight"], parts["lora_B.weight"], wrapped.r
    if not wrapped.out_major:
        raise UsageError(f"{folder}: {wrapped.parameter} is stored (experts, in, out); fnsft merge does not merge "
                         "LoRA on such parameters yet; merge with PEFT's merge_and_unload().")
    if len(wrapped.shape) == 2:
        experts, (out_f, in_f) = 1, wrapped.shape
    else:
        experts, out_f, in_f = wrapped.shape
    if tuple(A.shape) != (experts * r, in_f) or tuple(B.shape) != (out_f, experts * r):
        raise MergeError(f"{folder}: {module} has LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} but "
                         f"{wrapped.parameter} {wrapped.shape} needs A{(experts * r, in_f)} B{(out_f, experts * r)}; "
                         "the adapter does not belong to this base model.")
    if len(wrapped.shape) == 2:
        return [(layout.disk(wrapped.parameter), A, B)]
    if wrapped.parameter in layout.unsupported:
        raise UsageError(f"{folder}: the adapter changes {wrapped.parameter}, which "
                         f"{layout.unsupported[wrapped.parameter]}; fnsft merge cannot split that back into the "
                         "checkpoint's tensors; merge with PEFT's merge_and_unload().")
    pieces = layout.fused.get(wrapped.parameter)
    if not pieces:
        raise MergeError(f"{folder}: the adapter changes {wrapped.parameter}, which is not in the base checkpoint.")
    rows: dict[int, int] = {}
    for piece in pieces:
        rows[piece.expert] = rows.get(piece.expert, 0) + piece.rows
    if rows != dict.fromkeys(range(experts), out_f):
        raise MergeError(f"{folder}: the base checkpoint's tensors for {wrapped.parameter} "
                         f"({', '.join(piece.disk for piece in pieces[:2])}, ...) do not make up its {experts} experts "
                         f"of {out_f} rows; the checkpoint does not match its config.json.")
    per_expert_a = A.reshape(experts, r, in_f)
    per_expert_b = B.reshape(out_f, r, experts)
    return [(piece.disk, per_expert_a[piece.expert].contiguous(),
             per_expert_b[piece.offset:piece.offset + piece.rows, :, piece.expert].contiguous())
            for piece in pieces]
