"""Read the user's data in whatever format it comes, check it, and tokenize it with a loss mask.

Every record is normalised to a list of chat messages (or plain text) and rendered with the tokenizer's chat
template, so training sees exactly the prompt layout that `fnsft generate` and chat servers use at inference.
The loss mask is derived by rendering conversation prefixes, which works for any chat template without
`{% generation %}` markers, and trains every assistant turn of a multi-turn chat.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functionalnetworkssft.config import looks_like_local_path
from functionalnetworkssft.errors import DataError, first_line

log = logging.getLogger(__name__)

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
PROMPT_COMPLETION_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
KNOWN_COLUMNS = {"messages", "conversations", "instruction", "input", "output", "system", "text",
                 *(name for pair in PROMPT_COMPLETION_PAIRS for name in pair)}
SUPPORTED_FORMATS = ("messages (chat: role/content)", "conversations (ShareGPT: from/value)",
                     "instruction/input/output (Alpaca)", "prompt/completion (or prompt/response, question/answer)",
                     "text (plain)")


@dataclass
class RawData:
    """The user's records, normalised: each row has `messages` (chat) or `text`, and the detected format."""

    train: Any  # datasets.Dataset
    validation: Any | None
    format: str
    source: str


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load(name_or_path: str, config_name: str | None, validation_split: float, seed: int) -> RawData:
    """Read, check and normalise the dataset; carve a validation split when it has none."""
    splits = _read(name_or_path, config_name)
    train_key = "train" if "train" in splits else next(iter(splits))
    train = splits[train_key]
    validation = next((splits[k] for k in VALIDATION_SPLITS if k in splits and k != train_key), None)
    if len(train) == 0:
        raise DataError(f"{name_or_path}: the dataset is empty (no examples in split '{train_key}').")
    fmt = detect_format(_columns(train), name_or_path)
    train = _normalise(train, fmt, name_or_path)
    if validation is not None and len(validation):
        validation = _normalise(validation, detect_format(_columns(validation), name_or_path), name_or_path)
    elif validation_split > 0 and len(train) >= 2:
        n_eval = max(1, round(len(train) * validation_split))
        if n_eval >= len(train):
            n_eval = len(train) - 1
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    else:
        validation = None
    return RawData(train=train, validation=validation, format=fmt, source=name_or_path)


def _read(name_or_path: str, config_name: str | None) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(name_or_path)
    try:
        if path.is_dir():
            if any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
                loaded = datasets.load_from_disk(str(path))
            else:
                # A folder of data files (a cloned Hub dataset repo): splits come from the file names.
                loaded = datasets.load_dataset(str(path), config_name)
        elif path.suffix.lower() in FILE_LOADERS:
            if not path.is_file():
                raise DataError(f"{path}: no such file.")
            if FILE_LOADERS[path.suffix.lower()] == "json":
                return {"train": _read_json(path)}
            loaded = datasets.load_dataset(FILE_LOADERS[path.suffix.lower()], data_files=str(path))
        elif looks_like_local_path(name_or_path):
            raise DataError(f"{name_or_path}: no such file or folder (expected .json, .jsonl, .csv, .parquet, or a "
                            "save_to_disk folder).")
        else:
            loaded = datasets.load_dataset(name_or_path, config_name)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types; all mean "could not read this"
        raise DataError(f"{name_or_path}: could not be read: {first_line(exc)}") from exc
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects, an object wrapping one ({"data": [...]}), or JSON Lines; a malformed line is
    reported with its number."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    rows = None
    if stripped.startswith(("[", "{")):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg}).") from None
        else:
            rows = whole if isinstance(whole, list) else _unwrap(whole)
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg}).") from None
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no examples).")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: example {bad} is {type(rows[bad]).__name__}, expected a JSON object.")
    # Kept as Python rows: Arrow would reject records whose optional fields differ; they are normalised first.
    return rows


def _unwrap(obj: dict) -> list:
    """{"data": [records]} holds the records; any other object is itself one record."""
    if len(obj) == 1:
        (key, value), = obj.items()
        if key not in KNOWN_COLUMNS and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    return [obj]


def _columns(rows) -> list[str]:
    if hasattr(rows, "column_names"):
        return rows.column_names
    return sorted({key for row in rows for key in row})


# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(columns: list[str], source: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    for prompt, completion in PROMPT_COMPLETION_PAIRS:
        if {prompt, completion} <= cols:
            return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(f"{source}: columns {sorted(cols)} match no supported format; supported: "
                    f"{'; '.join(SUPPORTED_FORMATS)}.")


