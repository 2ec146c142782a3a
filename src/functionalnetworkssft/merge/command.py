"""`fnsft merge` on the command line: flags, then the merge. Light on purpose: the input files start hashing on a
spare core here, before the merge engine's libraries (torch) load."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.merge.architecture import declares_quantization
from functionalnetworkssft.merge.inputs import hash_inputs_ahead
from functionalnetworkssft.options import Options, arg, field_problems, parse
from functionalnetworkssft.records import TRAINING_RECORD


@dataclass
class MergeConfig(Options):
    """Merge a PEFT LoRA adapter into its base model, streaming one tensor at a time, and verify the result."""

    adapter_path: str = arg("Folder of the PEFT LoRA adapter (adapter_config.json + adapter weights).")
    output_dir: str = arg("Folder for the merged model; written beside it first and renamed into place when done.")
    base_model_name_or_path: str | None = arg(
        "Base model folder or Hub id. Default: base_model_name_or_path from adapter_config.json.", default=None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "Dtype of the merged floating-point tensors. auto keeps each tensor's own dtype (no fp32 blow-up).",
        default="auto")
    max_shard_size: str = arg("Largest output shard, e.g. 5GB (10^9 bytes) or 2GiB.", default="5GB")
    verify: Literal["auto", "on", "full", "off"] = arg(
        "Compare the merged model with base+adapter (PEFT, unmerged) on probe inputs after writing. auto or on: one "
        "decoder block at a time, one weight matrix in memory at any model size; full: both models loaded whole, "
        "also comparing greedy decoding (small models); off: no check.", default="auto")
    device: Literal["cpu", "cuda"] = arg("Where deltas are computed and verification runs.", default="cpu")
    qlora_merge_base: Literal["original", "dequantized"] = arg(
        "For adapters trained on a 4/8-bit base (fnsft_training.json): merge into the original weights, or into "
        "the quantization round trip of exactly the layers that were quantized in training.", default="original")
    trust_remote_code: bool = arg("Allow model code from the base's repository to run (to read its architecture).",
                                  default=False)


def _without_bitsandbytes() -> None:
    """PEFT imports bitsandbytes when it is installed, to know its quantized layers: 1.15 s of this process's
    start-up (measured on 2 cores) and 46 MB, for layers that a merge of an adapter not trained on a quantized base
    never meets. This process runs only the merge, so bitsandbytes is hidden from it (an import then finds nothing,
    as if it were not installed)."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def main(argv: list[str] | None, prog: str = "fnsft merge") -> None:
    config = parse(MergeConfig, argv, prog)
    problems = field_problems(config)
    if problems:
        raise UsageError(problems)
    hash_inputs_ahead(Path(config.adapter_path), config.base_model_name_or_path)
    if not declares_quantization(Path(config.adapter_path) / TRAINING_RECORD):
        _without_bitsandbytes()
    from functionalnetworkssft.merge.run import merge_adapter

    report = merge_adapter(config.adapter_path, config.output_dir, base_model=config.base_model_name_or_path,
                           dtype=config.dtype, max_shard_size=config.max_shard_size, verify=config.verify,
                           device=config.device, qlora_merge_base=config.qlora_merge_base,
                           trust_remote_code=config.trust_remote_code)
    print(report.summary())
