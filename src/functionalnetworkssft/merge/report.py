"""What a merge did and how its verification went: printed as one line, saved as merge_report.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MergeReport:
    output_dir: str
    base_model: str
    adapter_path: str
    dtype: str
    lora_modules: int = 0
    variants: list[str] = field(default_factory=list)
    replaced_tensors: list[str] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    total_size: int = 0
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    qlora: dict[str, Any] | None = None
    tokenizer_from: str | None = None
    seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=lambda: {"status": "off"})
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Every file of the merged folder: a later merge replaces the folder only if it holds nothing else.
    files: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        status = self.verification.get("status")
        return True if status == "passed" else False if status == "failed" else None

    def summary(self) -> str:
        size = f"{self.total_size / 1e9:.2f} GB" if self.total_size >= 1e8 else f"{self.total_size / 1e6:.1f} MB"
        extra = f" + {len(self.replaced_tensors)} replaced tensors" if self.replaced_tensors else ""
        qlora = f", QLoRA base: {self.qlora['merge_base']}" if self.qlora else ""
        line = (f"merged {self.lora_modules} LoRA modules{extra} into {self.base_model} -> {self.output_dir} "
                f"({self.dtype}, {self.shards} shard{'s' if self.shards != 1 else ''}, {size}{qlora}) "
                f"in {self.seconds:.1f} s; ")
        v = self.verification
        if "max_abs_logit_diff" in v:
            streamed = v.get("mode") == "streaming"
            line += (f"verification {v['status']}" + (f" ({v['blocks_verified']} blocks streamed)" if streamed else "")
                     + f": max |logit diff| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']:.1e}), top-1 "
                     f"agreement {v['top1_agreement']:.1%}")
            if not streamed:
                greedy = "equal" if v["greedy_equal"] else "near-tie only" if v.get("greedy_ok") else "DIFFERENT"
                line += f", greedy {greedy}"
            if v.get("first_failing_block"):
                line += f"; first differing block {v['first_failing_block']}"
                if v.get("first_failing_tensor"):
                    line += f", tensor {v['first_failing_tensor']}"
        else:
            line += f"verification {v.get('status')}" + (f": {v['reason']}" if v.get("reason") else "")
        return line

