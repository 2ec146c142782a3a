"""The general text the probe measures on and the guards train on: the user's (--forgetting_dataset) or, by
default, text the base model writes itself from neutral prompts, cut into fixed windows. The probe's windows and
the guard's stream never share an n-gram: a guard that trained on the text that measures it would prove nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.paths import cache_dir

WINDOW_TOKENS = 96
# The probe reads 16 windows of 64 tokens: 1,008 predicted tokens, in two forwards of 8 short rows (what that costs
# at the quickstart's settings is measured by benchmarks/forgetting_cost.py).
PROBE_TOKENS = 64
PROBE_WINDOWS = 16
GUARD_WINDOWS = 64
MAX_TEXT_CHARS = 4_000_000
MAX_ROWS = 20_000  # of a dataset given as --forgetting_dataset: about as many tokens as MAX_TEXT_CHARS
# Windows that share an n-gram of this many tokens with a probe window are dropped from the guard's stream: 13, the
# contamination test of the GPT-3 paper, long enough that common phrases do not count as shared text.
NGRAM = 13
# Neutral requests across everyday domains: the base answers them in its own words, in its own language and style,
# which is what a fine-tune should leave as it was. Never the user's training data.
PROMPTS = (
    "Explain how bread rises.", "Describe a busy train station in the morning.", "What causes the seasons?",
    "Give some advice for a first job interview.", "Tell a short story about a lost umbrella.",
    "How does a bicycle stay upright?", "Summarise the history of the printing press.",
    "Write a polite email declining an invitation.", "Why do cats purr?", "Explain compound interest simply.",
    "Describe the water cycle.", "What should I pack for a weekend hike?", "How do vaccines work?",
    "Write a few lines about the sea at night.", "Compare tea and coffee.", "How is a bill passed into law?",
    "Explain what a prime number is.", "Describe how to plant a tomato seedling.", "What is photosynthesis?",
    "Write a thank-you note to a teacher.", "How do airplanes fly?", "Describe your favourite kind of weather.",
    "What are the rules of chess, briefly?", "Explain why the sky is blue.",
)


@dataclass
class GeneralText:
    """Fixed windows of general text: `probe` measures, `stream` guards; `origin` says where they came from."""

    probe: list[list[int]]
    stream: list[list[int]]
    origin: str
    dropped: int = 0  # stream windows removed for sharing an n-gram with the probe


def cut(ids: list[int], size: int = WINDOW_TOKENS) -> list[list[int]]:
    """Consecutive full windows of `size` tokens (a shorter tail is left out: every window weighs the same)."""
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def ngrams(window: list[int], n: int = NGRAM) -> set[tuple[int, ...]]:
    return {tuple(window[i:i + n]) for i in range(len(window) - n + 1)}


def disjoint(candidates: list[list[int]], evaluation: list[list[int]], n: int = NGRAM) -> tuple[list[list[int]], int]:
    """The candidates that share no n-gram of `n` tokens with any evaluation window, and how many were dropped."""
    held = set().union(*(ngrams(w, n) for w in evaluation)) if evaluation else set()
    kept = [w for w in candidates if not (ngrams(w, n) & held)]
    return kept, len(candidates) - len(kept)


def split(windows: list[list[int]], origin: str, probe_count: int = PROBE_WINDOWS) -> GeneralText:
    """The first windows (spread over the text) measure; the rest, once filtered against them, guard."""
    if len(windows) < 2:
        raise UsageError(f"--forgetting_dataset {origin}: its text makes {len(windows)} window(s) of {WINDOW_TOKENS} "
                         f"tokens, and the probe and guard need at least 2 (about {2 * WINDOW_TOKENS} tokens); give "
                         "more text.")
    count = min(probe_count, max(1, len(windows) // 4)) if len(windows) < 4 * probe_count else probe_count
    step = len(windows) / count
    chosen = {int(i * step) for i in range(count)}
    probe = [w for i, w in enumerate(windows) if i in chosen]
    stream, dropped = disjoint([w for i, w in enumerate(windows) if i not in chosen], probe)
    return GeneralText([w[:PROBE_TOKENS] for w in probe], stream, origin, dropped)


def from_file(path: str, tokenizer, max_length: int) -> list[list[int]]:
    """Windows of a --forgetting_dataset: a plain text file (any name but a data file's) as it is, or data in any
    training format, rendered as training renders it (chat template included) and joined. Either way only the start
    is read: the probe needs about 1,000 tokens and the guard cycles through what it has."""
    from functionalnetworkssft import data
    from functionalnetworkssft.errors import FnsftError

    local = Path(path).expanduser()
    if local.exists() and not local.is_dir() and not data.is_data_file(local):
        if not local.is_file():  # a FIFO or device that a read would wait on or never finish
            raise UsageError(f"--forgetting_dataset {path}: not a regular file; give a text file or a dataset.")
        with open(local, encoding="utf-8", errors="replace") as handle:
            text = handle.read(MAX_TEXT_CHARS)
        if "\x00" in text:
            raise UsageError(f"--forgetting_dataset {path}: a binary file, not text; give a text file or a dataset.")
        return cut(tokenizer(text, add_special_tokens=False)["input_ids"])
    try:
        raw = data.load_sources([data.Source(path, None, None)], None, 0.0, 0, "text")
        rows = raw.train.select(range(min(len(raw.train), MAX_ROWS)))
        tokenized, _ = data.tokenize(dataclasses.replace(raw, train=rows, validation=None), tokenizer, max_length,
                                     True, None)
    except FnsftError as exc:  # said as the training data's problem, it would send the user to the wrong file
        raise type(exc)(f"--forgetting_dataset: {exc}") from None
    joined: list[int] = []
    for ids in tokenized["input_ids"]:
        joined.extend(ids)
    return cut(joined)


def generated(model, tokenizer, count: int, seed: int, fingerprint: str,
              length: int = WINDOW_TOKENS) -> list[list[int]]:
    """`count` windows of `length` tokens the base writes from the neutral prompts, sampled at temperature 1 (its
    own distribution, so the KL measured on them estimates how far the tuned model's writing drifts from the
    base's). Cached under the model's fingerprint: a rerun on the same base reads them back."""
    # The prompts are rendered with the chat template, which --chat_template_path can change on the same model.
    template = getattr(tokenizer, "chat_template", None)
    key = hashlib.sha256(json.dumps([fingerprint, count, seed, length, PROMPTS, template], default=str).encode()
                         ).hexdigest()[:20]
    cached = cache_dir() / "general_text" / f"{key}.json"
    try:
        if not cached.is_file():  # missing, or something planted that a read would wait on
            raise FileNotFoundError(cached)
        windows = json.loads(cached.read_text())
        vocabulary = len(tokenizer)
        if isinstance(windows, list) and len(windows) == count and all(
                isinstance(w, list) and len(w) == length
                and all(isinstance(t, int) and 0 <= t < vocabulary for t in w) for w in windows):
            return windows
    except (OSError, ValueError, RecursionError):
        pass  # missing, damaged or forged: written again below
    windows = _sample(model, tokenizer, count, seed, length)
    from functionalnetworkssft import distributed
    from functionalnetworkssft.outputs import write_text_atomic

    if distributed.is_main():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, json.dumps(windows))
        except OSError:
            pass  # a cache only saves time
    return windows


def _sample(model, tokenizer, count: int, seed: int, length: int) -> list[list[int]]:
    import torch

    from functionalnetworkssft import data
    from functionalnetworkssft.generate import context_length

    device = next(model.parameters()).device
    windows: list[list[int]] = []
    # The run's own randomness (CPU and the model's GPU) is what it would have been without this text.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _mode(model, training=False):
        torch.manual_seed(seed)
        for start in range(0, count, 8):
            prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(min(8, count - start))]
            rows = [data.render_prompt_ids(tokenizer, [{"role": "user", "content": p}])
                    if data.has_chat_template(tokenizer) else tokenizer(p)["input_ids"] for p in prompts]
            width = max(len(r) for r in rows)
            limit = context_length(model)
            if limit is not None and width + length > limit:
                raise UsageError(f"the model reads at most {limit} tokens, too few to write the forgetting probe's "
                                 f"text ({width} prompt and {length} new tokens); give --forgetting_dataset, or use "
                                 "--forgetting_probe off and no kl or replay guard.")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left-padded
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                     top_k=0, max_new_tokens=length, min_new_tokens=length,
                                     pad_token_id=pad, eos_token_id=None)
            windows.extend(out[:, width:width + length].tolist())
    return windows


@contextlib.contextmanager
def _mode(model, training: bool):
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)
