"""Check that a merged model computes what base+adapter (PEFT, unmerged) computes, on fixed probe inputs.

Both models run in float32, so the comparison measures the merge (including the one rounding of each merged weight
to its stored dtype), not the arithmetic of a half-precision forward pass.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

PROBE_TEXTS = ("The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,")
CHAT_PROBE = [{"role": "user", "content": "Say hello in three words."}]
GREEDY_TOKENS = 8
# Largest acceptable |logit difference|, relative to the largest reference logit (at least 1). float32 merges agree
# to rounding noise; half-precision ones carry one rounding of every merged weight (2^-9 relative for bfloat16).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _probes(merged_dir: Path, vocab: int) -> list[list[int]]:
    probes: list[list[int]] = []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    except Exception:  # a model without a usable tokenizer is still checked on token-id probes
        tokenizer = None
    if tokenizer is not None:
        for text in PROBE_TEXTS:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if ids:
                probes.append([i for i in ids if i < vocab] or [0])
        if getattr(tokenizer, "chat_template", None):
            with _quiet():
                ids = tokenizer.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            probes.append([i for i in ids if i < vocab] or [0])
    generator = torch.Generator().manual_seed(0)
    probes.append(torch.randint(0, vocab, (16,), generator=generator).tolist())
    return probes


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_reference(base_dir, adapter_dir, vocab_size, patches, device, trust_remote_code):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with _quiet():
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

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    return model.to(device).eval()


@torch.no_grad()
def _logits(model, ids: list[int], device) -> torch.Tensor:
    return model(torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()


@torch.no_grad()
def _run(model, ids: list[int], device) -> tuple[torch.Tensor, list[int]]:
    """Logits over the prompt, and GREEDY_TOKENS greedy continuations (with the KV cache: one token per step)."""
    out = model(torch.tensor([ids], device=device), use_cache=True)
    logits = out.logits[0].float().cpu()
    past, new = out.cache, [int(logits[-1].argmax())]
    for _ in range(GREEDY_TOKENS - 1):
        out = model(torch.tensor([[new[-1]]], device=device), cache=past, use_cache=True)
        past = out.cache
        new.append(int(out.logits[0, -1].argmax()))
    return logits, new


def verify_merge(merged_dir: Path, base_dir: Path, adapter_dir: Path, *, output_dtype: str, vocab_size: int | None,
                 patches: dict[str, torch.Tensor], device: torch.device, trust_remote_code: bool) -> dict[str, Any]:
    merged = _load_merged(merged_dir, device, trust_remote_code)
    vocab = merged.get_input_embeddings().weight.shape[0]
    probes = _probes(merged_dir, vocab)
    merged_logits, merged_greedy = zip(*(_run(merged, p, device) for p in probes))
    del merged
    gc.collect()
    reference = _load_reference(base_dir, adapter_dir, vocab_size, patches, device, trust_remote_code)
    reference_logits, reference_greedy = zip(*(_run(reference, p, device) for p in probes))

    compared = compare_logits(merged_logits, reference_logits, output_dtype)
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


def compare_logits(merged: list[torch.Tensor], reference: list[torch.Tensor], output_dtype: str) -> dict[str, Any]:
    """Max |logit difference| against a tolerance relative to the largest reference logit, and top-1 agreement,
    where a different top-1 is acceptable only where the reference itself is within tolerance of a tie."""
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    tolerance = RELATIVE_TOLERANCE[output_dtype] * scale
    max_diff = max(float((m - r).abs().max()) for m, r in zip(merged, reference))
    agree = total = hard = 0
    for m, r in zip(merged, reference):
        top_m, top_r = m.argmax(-1), r.argmax(-1)
        total += len(top_r)
        agree += int((top_m == top_r).sum())
        gap = r.gather(-1, top_r[:, None]) - r.gather(-1, top_m[:, None])
        hard += int(((top_m != top_r) & (gap[:, 0] > tolerance)).sum())
    return {"max_abs_logit_diff": max_diff, "tolerance": tolerance, "top1_agreement": agree / total,
            "top1_disagreements_beyond_tolerance": hard, "within_tolerance": max_diff <= tolerance and hard == 0}


def _near_tie(reference, prompt, merged_seq, reference_seq, tolerance, device) -> bool:
    for step, (m, r) in enumerate(zip(merged_seq, reference_seq)):
        if m != r:
            logits = _logits(reference, list(prompt) + reference_seq[:step], device)[-1]
            return float(logits[r] - logits[m]) <= tolerance
    return True
