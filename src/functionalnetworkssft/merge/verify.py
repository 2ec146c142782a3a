"""Check that a merged model computes what base+adapter (PEFT, unmerged) computes, on fixed probe inputs.

Both models run in float32, so the comparison measures the merge (including the one rounding of each merged weight
to its stored dtype), not the arithmetic of a half-precision forward pass.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft.verification import GREEDY_TOKENS, compare_logits, probe_inputs, quiet, run_probe

# Largest acceptable |logit difference|, relative to the largest reference logit (at least 1). float32 merges agree
# to rounding noise; half-precision ones carry one rounding of every merged weight (2^-9 relative for bfloat16).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _load_reference(base_dir, adapter_dir, vocab_size, patches, device, trust_remote_code):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        rows = model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size != rows:
            # The adapter carries resized embeddings; PEFT loads them into a base resized the same way.
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        if patches:
            state = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in patches.items():
                    state[name].data.copy_(value.float())
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.to(device).eval()


def _load_merged(merged_dir, device, trust_remote_code):
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    return model.to(device).eval()


@torch.no_grad()
def _logits(model, ids: list[int], device) -> torch.Tensor:
    return model(torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()


def verify_merge(merged_dir: Path, base_dir: Path, adapter_dir: Path, *, output_dtype: str, vocab_size: int | None,
                 patches: dict[str, torch.Tensor], device: torch.device, trust_remote_code: bool) -> dict[str, Any]:
    merged = _load_merged(merged_dir, device, trust_remote_code)
    vocab = merged.get_input_embeddings().weight.shape[0]
    probes = probe_inputs(merged_dir, vocab)
    merged_logits, merged_greedy = zip(*(run_probe(merged, p, device) for p in probes))
    del merged
    gc.collect()
    reference = _load_reference(base_dir, adapter_dir, vocab_size, patches, device, trust_remote_code)
    reference_logits, reference_greedy = zip(*(run_probe(reference, p, device) for p in probes))

    compared = compare_logits(merged_logits, reference_logits, RELATIVE_TOLERANCE[output_dtype])
    tolerance = compared["tolerance"]
    greedy_equal = list(merged_greedy) == list(reference_greedy)
    greedy_ok = greedy_equal
    if not greedy_equal:
        greedy_ok = all(_near_tie(reference, p, mg, rg, tolerance, device)
                        for p, mg, rg in zip(probes, merged_greedy, reference_greedy))
    del reference
    gc.collect()
    passed = compared.pop("within_tolerance") and greedy_ok
    return {
        "status": "passed" if passed else "failed",
        "compute_dtype": "float32",
        "output_dtype": output_dtype,
        **compared,
        "greedy_equal": greedy_equal,
        "greedy_ok": greedy_ok,
        "greedy_new_tokens": GREEDY_TOKENS,
        "probes": [hashlib.sha256(json.dumps(p).encode()).hexdigest() for p in probes],
        "probe_tokens": [len(p) for p in probes],
    }


def _near_tie(reference, prompt, merged_seq, reference_seq, tolerance, device) -> bool:
    for step, (m, r) in enumerate(zip(merged_seq, reference_seq)):
        if m != r:
            logits = _logits(reference, list(prompt) + reference_seq[:step], device)[-1]
            return float(logits[r] - logits[m]) <= tolerance
    return True
