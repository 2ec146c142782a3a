"""What verifying one model against another needs, whatever produced it (a merge, a GGUF export): probe inputs,
quiet model runs with a greedy continuation, and the logit comparison."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft.chat_rendering import bounded

PROBE_TEXTS = ("The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,")
CHAT_PROBE = [{"role": "user", "content": "Say hello in three words."}]
GREEDY_TOKENS = 8


def probe_inputs(model_dir: Path, vocab: int) -> list[list[int]]:
    """Token-id probes: fixed texts and a chat prompt through the model folder's own tokenizer, and random ids."""
    probes: list[list[int]] = []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # a model without a usable tokenizer is still checked on token-id probes
        tokenizer = None
    if tokenizer is not None:
        for text in PROBE_TEXTS:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if ids:
                probes.append([i for i in ids if i < vocab] or [0])
        if getattr(tokenizer, "chat_template", None):
            with quiet(), bounded(tokenizer):
                ids = tokenizer.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            probes.append([i for i in ids if i < vocab] or [0])
    generator = torch.Generator().manual_seed(0)
    probes.append(torch.randint(0, vocab, (16,), generator=generator).tolist())
    return probes


@contextlib.contextmanager
def quiet():
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


@torch.no_grad()
def run_probe(model, ids: list[int], device) -> tuple[torch.Tensor, list[int]]:
    """Logits over the prompt, and GREEDY_TOKENS greedy continuations (with the KV cache: one token per step)."""
    out = model(torch.tensor([ids], device=device), use_cache=True)
    logits = out.logits[0].float().cpu()
    past, new = out.cache, [int(logits[-1].argmax())]
    for _ in range(GREEDY_TOKENS - 1):
        out = model(torch.tensor([[new[-1]]], device=device), cache=past, use_cache=True)
        past = out.cache
        new.append(int(out.logits[0, -1].argmax()))
    return logits, new


def compare_logits(merged: list[torch.Tensor], reference: list[torch.Tensor],
                   relative_tolerance: float) -> dict[str, Any]:
    """Max |logit difference| against `relative_tolerance` times the largest reference logit (at least 1), and top-1
    agreement, where a different top-1 is acceptable only where the reference itself is within tolerance of a tie."""
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    tolerance = relative_tolerance * scale
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
