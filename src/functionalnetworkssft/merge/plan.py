"""The merge plan: what each output tensor is made of (base rows, LoRA delta, DoRA factor, replacement, token rows,
QLoRA round trip), computed block of rows by block of rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from functionalnetworkssft.errors import MergeError
from functionalnetworkssft.merge.adapter import Adapter, LoraTarget
from functionalnetworkssft.merge.architecture import Architecture
from functionalnetworkssft.merge.io import BaseWeights, TensorInfo, row_blocks
from functionalnetworkssft.merge.layout import Layout
from functionalnetworkssft.merge.qlora import QuantSpec


# Planning: what each output tensor is made of


@dataclass
class TensorRecipe:
    """How one output tensor is computed from the base, in float32, block of rows by block of rows."""

    out_name: str
    source: str | None  # name in the base checkpoint, or None when the adapter supplies the whole tensor
    info: TensorInfo  # shape and dtype of the value before casting to the output dtype
    replacement: torch.Tensor | None = None
    lora: LoraTarget | None = None
    bias_add: torch.Tensor | None = None
    tokens: tuple[list[int], torch.Tensor] | None = None
    quant: QuantSpec | None = None

    @property
    def touched(self) -> bool:
        return any(x is not None for x in (self.replacement, self.lora, self.bias_add, self.tokens, self.quant))


def _source_reader(recipe: TensorRecipe, base: BaseWeights) -> Callable[[int, int], torch.Tensor]:
    if recipe.replacement is not None:
        full = recipe.replacement.to(recipe.info.dtype)
        return lambda start, stop: full[start:stop] if full.dim() else full
    if recipe.quant is not None:
        # Double quantization normalises block statistics over the whole tensor, so the round trip needs it whole.
        full = recipe.quant.roundtrip(base.read(recipe.source))
        return lambda start, stop: full[start:stop]
    return lambda start, stop: base.read_rows(recipe.source, start, stop)


def compute_blocks(recipe: TensorRecipe, base: BaseWeights, out_dtype: torch.dtype | None,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Yield the merged tensor in row blocks, cast to out_dtype (None: float32, for comparisons)."""
    read = _source_reader(recipe, base)
    info, lora = recipe.info, recipe.lora
    if not recipe.touched or (recipe.replacement is not None and lora is None and recipe.tokens is None
                              and recipe.bias_add is None):
        for start, stop in row_blocks(info):
            block = read(start, stop)
            yield block.to(out_dtype) if out_dtype is not None else block.float()
        return
    factor = None
    if lora is not None and lora.magnitude is not None:
        factor = _dora_factor(recipe, read, device)
    # Features the adapter does not change keep their stored values bit for bit (w + 0.0 would turn -0.0 into 0.0).
    untouched = lora.untouched.to(device) if lora is not None and lora.untouched is not None else None

    def merged(start: int, stop: int) -> torch.Tensor:
        block = read(start, stop).to(device=device, dtype=torch.float32, copy=True)
        pristine = block.clone() if untouched is not None else None
        if lora is not None:
            # In place: a block's float32 working set is the block and its delta, nothing more.
            lora.add_delta_rows(block, start, stop)
            if factor is not None:
                block.mul_(factor[start:stop].view(-1, 1) if lora.out_major else factor.view(1, -1))
        if pristine is not None:
            if lora.out_major:
                rows = untouched[start:stop]
                block[rows] = pristine[rows]
            else:
                block[:, untouched] = pristine[:, untouched]
        if recipe.bias_add is not None:
            block = block + recipe.bias_add.to(device)
        if recipe.tokens is not None:
            indices, rows = recipe.tokens
            for position, index in enumerate(indices):
                if start <= index < stop:
                    block[index - start] = rows[position].float()
        return block

    for start, stop in row_blocks(info):
        block = merged(start, stop)
        yield (block.to(out_dtype) if out_dtype is not None else block).cpu()


def _dora_factor(recipe: TensorRecipe, read, device: torch.device) -> torch.Tensor:
    """magnitude / ||W + delta|| with the norm taken per output feature, as PEFT's DoRA merge does."""
    lora = recipe.lora
    assert lora is not None and lora.magnitude is not None

    def rows(start: int, stop: int) -> torch.Tensor:
        block = read(start, stop).to(device=device, dtype=torch.float32, copy=True)
        lora.add_delta_rows(block, start, stop)
        return block

    if lora.out_major:
        norm = torch.cat([torch.linalg.norm(rows(s, e), dim=1) for s, e in row_blocks(recipe.info)])
    else:
        # Output features are the stored columns here: accumulate their squares over row blocks.
        sumsq = torch.zeros(recipe.info.shape[1], dtype=torch.float64, device=device)
        for s, e in row_blocks(recipe.info):
            sumsq += rows(s, e).double().square().sum(dim=0)
        norm = sumsq.sqrt().float()
    return lora.magnitude.to(device) / norm


@dataclass
class Plan:
    recipes: list[TensorRecipe]
    vocab_size: int | None
    tie_word_embeddings: bool | None
    notes: list[str]


def _resolve(base: BaseWeights, param: str, prefix: str, layout: Layout | None = None) -> str | None:
    """The checkpoint name of a model parameter: as it is, without or with the base model prefix, or renamed the way
    transformers renames it on load (layout)."""
    if layout is not None and layout.disk(param) != param:
        return _resolve(base, layout.disk(param), prefix)
    if param in base.where:
        return param
    if prefix and param.startswith(prefix + ".") and param[len(prefix) + 1:] in base.where:
        return param[len(prefix) + 1:]
    if prefix and f"{prefix}.{param}" in base.where:
        return f"{prefix}.{param}"
    return None


