"""Rendering examples with the chat template and tokenizing them with an assistant mask; `tokenize` does it for
whole training and validation sets, in parallel and through the cache, and reports what it changed.

The loss mask is derived by rendering conversation prefixes, which works for any chat template without
`{% generation %}` markers, and trains every assistant turn of a multi-turn chat.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from functionalnetworkssft.chat_rendering import TemplateProblem, bounded, check_size
from functionalnetworkssft.data.cache import cache_key, read_cache, write_cache
from functionalnetworkssft.data.formats import chat_messages
from functionalnetworkssft.data.report import (
    NOTE_LAST_TURN,
    NOTE_NO_ASSISTANT,
    NOTE_TEMPLATE,
    NOTE_WHOLE,
    arrow_column,
    report_notes,
    with_trained_tokens,
)
from functionalnetworkssft.data.sources import RawData
from functionalnetworkssft.errors import DataError, first_line

log = logging.getLogger("functionalnetworkssft.data")

# Below this many examples, starting worker processes costs more than it saves.
PARALLEL_FROM = 2000


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next reply, as at inference."""
    if has_chat_template(tokenizer):
        try:
            with bounded(tokenizer):
                text = check_size(tokenizer, [tokenizer.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)])[0]
        except TemplateProblem:
            raise
        except Exception as exc:  # a template that does not compile, or raises on these messages
            raise DataError(f"the model's chat template cannot render this conversation: {first_line(exc)}; fix "
                            "the template (chat_template.jinja) or the messages.") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # No template (GPT-2, DialoGPT): turns are joined by EOS, as DialoGPT was trained.
    ids: list[int] = []
    for message in messages:
        ids += tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def _render(tokenizer, messages: list[dict[str, Any]], tools: list | None = None, **kwargs) -> str:
    with bounded(tokenizer):
        return check_size(tokenizer, [tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                                    **kwargs)])[0]


