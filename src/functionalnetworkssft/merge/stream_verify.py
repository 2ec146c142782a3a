"""Verify a merge one block at a time, so that any model that can be merged can be verified on the same machine.

The model is built once on the meta device with PEFT's adapter layers in it. The probe runs as a batch of two rows,
row 0 for base+adapter (PEFT's unmerged layer semantics: the reference) and row 1 for the merged model. Each decoder
block, and each weight-holding module outside the blocks (embeddings, final norm, output head), is a unit that runs
row 0 with the base's tensors and the adapter enabled, then row 1 with the merged tensors and the adapter disabled.
Inside a block, each layer loads its own tensors (the adapter's too, read again from the adapter file) when its
forward runs and puts them back on the meta device after, so memory holds one weight matrix in float32, not a block
and not the adapter. Code that uses a weight outside its own layer's forward (DoRA reads its base layer's) is caught
by a torch function mode the moment it touches a placeholder, and that unit is then loaded whole. The model's own
forward (masks, rotary embeddings, residuals) connects the units, for any architecture transformers builds.

Each unit's output rows are compared as they pass; the first unit whose difference exceeds the tolerance fails the
check, and the tensor in it that differs most from PEFT's own merge of that unit is named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

from functionalnetworkssft.errors import MergeError, first_line
from functionalnetworkssft.merge.io import BLOCK_ELEMENTS, BaseWeights, SafetensorsShard
from functionalnetworkssft.merge.layout import Layout
from functionalnetworkssft.merge.plan import _resolve
from functionalnetworkssft.merge.verify import RELATIVE_TOLERANCE
from functionalnetworkssft.verification import compare_logits, probe_inputs, quiet

# Parts of a PEFT parameter name that hold the adapter's own tensors, and wrappers around a base module.
ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "modules_to_save", "trainable_tokens_delta", "trainable_tokens_original"}
WRAPPER_PARTS = {"base_layer", "original_module", "token_adapter"}
PEFT_PREFIX = "base_model.model."
# Tensor functions that only read a placeholder's metadata, which is the loaded tensor's.
METADATA = {"__get__", "size", "dim", "numel", "is_floating_point", "element_size", "__len__"}
# Output features of a plain Linear unit (an output head) computed at once: 4M float32 weights, 16 MiB, less than a
# decoder block's largest weight, so the head reuses its buffer (measured, 2 GB model: the head's phase peaked at
# 553 MB of RSS against 663 MB with 64 MiB pieces, which missed the buffer and fragmented the heap).
LINEAR_BLOCK_ELEMENTS = 1 << 22


def plain_name(peft_name: str) -> str:
    """The base model's name for a parameter of the PEFT-wrapped model."""
    name = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _is_adapter(peft_name: str) -> bool:
    return any(part in ADAPTER_PARTS for part in peft_name.split("."))