def to_messages(row: dict, fmt: str) -> list[dict[str, str]]:
    """One record as chat messages, system turns kept."""
    if fmt == "messages":
        messages = row["messages"]
        if isinstance(messages, str):  # CSV and parquet exports often hold the list as a JSON string
            messages = json.loads(messages)
        return [{"role": str(m["role"]), "content": _text(m.get("content"))} for m in messages]
    if fmt == "sharegpt":
        turns = row["conversations"]
        if isinstance(turns, str):
            turns = json.loads(turns)
        out = []
        for turn in turns:
            role = turn.get("from", turn.get("role"))
            if str(role).lower() not in SHAREGPT_ROLES:
                raise ValueError(f"unknown ShareGPT speaker '{role}' (expected human/gpt/system)")
            out.append({"role": SHAREGPT_ROLES[str(role).lower()], "content": _text(turn.get("value",
                                                                                          turn.get("content")))})
        return out
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    if fmt == "alpaca":
        user = _text(row["instruction"])
        if row.get("input"):
            user = f"{user}\n\n{_text(row['input'])}"
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"])}]
    for prompt, completion in PROMPT_COMPLETION_PAIRS:
        if prompt in row and completion in row:
            return system + [{"role": "user", "content": _text(row[prompt])},
                             {"role": "assistant", "content": _text(row[completion])}]
    raise ValueError(f"format {fmt} has no chat form")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # multimodal-style content parts: keep the text ones
        return "".join(part.get("text", "") for part in value if isinstance(part, dict))
    return str(value)


def _normalise(rows, fmt: str, source: str):
    """Reduce every format to `messages` (or `text`), failing on the first malformed record with its index."""
    import datasets

    if fmt == "text":
        return datasets.Dataset.from_dict({"text": [_text(row.get("text")) for row in rows]})
    normalised = []
    for index, row in enumerate(rows):
        try:
            normalised.append({"messages": to_messages(row, fmt)})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{source}: example {index}: malformed {fmt} record ({first_line(exc)}).") from None
    return datasets.Dataset.from_list(normalised)


# ---------------------------------------------------------------------------------------------------------------
# Rendering and tokenization


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next reply, as at inference."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # No template (GPT-2, DialoGPT): turns are joined by EOS, as DialoGPT was trained.
    ids: list[int] = []
    for message in messages:
        ids += tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def _segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces whose concatenation is the full render.

    Each assistant turn spans from the end of the prompt that asks for it (prefix rendered with
    add_generation_prompt) to the end of the prefix that includes it, so the turn's closing tokens are trained.
    """
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor):
            raise _TemplateNotPrefixStable
        pieces += [(full[cursor:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        cursor = len(upto)
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


class _TemplateNotPrefixStable(Exception):
    """The chat template rewrites earlier turns depending on later ones (e.g. drops past reasoning)."""


def _last_turn_segments(tokenizer, messages):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    if not full.startswith(prompt):
        return [(full, True)]
    return [(prompt, False), (full[len(prompt):], True)]


def tokenize_example(tokenizer, example: dict, train_on_prompt: bool, max_length: int) -> dict[str, list[int]]:
    """input_ids and assistant_masks (1 = the token is trained) for one normalised example."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    if "text" in example and example.get("text") is not None:
        ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"] + [eos]
        mask = [1] * len(ids)
    else:
        messages = example["messages"]
        if has_chat_template(tokenizer):
            try:
                pieces = _segments(tokenizer, messages)
            except _TemplateNotPrefixStable:
                pieces = _last_turn_segments(tokenizer, messages)
            for text, trained in pieces:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [int(trained)] * len(piece)
        else:
            for message in messages:
                piece = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [eos]
                ids += piece
                mask += [int(message["role"] == "assistant")] * len(piece)
        # EOS closes every example: templates that end a turn with another token still teach the model to stop.
        trained_tail = [t for t, m in zip(ids, mask) if m][-8:]
        if eos is not None and eos not in trained_tail:
            ids.append(eos)
            mask.append(1)
    if train_on_prompt:
        mask = [1] * len(ids)
    return {"input_ids": ids[:max_length], "assistant_masks": mask[:max_length]}


def tokenize(raw: RawData, tokenizer, max_length: int, train_on_prompt: bool) -> tuple[Any, Any | None]:
    """Tokenized train and validation sets; examples with nothing to train within max_length are dropped."""

    def run(dataset, split: str):
        if dataset is None:
            return None
        tokenized = dataset.map(lambda ex: tokenize_example(tokenizer, ex, train_on_prompt, max_length),
                                remove_columns=dataset.column_names, desc=f"Tokenizing {split}")
        kept = tokenized.filter(lambda ex: any(ex["assistant_masks"]))
        dropped = len(tokenized) - len(kept)
        if dropped:
            log.warning("%s: %d %s example(s) have no assistant tokens within --max_seq_length %d and are skipped.",
                        raw.source, dropped, split, max_length)
        if len(kept) == 0:
            raise DataError(f"{raw.source}: no {split} example has assistant tokens to train within "
                            f"--max_seq_length {max_length}; raise it or check the data.")
        return kept

    return run(raw.train, "train"), run(raw.validation, "validation")