def _segments(tokenizer, messages: list[dict[str, Any]], tools: list | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces whose concatenation is the full render.

    Each assistant turn spans from the end of the prompt that asks for it (prefix rendered with
    add_generation_prompt) to the end of the prefix that includes it, so the turn's closing tokens are trained.
    """
    def render(part, **kwargs):
        return _render(tokenizer, part, tools, **kwargs)

    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    return _pieces_from_renders(messages, turns, render(messages), [render(messages[: i + 1]) for i in turns],
                                [render(messages[:i], add_generation_prompt=True) for i in turns if i])


class _TemplateNotPrefixStable(Exception):
    """The chat template rewrites earlier turns depending on later ones (e.g. drops past reasoning)."""


def _last_turn_segments(tokenizer, messages, tools=None):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _render(tokenizer, messages[:last], tools, add_generation_prompt=True)
    full = _render(tokenizer, messages[: last + 1], tools)
    if not full.startswith(prompt):
        raise _TemplateNotPrefixStable
    return [(prompt, False), (full[len(prompt):], True)]


def tokenize_example(tokenizer, example: dict, train_on_prompt: bool, max_length: int) -> dict[str, Any]:
    """input_ids and assistant_masks (1 = the token is trained) for one normalised example, and a `_note` when the
    example was not tokenized as written (see the NOTE_* kinds)."""
    return tokenize_batch(tokenizer, [example], train_on_prompt, max_length)[0]


def tokenize_batch(tokenizer, examples: list[dict], train_on_prompt: bool, max_length: int) -> list[dict[str, Any]]:
    """`tokenize_example` for several examples at once, with the same result: the conversation prefixes of all of
    them are rendered in two chat-template calls (with and without the generation prompt) and every piece of text is
    tokenized in one tokenizer call, so per-call overhead is paid per batch, not per turn."""
    templated = has_chat_template(tokenizer)
    plans: list[Any] = []  # per example: (kind, payload)
    plain, prompted = [], []  # conversations to render, without and with the generation prompt
    for example in examples:
        if "text" in example and example.get("text") is not None:
            plans.append(("text", example["text"]))
            continue
        messages = chat_messages(example["messages"])
        tools = json.loads(example["tools"]) if example.get("tools") else None
        if not any(m["role"] == "assistant" for m in messages) and not train_on_prompt:
            plans.append(("done", {"input_ids": [], "assistant_masks": [], "_note": NOTE_NO_ASSISTANT}))
        elif not templated:
            plans.append(("turns", messages))
        elif tools is not None:
            plans.append(("slow", (messages, tools)))  # tools differ per example: one template call each
        else:
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            plans.append(("chat", (messages, turns, len(plain), len(prompted))))
            plain.append(messages)
            # A turn that ends the conversation renders to the full text: no render of its own is needed.
            plain += [messages[: i + 1] for i in turns if i < len(messages) - 1]
            prompted += [messages[:i] for i in turns if i]
    try:
        plain_text = _render_many(tokenizer, plain, False)
        prompted_text = _render_many(tokenizer, prompted, True)
    except TemplateProblem:  # too slow, too large or forbidden: one at a time would only take longer
        raise
    except Exception:  # a template that rejects one conversation: find which, one at a time
        plain_text = prompted_text = None
    texts: list[str] = []  # everything to tokenize, in one call
    layouts = []  # per example: (list of (first text index, count, trained, add eos)), note, or a finished result
    for kind, payload in plans:
        if kind == "done":
            layouts.append(payload)
            continue
        if kind == "text":
            layouts.append(([(len(texts), True, True)], ""))
            texts.append(payload)
            continue
        if kind == "turns":  # no template (GPT-2, DialoGPT): turns joined by EOS
            parts = []
            for message in payload:
                parts.append((len(texts), message["role"] == "assistant", True))
                texts.append(message["content"])
            layouts.append((parts, ""))
            continue
        if kind == "chat" and plain_text is not None:
            messages, turns, at_plain, at_prompted = payload
            full = plain_text[at_plain]
            own = iter(plain_text[at_plain + 1:at_plain + 1 + sum(1 for i in turns if i < len(messages) - 1)])
            uptos = [next(own) if i < len(messages) - 1 else full for i in turns]
            try:
                pieces = _pieces_from_renders(messages, turns, full, uptos,
                                              prompted_text[at_prompted:at_prompted + sum(1 for i in turns if i)])
                note = ""
            except _TemplateNotPrefixStable:
                pieces, note = _template_pieces(tokenizer, messages)
        else:
            messages, tools = (payload[0], None) if kind == "chat" else payload
            try:
                pieces, note = _template_pieces(tokenizer, messages, tools)
            except TemplateProblem:
                raise
            except Exception as exc:  # the template's own raise_exception, or any error inside the template
                layouts.append({"input_ids": [], "assistant_masks": [], "_note": NOTE_TEMPLATE + first_line(exc)[:200]})
                continue
        parts = []
        for text, trained in pieces:
            parts.append((len(texts), trained, False))
            texts.append(text)
        layouts.append((parts, note))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    results = []
    for layout, (kind, _) in zip(layouts, plans):
        if isinstance(layout, dict):
            results.append(layout)
            continue
        parts, note = layout
        ids: list[int] = []
        mask: list[int] = []
        for index, trained, add_eos in parts:
            piece = encoded[index] + ([eos] if add_eos else [])
            ids += piece
            mask += [int(trained)] * len(piece)
        if kind != "text":
            if train_on_prompt:
                mask = [1] * len(ids)
                note = ""
            # EOS closes every trained example: templates that end a turn with another token still teach the model
            # to stop. An example with nothing to train gets none, so it stays empty and is skipped.
            trained_tail = [t for t, m in zip(ids, mask) if m][-8:]
            if eos is not None and any(mask) and eos not in trained_tail:
                ids.append(eos)
                mask.append(1)
        if train_on_prompt:
            mask = [1] * len(ids)
        results.append({"input_ids": ids[:max_length], "assistant_masks": mask[:max_length], "_note": note})
    return results


def _render_many(tokenizer, conversations: list, generation_prompt: bool) -> list[str]:
    """Render several conversations at once, as apply_chat_template(tokenize=False) does. The messages here are plain
    dicts with no None values already (chat_messages), so transformers' renderer is called directly, without the
    per-call copy that makes apply_chat_template cost a quarter more; any other tokenizer goes through it."""
    if not conversations:
        return []
    with bounded(tokenizer, len(conversations)):
        try:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=conversations,
                                                chat_template=tokenizer.get_chat_template(),
                                                add_generation_prompt=generation_prompt,
                                                **tokenizer.special_tokens_map)
        except (ImportError, AttributeError, TypeError):
            rendered = tokenizer.apply_chat_template(conversations, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
            rendered = [rendered] if isinstance(rendered, str) else rendered
    return check_size(tokenizer, list(rendered))


def _pieces_from_renders(messages, turns: list[int], full: str, uptos: list[str], prompts: list[str]):
    """The (text, is_assistant) pieces of `_segments`, from renders made beforehand."""
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    prompt_iter = iter(prompts)
    for i, upto in zip(turns, uptos):
        prompt = next(prompt_iter) if i else ""
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor):
            raise _TemplateNotPrefixStable
        pieces += [(full[cursor:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        cursor = len(upto)
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


# Examples per chat-template call: large enough to pay the per-call overhead rarely, small enough to keep the
# progress bar moving and memory flat.
TOKENIZE_BATCH = 256


def _tokenize_columns(batch: dict[str, list], tokenizer, train_on_prompt: bool, max_length: int) -> dict[str, list]:
    examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
    results = tokenize_batch(tokenizer, examples, train_on_prompt, max_length)
    return {key: [r[key] for r in results] for key in ("input_ids", "assistant_masks", "_note")}


def _template_pieces(tokenizer, messages, tools=None) -> tuple[list[tuple[str, bool]], str]:
    """(text, trained) pieces by prefix rendering; where the template rewrites earlier turns, only the last
    assistant turn (NOTE_LAST_TURN), and where even that fails, the whole conversation (NOTE_WHOLE)."""
    try:
        return _segments(tokenizer, messages, tools), ""
    except _TemplateNotPrefixStable:
        pass
    if any(m["role"] == "assistant" for m in messages):
        try:
            return _last_turn_segments(tokenizer, messages, tools), NOTE_LAST_TURN
        except _TemplateNotPrefixStable:
            pass
    return [(_render(tokenizer, messages, tools), True)], NOTE_WHOLE


def tokenize(raw: RawData, tokenizer, max_length: int, train_on_prompt: bool, num_proc: int | None = None,
             cache: bool = True) -> tuple[Any, Any | None]:
    """Tokenized train and validation sets. Examples with nothing to train are dropped, and every example that was
    not tokenized as written is counted and reported; a template that rejects the data stops the run.

    Large datasets are tokenized by `num_proc` processes (default: one per CPU, up to 8). The result is cached, keyed
    by the data, the tokenizer (vocabulary, special tokens, chat template), the settings and this module's code: a
    rerun with the same inputs reads it back instead of tokenizing again."""

    _refuse_tools_without_support(raw, tokenizer)

    def run(dataset, split: str):
        if dataset is None:
            return None
        key = cache_key(dataset, tokenizer, max_length, train_on_prompt) if cache else None
        tokenized = read_cache(key, len(dataset), len(tokenizer), max_length) if key else None
        if tokenized is not None:
            log.info("%s: %s data tokenized earlier, read from the cache (%s).", raw.source, split, key[:12])
        else:
            procs = num_proc or (min(os.cpu_count() or 1, 8) if len(dataset) >= PARALLEL_FROM else 1)
            tokenized = dataset.map(_tokenize_columns, batched=True, batch_size=TOKENIZE_BATCH,
                                    num_proc=procs if procs > 1 else None,
                                    fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": train_on_prompt,
                                               "max_length": max_length},
                                    remove_columns=[c for c in dataset.column_names if c != "_index"],
                                    desc=f"Tokenizing {split}")
            if key:
                write_cache(key, tokenized)
        found: dict[str, list] = {}
        notes = arrow_column(tokenized, "_note").to_pylist()
        indices = arrow_column(tokenized, "_index").to_pylist() if "_index" in tokenized.column_names \
            else range(len(tokenized))
        for note, index in zip(notes, indices):
            if note:
                kind = NOTE_TEMPLATE if note.startswith(NOTE_TEMPLATE) else note
                found.setdefault(kind, [0, index, note])[0] += 1
        report_notes(found, raw.source, split)
        kept = tokenized.select(with_trained_tokens(tokenized))
        truncated = len(tokenized) - len(kept) - found.get(NOTE_NO_ASSISTANT, [0])[0]
        if truncated:
            log.warning("%s: %d %s example(s) have no assistant tokens within --max_seq_length %d and are skipped.",
                        raw.source, truncated, split, max_length)
        if len(kept) == 0:
            raise DataError(f"{raw.source}: no {split} example has assistant tokens to train within "
                            f"--max_seq_length {max_length}; raise it or check the data.")
        return kept.remove_columns([c for c in ("_note", "_index") if c in kept.column_names])

    return run(raw.train, "train"), run(raw.validation, "validation")


def _uses_tools(dataset) -> bool:
    """Whether any example defines tools, calls one or holds a tool's result, read from the Arrow columns (the
    normalised `tools` and `tool_calls` are JSON text, null when absent)."""
    import pyarrow.compute as pc

    table = dataset.data
    if "tools" in dataset.column_names and table.column("tools").null_count < len(table):
        return True
    messages = pc.list_flatten(table.column("messages"))
    if len(messages) == 0:
        return False
    if pc.any(pc.equal(pc.struct_field(messages, "role"), "tool")).as_py():
        return True
    if "tool_calls" not in {field.name for field in messages.type}:
        return False
    calls = pc.struct_field(messages, "tool_calls")
    return calls.null_count < len(calls)


def _refuse_tools_without_support(raw: RawData, tokenizer) -> None:
    """Tool definitions and tool calls only mean something to a template that renders them; others drop them."""
    for dataset in (raw.train, raw.validation):
        if dataset is None or "messages" not in dataset.column_names:
            continue
        if _uses_tools(dataset) and "tool" not in (getattr(tokenizer, "chat_template", None) or ""):
            raise DataError(f"{raw.source}: the data holds tools or tool calls, but the model's chat template has no "
                            "tool support (it never mentions tools), so they would be dropped or garbled; give a "
                            "template that has it with --chat_template_path.")