class _Sources:
    """Where a unit's tensors come from: the base (with what the adapter file or a QLoRA round trip replaces) for
    the reference, the merged folder for the merged model. Names missing on disk fall back to their tied source."""

    def __init__(self, base: BaseWeights, merged: BaseWeights, prefix: str, tied: dict[str, str],
                 overrides: dict[str, torch.Tensor], patch: Callable[[str, torch.Tensor], torch.Tensor] | None,
                 adapter_file: tuple[SafetensorsShard, dict[str, str]] | None = None, layout: Layout | None = None):
        self.base, self.merged, self.prefix, self.tied = base, merged, prefix, tied
        self.layout = layout or Layout()
        self.overrides, self.patch = overrides, patch
        self.adapter_file, self.adapter_keys = adapter_file or (None, {})
        self.spare: list[torch.Tensor] = []

    def _disk(self, weights: BaseWeights, name: str) -> str:
        disk = _resolve(weights, name, self.prefix, self.layout)
        if disk is None and name in self.tied:
            disk = _resolve(weights, self.tied[name], self.prefix, self.layout)
        if disk is None:
            raise _Missing(f"{name} is not in {weights.folder}")
        return disk

    def read(self, name: str, *, reference: bool, stored_dtype: bool = False, rows: tuple[int, int] | None = None
             ) -> torch.Tensor:
        """A tensor (or rows of it) in float32, converted a row block at a time so that no second full-size copy
        exists; stored_dtype keeps the file's dtype (for lookups, which are exact in any dtype)."""
        if reference and name in self.overrides:
            value = self.overrides[name]
            value = value[rows[0]:rows[1]] if rows else value
            return value if stored_dtype else value.float()
        weights = self.base if reference else self.merged
        if name in self.layout.fused:
            return self._fused(weights, name, reference, stored_dtype, rows)
        disk = self._disk(weights, name)
        if reference and self.patch is not None:
            value = self.patch(name, weights.read(disk))  # the QLoRA round trip runs on the stored dtype
            value = value if stored_dtype else value.float()
            return value[rows[0]:rows[1]] if rows else value
        info = weights.info(disk)
        start, stop = rows or (0, info.rows)
        if stored_dtype:
            return weights.read_rows(disk, start, stop)
        out = self._take((stop - start, *info.shape[1:]) if info.shape else ())
        if not info.shape:
            return out.copy_(weights.read(disk))
        step = max(1, BLOCK_ELEMENTS // max(1, info.row_elements))
        for at in range(start, stop, step):
            out[at - start:min(at + step, stop) - start].copy_(weights.read_rows(disk, at, min(at + step, stop)))
        return out

    def _fused(self, weights: BaseWeights, name: str, reference: bool, stored_dtype: bool,
               rows: tuple[int, int] | None) -> torch.Tensor:
        """A parameter transformers stacks from several checkpoint tensors (a layer's experts), built as it does."""
        pieces = self.layout.fused[name]
        first = weights.info(self._disk(weights, pieces[0].disk))
        experts = 1 + max(piece.expert for piece in pieces)
        height = max(piece.offset + piece.rows for piece in pieces)
        value = torch.empty((experts, height, *first.shape[1:]),
                            dtype=first.dtype if stored_dtype else torch.float32)
        for piece in pieces:
            part = weights.read(self._disk(weights, piece.disk))
            if reference and self.patch is not None:
                part = self.patch(piece.disk, part)
            value[piece.expert, piece.offset:piece.offset + piece.rows].copy_(part)
        return value[rows[0]:rows[1]] if rows else value

    def _take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 buffer, reused from the tensor before when one is large enough: consecutive blocks have the same
        shapes, and reusing memory saves allocating and page-faulting a block's worth of fresh memory twice per
        block (measured: a third of the verification's time). A miss drops the smaller spares, so that loading leaf
        by leaf keeps about one buffer of the largest weight."""
        size = 1
        for d in shape:
            size *= d
        fitting = [b for b in self.spare if b.numel() >= size]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self.spare = [b for b in self.spare if b is not buffer]
        else:
            self.spare = []
            buffer = torch.empty(size, dtype=torch.float32)
        out = buffer[:size].view(shape)
        out._fnsft_buffer = buffer
        return out

    def give_back(self, tensor: torch.Tensor) -> None:
        buffer = getattr(tensor, "_fnsft_buffer", None)
        if buffer is not None:
            self.spare.append(buffer)

    def trim(self) -> None:
        """Free the buffers the current unit did not take, so that memory stays at one unit."""
        self.spare = []

    def adapter_tensor(self, peft_name: str) -> torch.Tensor:
        key = self.adapter_keys.get(peft_name)
        if key is None:
            return self.overrides[peft_name]
        return self.adapter_file.read_rows(key, 0, self.adapter_file.infos[key].rows)

    def has_adapter_tensor(self, peft_name: str) -> bool:
        return peft_name in self.overrides or peft_name in self.adapter_keys

    def rows_of(self, name: str, *, reference: bool) -> int:
        if reference and name in self.overrides:
            return self.overrides[name].shape[0]
        weights = self.base if reference else self.merged
        return weights.info(self._disk(weights, name)).rows


class _Missing(Exception):
    pass


class _MetaUse(Exception):
    """A computation used a tensor that is not loaded: a weight read outside its own module's forward."""


class _NoMetaUse(torch.overrides.TorchFunctionMode):
    """Raises _MetaUse when any torch computation in a leaf-by-leaf pass touches a meta placeholder. Without it,
    some kernels (F.linear with a real input and a meta weight) return real tensors of uninitialised memory. Reading a
    placeholder's shape or dtype is fine: they are the loaded tensor's."""

    paused = False  # while a layer's own tensors are read in: that code touches no placeholder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and getattr(func, "__name__", "") not in METADATA \
                and (_has_meta(args) or _has_meta(kwargs.values())):
            raise _MetaUse(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _has_meta(values) -> bool:
    # Torch functions take tensors directly or in flat lists (cat, stack); this runs on every call of a pass, so it
    # is a plain loop rather than a pytree walk (which cost a sixth of the verification's time).
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                return True
        elif isinstance(value, (list, tuple)) and _has_meta(value):
            return True
    return False


@dataclass
class _Slot:
    owner: torch.nn.Module
    attr: str
    name: str  # the base model's name
    meta: torch.nn.Parameter


def _rows(value: Any, row: int, batch: int) -> Any:
    """Row `row` of every batch-shaped tensor in a module's arguments; other values pass through."""
    if isinstance(value, torch.Tensor):
        return value[row:row + 1] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_rows(v, row, batch) for v in value)
    if isinstance(value, list):
        return [_rows(v, row, batch) for v in value]
    if isinstance(value, dict):
        return {k: _rows(v, row, batch) for k, v in value.items()}
    return value


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "keys"):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    raise TypeError(f"cannot compare a module output of type {type(output).__name__}")


def _join(reference: Any, merged: Any) -> Any:
    """The two one-row outputs as one two-row output of the same structure."""
    if isinstance(reference, torch.Tensor):
        return torch.cat([reference, merged.expand_as(reference)])
    if isinstance(reference, (tuple, list)):
        return type(reference)(_join(r, m) if isinstance(r, torch.Tensor) else r for r, m in zip(reference, merged))
    return reference


class _Unit:
    """One block (or embedding, norm, head): loads its tensors for each row, compares, and unloads."""

    def __init__(self, name: str, module: torch.nn.Module, sources: _Sources, check: "_Check"):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.name, self.module, self.sources, self.check = name, module, sources, check
        self.slots: list[_Slot] = []
        self.adapter_slots: list[_Slot] = []
        for sub_name, sub in module.named_modules(remove_duplicate=False):
            for attr, param in list(sub._parameters.items()):
                full = f"{name}.{sub_name}.{attr}" if sub_name else f"{name}.{attr}"
                if param is None or not param.is_meta:
                    continue
                if not _is_adapter(full):
                    self.slots.append(_Slot(sub, attr, plain_name(full), param))
                elif sources.has_adapter_tensor(f"{PEFT_PREFIX}{full}"):
                    self.adapter_slots.append(_Slot(sub, attr, f"{PEFT_PREFIX}{full}", param))
        self.loaded: list[torch.Tensor] = []
        self.switches = [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        # Leaf by leaf: each module inside the unit that holds tensors loads them when its own forward runs and
        # drops them after, so memory holds one weight matrix rather than a block. A unit whose code uses a
        # weight outside its module's forward (DoRA reads its base layer's) is caught doing so and runs whole.
        owners: dict[int, list[_Slot]] = {}
        for slot in self.slots + self.adapter_slots:
            owners.setdefault(id(slot.owner), []).append(slot)
        # PEFT's LoRA on a parameter (ParamWrapper) reads the wrapped module's weight before that module's forward
        # runs: such a unit loads whole.
        from peft.tuners.lora.layer import ParamWrapper

        self.leafwise = bool(owners) and id(module) not in owners and \
            not any(isinstance(m, ParamWrapper) for m in module.modules())
        self.reference = True
        self.guard = _NoMetaUse()
        for slots in owners.values() if self.leafwise else ():
            owner = slots[0].owner
            owner.forward = self._leaf(slots, owner.forward)
        # Lookups select rows, which is exact in the stored dtype: only the probe's rows are read, as stored.
        self.lookup = type(module) is torch.nn.Embedding and module.max_norm is None
        self.by_rows = (type(module) is torch.nn.Linear and module.weight.numel() > LINEAR_BLOCK_ELEMENTS
                        and sources.patch is None and f"{name}.weight" not in sources.overrides)
        self.forward = module.forward
        module.forward = self._run

    def _put(self, slot: _Slot, reference: bool, adapter: bool, stored_dtype: bool = False) -> torch.Tensor:
        if adapter:
            value = self.sources.adapter_tensor(slot.name).to(self.check.device, torch.float32)
        else:
            value = self.sources.read(slot.name, reference=reference, stored_dtype=stored_dtype)
            if value.shape != slot.meta.shape:
                self.sources.give_back(value)
                raise _Missing(f"{slot.name} has shape {tuple(value.shape)} where the model expects "
                               f"{tuple(slot.meta.shape)}")
        slot.owner._parameters[slot.attr] = torch.nn.Parameter(value.to(self.check.device), requires_grad=False)
        return value

    def _load(self, reference: bool) -> None:
        self._unload()  # first, so that the two sets of tensors are never in memory together
        for slot in self.slots:
            self.loaded.append(self._put(slot, reference, False, stored_dtype=self.lookup))
        self.sources.trim()
        for slot in self.adapter_slots:
            self._put(slot, reference, True)

    def _unload(self) -> None:
        for slot in self.slots + self.adapter_slots:
            slot.owner._parameters[slot.attr] = slot.meta
        for value in self.loaded:
            self.sources.give_back(value)
        self.loaded = []

    def _leaf(self, slots: list[_Slot], forward: Callable) -> Callable:
        adapter = {id(slot) for slot in self.adapter_slots}

        def run(*args, **kwargs):
            if not self.leafwise:
                return forward(*args, **kwargs)
            loaded = []
            try:
                self.guard.paused = True
                try:
                    for slot in slots:
                        value = self._put(slot, self.reference, id(slot) in adapter)
                        if id(slot) not in adapter:
                            loaded.append(value)
                finally:
                    self.guard.paused = False
                return forward(*args, **kwargs)
            finally:
                for slot in slots:
                    slot.owner._parameters[slot.attr] = slot.meta
                for value in loaded:
                    self.sources.give_back(value)

        return run

    def _pass(self, row: int, args: tuple, kwargs: dict) -> Any:
        """One row through the unit: row 0 with the base's tensors and the adapter, row 1 merged, adapter off."""
        self.reference = row == 0
        for switch in self.switches:
            switch.enable_adapters(self.reference)
        if not self.leafwise:
            self._load(self.reference)
            return self.forward(*_rows(args, row, 2), **_rows(kwargs, row, 2))
        with self.guard:
            output = self.forward(*_rows(args, row, 2), **_rows(kwargs, row, 2))
        if _first_tensor(output).is_meta:
            raise _MetaUse()
        return output

    def _linear_by_rows(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        """A plain Linear (an output head) computed a block of output features at a time: its float32 weight is
        never whole in memory."""
        weight = f"{self.name}.weight"
        rows = self.sources.rows_of(weight, reference=reference)
        step = max(1, LINEAR_BLOCK_ELEMENTS // max(1, self.module.in_features))
        pieces = []
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block = self.sources.read(weight, reference=reference, rows=(start, stop)).to(self.check.device)
            bias = None
            if self.module.bias is not None:
                bias = self.sources.read(f"{self.name}.bias", reference=reference, rows=(start, stop))
                bias = bias.to(self.check.device)
            pieces.append(torch.nn.functional.linear(x, block, bias))
            self.sources.give_back(block)
        return torch.cat(pieces, dim=-1)

    def _lookup(self, ids: torch.Tensor, reference: bool) -> torch.Tensor:
        weight = f"{self.name}.weight"
        rows = self.sources.rows_of(weight, reference=reference)
        if rows != self.module.num_embeddings:
            raise _Missing(f"{weight} has {rows} rows where the model expects {self.module.num_embeddings}")
        wanted = torch.unique(ids.cpu())
        table = torch.cat([self.sources.read(weight, reference=reference, stored_dtype=True, rows=(i, i + 1))
                           for i in wanted.tolist()])
        return table.to(self.check.device)[torch.searchsorted(wanted.to(self.check.device), ids)].float()

    def _run(self, *args, **kwargs):
        if self.by_rows:
            x = args[0] if args else kwargs["input"]
            reference, merged = self._linear_by_rows(x[0:1], True), self._linear_by_rows(x[1:2], False)
        elif self.lookup:
            ids = args[0] if args else kwargs["input"]
            reference, merged = self._lookup(_rows(ids, 0, 2), True), self._lookup(_rows(ids, 1, 2), False)
        else:
            try:
                reference, merged = self._pass(0, args, kwargs), self._pass(1, args, kwargs)
            except _MetaUse:
                self.leafwise = False  # a weight used outside its own module: load the unit whole
                reference, merged = self._pass(0, args, kwargs), self._pass(1, args, kwargs)
            finally:
                self._unload()
        self.check.compare(self, _first_tensor(reference), _first_tensor(merged))
        return _join(reference, merged)

    @torch.no_grad()
    def worst_tensor(self) -> tuple[str, float] | None:
        """The tensor of this unit that differs most, relatively, from PEFT's own merge of the unit's adapter."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            self._load(True)
            for layer in self.module.modules():
                if isinstance(layer, BaseTunerLayer) and not layer.merged:
                    layer.merge()
            effective: dict[str, torch.Tensor] = {}
            for sub_name, sub in self.module.named_modules(remove_duplicate=False):
                for attr, param in sub._parameters.items():
                    full = f"{self.name}.{sub_name}.{attr}" if sub_name else f"{self.name}.{attr}"
                    if param is None or param.is_meta:
                        continue
                    parts = full.split(".")
                    if "modules_to_save" in parts:  # the saved copy replaces the base module
                        at = parts.index("modules_to_save")
                        full = ".".join(parts[:at] + parts[at + 2:])
                    elif _is_adapter(full):
                        continue
                    elif plain_name(full) in effective:
                        continue
                    effective[plain_name(full)] = param.detach().float().cpu()
            worst = None
            for name, value in effective.items():
                merged = self.sources.read(name, reference=False)
                if merged.shape != value.shape:
                    return name, float("inf")
                diff = float((merged - value).abs().max()) / max(1.0, float(value.abs().max()))
                if worst is None or diff > worst[1]:
                    worst = (name, diff)
            return worst
        finally:
            self._unload()


class _Check:
    def __init__(self, tolerance_ratio: float, device: torch.device, progress):
        self.ratio, self.device, self.progress = tolerance_ratio, device, progress
        self.blocks: list[dict[str, Any]] = []
        self.first_failure: _Unit | None = None

    def compare(self, unit: _Unit, reference: torch.Tensor, merged: torch.Tensor) -> None:
        reference, merged = reference.float(), merged.float()
        if merged.shape != reference.shape:
            merged = merged.expand_as(reference)
        diff = float((merged - reference).abs().max()) if reference.numel() else 0.0
        scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
        tolerance = self.ratio * scale
        self.blocks.append({"block": unit.name, "max_abs_diff": diff, "tolerance": tolerance})
        if (not diff <= tolerance) and self.first_failure is None:
            self.first_failure = unit
        self.progress.update(1)


def _units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Decoder blocks (the classes transformers keeps whole on one device) and weight-holding modules outside them."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner = model.get_base_model()
    block_classes = set(getattr(inner, "_no_split_modules", None) or [])
    units: list[tuple[str, torch.nn.Module]] = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        if (type(module).__name__ in block_classes or isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
                or any(p is not None for p in module._parameters.values())):
            if any(p.is_meta for p in module.parameters()):
                units.append((prefix, module))
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", inner)
    return units


def reference_model(base_dir: Path, adapter_dir: Path, vocab_size: int | None, trust_remote_code: bool):
    """The base+adapter model on the meta device, in float32, with the adapter's tensors loaded; untied, so that
    the input and output embeddings are loaded separately. Also: the tied names, and the base parameters the adapter
    file itself supplied (PEFT saves a resized embedding's base weight with the adapter)."""
    from accelerate import init_empty_weights
    from peft import PeftModel, peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet():
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if vocab_size is not None:
            text.vocab_size = vocab_size
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        layout = _layout(model, base_dir)
        # PEFT moves loaded adapter tensors to the base layer's device, which here is meta: keep them where they load,
        # on the CPU (PEFT's own choice is the GPU whenever there is one; the check moves each unit where it runs).
        try:
            # Adapter tensors stay in their stored dtype until their unit runs (autocast would hold all of them in
            # float32 for the whole check).
            # (ParamWrapper, PEFT's LoRA on a parameter, has its own mover.)
            from peft.tuners.lora.layer import ParamWrapper

            with mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None), \
                    mock.patch.object(ParamWrapper, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None):
                # Named only where PEFT would choose otherwise: naming it on the CPU makes PEFT hold more.
                device = {} if peft_model.infer_device() == "cpu" else {"torch_device": "cpu"}
                model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, low_cpu_mem_usage=True,
                                                  autocast_adapter_dtype=False, **device)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise MergeError(f"verification: PEFT cannot load {adapter_dir} onto {base_dir} ({first_line(exc)}); "
                             "nothing was written. Pass --verify off to merge without the check.") from None
    model.eval()
    # Every real parameter moves into `overrides` and leaves a meta placeholder behind: the adapter's own tensors
    # (by their PEFT name, loaded with their unit) and the base tensors the adapter file supplied (by base name).
    overrides: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in list(module._parameters.items()):
            if param is None or param.is_meta:
                continue
            full = f"{module_name}.{attr}" if module_name else attr
            overrides[full if _is_adapter(full) else plain_name(full)] = param.detach()
            # Float32 like the rest of the model: code that asks a placeholder's dtype gets the loaded tensor's.
            placeholder = torch.empty_like(param, device="meta",
                                           dtype=torch.float32 if param.is_floating_point() else param.dtype)
            module._parameters[attr] = torch.nn.Parameter(placeholder, requires_grad=False)
    return model, tied, overrides, _on_disk(overrides, adapter_dir, model.active_adapter), layout


def _layout(model, base_dir: Path) -> Layout:
    """Where the model's parameters are in the checkpoint (renamed or fused on load), read before PEFT wraps it."""
    from functionalnetworkssft.merge.layout import checkpoint_layout

    weights = BaseWeights(base_dir)
    try:
        return checkpoint_layout(model, {name: weights.info(name).shape for name in weights.names()})
    finally:
        weights.close()


def _on_disk(overrides: dict[str, torch.Tensor], adapter_dir: Path, adapter_name: str
             ) -> tuple[SafetensorsShard, dict[str, str]] | None:
    """The adapter tensors that its safetensors file holds exactly as loaded, by PEFT name -> file key, removed from
    `overrides`: each is read again when its unit runs, so the adapter is not held whole through the check. The file
    stays open until the check ends, so a file replaced meanwhile (a training saving into the folder) is not read."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    try:
        shard = SafetensorsShard(path)
    except MergeError:
        return None
    keys: dict[str, str] = {}
    for name in [n for n in overrides if _is_adapter(n)]:
        key = ".".join(part for part in name.split(".") if part != adapter_name)
        info = shard.infos.get(key)
        if info is not None and info.shape == tuple(overrides[name].shape) and info.dtype == overrides[name].dtype \
                and torch.equal(shard.read_rows(key, 0, info.rows), overrides[name]):
            keys[name] = key
            del overrides[name]
    return shard, keys


def stream_verify(merged_dir: Path, base_dir: Path, adapter_dir: Path, *, base: BaseWeights, output_dtype: str,
                  vocab_size: int | None, patch: Callable[[str, torch.Tensor], torch.Tensor] | None,
                  device: torch.device, trust_remote_code: bool, reference=None) -> dict[str, Any]:
    """reference: what reference_model returned for these inputs, when it was built ahead (beside the merge)."""
    from tqdm.auto import tqdm

    model, tied, overrides, adapter_file, layout = reference or reference_model(base_dir, adapter_dir, vocab_size,
                                                                        trust_remote_code)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:  # meta: PEFT's copies kept only for unmerging
                module._buffers[key] = buffer.to(device)
        for key, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[key] = torch.nn.Parameter(param.to(device), requires_grad=False)
    inner = model.get_base_model()
    prefix = getattr(inner, "base_model_prefix", "") or ""
    merged = BaseWeights(merged_dir)
    try:
        sources = _Sources(base, merged, prefix, tied, overrides, patch, adapter_file, layout)
        vocab = inner.get_input_embeddings().weight.shape[0]
        probes = probe_inputs(merged_dir, vocab)
        # One row of all probes in turn: a single forward per model, with no padding to mask.
        ids = torch.tensor([sum(probes, [])] * 2, device=device)
        units = _units(model)
        with tqdm(total=len(units), unit="block", desc="verifying", leave=False, disable=None) as progress:
            check = _Check(RELATIVE_TOLERANCE[output_dtype], device, progress)
            for name, module in units:
                _Unit(name, module, sources, check)  # wraps the module's forward; the model is discarded after
            try:
                with torch.no_grad(), quiet():
                    logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
            except _Missing as exc:
                return {"status": "failed", "mode": "streaming", "reason": str(exc)}
        compared = compare_logits([logits[1]], [logits[0]], RELATIVE_TOLERANCE[output_dtype])
        passed = compared.pop("within_tolerance") and check.first_failure is None
        result: dict[str, Any] = {
            "status": "passed" if passed else "failed",
            "mode": "streaming",
            "compute_dtype": "float32",
            "output_dtype": output_dtype,
            **compared,
            "blocks_verified": len(check.blocks),
            "max_block_diff_ratio": max((b["max_abs_diff"] / b["tolerance"] for b in check.blocks), default=0.0),
            "probes": [hashlib.sha256(json.dumps(p).encode()).hexdigest() for p in probes],
            "probe_tokens": [len(p) for p in probes],
            "blocks": check.blocks,
        }
        failing = check.first_failure
        if failing is not None:
            result["first_failing_block"] = failing.name
            worst = failing.worst_tensor()
            if worst is not None:
                result["first_failing_tensor"] = worst[0]
                result["first_failing_tensor_diff_ratio"] = worst[1]
        return result
    finally:
        merged.close()
        if adapter_file is not None:
            adapter_file[0].close()
