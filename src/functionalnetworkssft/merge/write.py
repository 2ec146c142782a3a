"""Writing the merged model: the weight shards (streamed from the plan), config.json and generation_config.json
consistent with them, and the tokenizer files copied byte for byte, all into a staging folder that is renamed into
place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft import tokenizer_files
from functionalnetworkssft.merge.adapter import Adapter
from functionalnetworkssft.merge.io import BaseWeights, PlannedTensor, TensorInfo, plan_shards, write_shards
from functionalnetworkssft.merge.plan import Plan, compute_blocks
from functionalnetworkssft.merge.report import MergeReport
from functionalnetworkssft.records import MERGE_REPORT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "processor_config.json")


def write_merged(plan: Plan, base: BaseWeights, adapter: Adapter, staging: Path, base_dir: Path, dtype: str,
                  max_shard_bytes: int, device: torch.device) -> MergeReport:
    from tqdm.auto import tqdm

    staging.mkdir(parents=True)
    planned: list[PlannedTensor] = []
    float_dtypes: dict[torch.dtype, int] = {}
    for recipe in plan.recipes:
        in_dtype = recipe.info.dtype
        out_dtype = DTYPES[dtype] if dtype != "auto" and in_dtype.is_floating_point else in_dtype
        out_info = TensorInfo(recipe.out_name, out_dtype, recipe.info.shape)
        if out_dtype.is_floating_point:
            float_dtypes[out_dtype] = float_dtypes.get(out_dtype, 0) + recipe.info.numel
        if not recipe.touched and out_dtype == in_dtype and base.raw_copyable(recipe.source):
            planned.append(PlannedTensor(out_info, lambda fd, name=recipe.source: base.copy_raw(name, fd), raw=True))
        else:
            planned.append(PlannedTensor(
                out_info, lambda r=recipe, d=out_dtype: compute_blocks(r, base, d, device)))
    shards = plan_shards(planned, max_shard_bytes)
    with tqdm(total=len(planned), unit="tensor", desc="merging", leave=False, disable=None) as progress:
        index = write_shards(staging, shards, progress)
    dtype_name = dtype if dtype != "auto" else str(max(float_dtypes, key=float_dtypes.get)).removeprefix("torch.")
    config = write_config(base_dir, staging, plan, dtype_name)
    tokenizer_from = _copy_side_files(base_dir, adapter.folder, staging, config)
    variants = sorted({"dora" if t.magnitude is not None else "lora" for t in adapter.targets.values()}
                      | ({"rslora"} if adapter.config.get("use_rslora") else set())
                      | ({"lora_bias"} if any(t.bias is not None for t in adapter.targets.values()) else set())
                      | ({"fan_in_fan_out"} if any(t.kind == "conv1d" for t in adapter.targets.values()) else set())
                      | ({"trainable_tokens"} if adapter.trainable_tokens else set())
                      | ({"rank_pattern"} if adapter.config.get("rank_pattern") else set())
                      | ({"alpha_pattern"} if adapter.config.get("alpha_pattern") else set()))
    return MergeReport(
        output_dir="", base_model="", adapter_path="", dtype=dtype_name, lora_modules=len(adapter.targets),
        variants=variants, replaced_tensors=sorted(adapter.replacements), tensors=len(planned), shards=len(shards),
        total_size=index["metadata"]["total_size"], vocab_size=plan.vocab_size,
        tie_word_embeddings=config.get("tie_word_embeddings"), tokenizer_from=tokenizer_from, notes=plan.notes,
        files=sorted({p.name for p in staging.iterdir()} | {MERGE_REPORT}))


def _copy_side_files(base_dir: Path, adapter_dir: Path, staging: Path, config_dict: dict[str, Any]) -> str:
    tokenizer_dir = adapter_dir if any((adapter_dir / f).is_file() for f in ("tokenizer_config.json",
                                                                               "tokenizer.json")) else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            # Copied, not re-saved: re-saving a tokenizer under transformers 5 can drop its chat template.
            shutil.copyfile(tokenizer_dir / name, staging / name)
    tokenizer_files.carry(base_dir, staging)  # what an adapter saved by transformers 5 lacks (tokenizer.model)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", staging / "generation_config.json")
    else:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config_dict)).save_pretrained(staging)
    if config_dict.get("auto_map"):
        for module_file in base_dir.glob("*.py"):
            shutil.copyfile(module_file, staging / module_file.name)
    return "adapter" if tokenizer_dir == adapter_dir else "base"


def write_config(base_dir: Path, staging: Path, plan: Plan, dtype_name: str) -> dict[str, Any]:
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype_name
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for key, value in (("vocab_size", plan.vocab_size), ("tie_word_embeddings", plan.tie_word_embeddings)):
        if value is None:
            continue
        if key in config or text is None or key not in text:
            config[key] = value
        if text is not None and key in text:
            text[key] = value
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def move_into_place(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.replaced-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


