"""Merge a LoRA adapter into its base model (interim: PEFT merge_and_unload; replaced by the streaming engine)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from functionalnetworkssft.errors import MergeError


@dataclass
class MergeReport:
    base_model: str
    adapter_path: str
    dtype: str
    verified: bool | None = None

    def summary(self) -> str:
        return f"merged {self.adapter_path} into {self.base_model} ({self.dtype})"


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, base_model: str | None = None,
                  dtype: str = "auto", max_shard_size: str = "5GB", verify: str = "auto", device: str = "cpu",
                  qlora_merge_base: str = "original", trust_remote_code: bool = False) -> MergeReport:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base_model = base_model or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    load_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=load_dtype, trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise MergeError(f"could not merge {adapter_dir} into {base_model}: {exc}") from exc
    merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    report = MergeReport(str(base_model), str(adapter_dir), str(merged.dtype).removeprefix("torch."))
    (output_dir / "merge_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def main(argv: list[str] | None, prog: str = "fnsft merge") -> None:
    raise MergeError("fnsft merge arrives with the streaming merge engine.")