def build_plan(base: BaseWeights, adapter: Adapter, arch: Architecture, quant: QuantSpec | None,
               device: torch.device) -> Plan:
    prefix, in_emb, out_emb = arch.prefix, arch.input_embedding, arch.output_embedding
    tied = bool(arch.tie_word_embeddings) and in_emb is not None and out_emb is not None
    notes: list[str] = []

    recipes: dict[str, TensorRecipe] = {}  # keyed by disk name; insertion order = base order
    param_of: dict[str, str] = {}
    for disk in base.names():
        recipes[disk] = TensorRecipe(disk, disk, base.info(disk))

    def recipe_for(param: str) -> TensorRecipe:
        disk = _resolve(base, param, prefix, arch.layout)
        if disk is None:
            raise MergeError(f"the adapter changes {param}, which is not in the base checkpoint "
                             f"{base.folder}; is this the base the adapter was trained on?")
        param_of[disk] = param
        return recipes[disk]

    out_weight = f"{out_emb}.weight" if out_emb else None
    in_weight = f"{in_emb}.weight" if in_emb else None
    out_on_disk = out_weight is not None and _resolve(base, out_weight, prefix, arch.layout) is not None
    # A tied checkpoint stores only the input embedding; the output head is then a second recipe on the same source.
    lm_head_recipe: TensorRecipe | None = None
    if tied and not out_on_disk:
        source = _resolve(base, in_weight, prefix, arch.layout)
        lm_head_recipe = TensorRecipe(out_weight, source, base.info(source))

    def target_recipe(param: str) -> TensorRecipe:
        if lm_head_recipe is not None and param == out_weight:
            return lm_head_recipe
        return recipe_for(param)

    for param, tensor in list(adapter.replacements.items()):
        recipe = target_recipe(param)
        if param in adapter.base_copies and recipe.source is not None and recipe.info.shape == tuple(tensor.shape) \
                and torch.equal(tensor.to(recipe.info.dtype), base.read(recipe.source)):
            del adapter.replacements[param]  # an unchanged copy of the base weight: nothing to replace
            continue
        recipe.replacement = tensor
        recipe.info = TensorInfo(recipe.out_name, recipe.info.dtype, tuple(tensor.shape))
    for module, target in adapter.targets.items():
        recipe = target_recipe(f"{module}.weight")
        recipe.lora = target
        if target.bias is not None:
            recipe_for(f"{module}.bias").bias_add = target.bias
    for module, tokens in adapter.trainable_tokens.items():
        target_recipe(f"{module}.weight").tokens = tokens
        # PEFT ties trainable tokens of the input embedding to a tied output embedding.
        if tied and module == in_emb and out_emb not in adapter.trainable_tokens:
            target_recipe(out_weight).tokens = tokens
    if quant is not None:
        for module in quant.modules:
            recipe_for(f"{module}.weight").quant = quant

    for recipe in recipes.values():
        if recipe.lora is not None and tuple(recipe.info.shape) != _lora_shape(recipe.lora):
            raise MergeError(f"{recipe.out_name}: base shape {recipe.info.shape} does not fit the adapter's LoRA "
                             f"factors for {recipe.lora.module}; the adapter belongs to another base model.")

    ordered = list(recipes.values())
    tie_out = arch.tie_word_embeddings
    if tied:
        in_recipe = target_recipe(in_weight)
        out_recipe = target_recipe(out_weight)
        if _same_value(in_recipe, out_recipe, base, device):
            if lm_head_recipe is None:
                notes.append("input and output embeddings stay tied")
        else:
            # The adapter changed one embedding but not the other: base+adapter computes with two different
            # matrices, so the merged model must store both and stop tying them.
            tie_out = False
            notes.append("input and output embeddings untied: the adapter changes only one of them")
            if lm_head_recipe is not None:
                ordered.append(lm_head_recipe)
    vocab = _vocab_after(recipes, in_weight, prefix, base, arch.vocab_size)
    return Plan(ordered, vocab, tie_out, notes)


def _lora_shape(target: LoraTarget) -> tuple[int, int]:
    if target.kind == "linear":
        return (target.B.shape[0], target.A.shape[1])
    return (target.A.shape[1], target.B.shape[0])


def _same_value(a: TensorRecipe, b: TensorRecipe, base: BaseWeights, device: torch.device) -> bool:
    if a is b or (not a.touched and not b.touched and a.source == b.source):
        return True
    if a.info.shape != b.info.shape:
        return False
    if a.lora is None and b.lora is None and a.source == b.source and a.tokens is b.tokens \
            and a.bias_add is None and b.bias_add is None and a.quant is b.quant \
            and (a.replacement is b.replacement or (a.replacement is not None and b.replacement is not None
                                                    and torch.equal(a.replacement, b.replacement))):
        return True
    for left, right in zip(compute_blocks(a, base, None, device), compute_blocks(b, base, None, device)):
        if not torch.allclose(left, right, rtol=1e-6, atol=1e-7):
            return False
    return True


def _vocab_after(recipes, in_weight, prefix, base, vocab: int | None) -> int | None:
    disk = _resolve(base, in_weight, prefix) if in_weight else None
    if disk is not None and recipes[disk].replacement is not None:
        return int(recipes[disk].info.shape[0])
    return vocab

