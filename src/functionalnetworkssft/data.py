"""Read the user's data in whatever format it comes, check it, and tokenize it with a loss mask.

Every record is normalised to a list of chat messages (or plain text) and rendered with the tokenizer's chat
template, so training sees exactly the prompt layout that `fnsft generate` and chat servers use at inference.
The loss mask is derived by rendering conversation prefixes, which works for any chat template without
`{% generation %}` markers, and trains every assistant turn of a multi-turn chat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import DataError, first_line
from functionalnetworkssft.paths import cache_dir, missing_local

log = logging.getLogger(__name__)

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What datasets reads from a folder of data files, by suffix; every other file in such a folder is "other".
FOLDER_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                ".arrow": "arrow", ".txt": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
CHAT_ROLES = ("system", "user", "assistant", "tool")
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
    # One (source, format, training examples) per source, for the data summary.
    sources: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass
class Source:
    """One dataset of a run: a file, folder or Hub id, its configuration, the split to train on, and how much of it
    to use (a count of examples, or a fraction below 1, drawn with the run's seed)."""

    name: str
    config: str | None = None
    split: str | None = None
    samples: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load(name_or_path: str, config_name: str | None, validation_split: float, seed: int,
         text_field: str = "text") -> RawData:
    """Read, check and normalise the dataset; carve a validation split when it has none."""
    return load_sources([Source(name_or_path, config_name)], None, validation_split, seed, text_field)


def load_sources(sources: list[Source], eval_source: Source | None, validation_split: float, seed: int,
                 text_field: str = "text") -> RawData:
    """Read, check and normalise every source (each in its own format), put their training examples together, and
    take the validation data from `eval_source`, else from the sources' validation splits, else carve it."""
    trains, validations, summary = [], [], []
    for source in sources:
        splits = _read(source.name, source.config)
        key = source.split or ("train" if "train" in splits else next(iter(splits)))
        if key not in splits:
            raise DataError(f"{source.name}: no split '{key}' (it has {', '.join(splits)}); choose one with "
                            "--dataset_split.")
        train = _subsample(splits[key], source.samples, seed)
        train, fmt = _normalise_source(train, source.name, "training", text_field, key)
        trains.append(train)
        summary.append((source.name, fmt, len(train)))
        if eval_source is None:
            held = next((splits[k] for k in VALIDATION_SPLITS if k in splits and k != key), None)
            if held is not None and len(held):
                validations.append(_normalise_source(held, source.name, "validation", text_field)[0])
    if eval_source is not None:
        splits = _read(eval_source.name, eval_source.config)
        key = eval_source.split or next((k for k in (*VALIDATION_SPLITS, "test", "train") if k in splits),
                                        next(iter(splits)))
        if key not in splits:
            raise DataError(f"{eval_source.name}: no split '{key}' (it has {', '.join(splits)}).")
        validations = [_normalise_source(splits[key], eval_source.name, "validation", text_field, key)[0]]
    return _assemble(trains, validations, summary, validation_split, seed)


def from_memory(train, validation=None, validation_split: float = 0.0, seed: int = 0,
                text_field: str = "text") -> RawData:
    """In-memory data (a datasets.Dataset or a list of records, in any supported format), checked and normalised
    like a file."""
    import datasets

    def as_rows(value, name):
        if isinstance(value, datasets.Dataset) or (isinstance(value, list) and all(isinstance(r, dict)
                                                                                    for r in value)):
            return value
        raise DataError(f"{name}: expected a datasets.Dataset or a list of records (dicts), got "
                        f"{type(value).__name__}.")

    train, fmt = _normalise_source(as_rows(train, "train_dataset"), "train_dataset", "training", text_field)
    validations = [] if validation is None else [
        _normalise_source(as_rows(validation, "eval_dataset"), "eval_dataset", "validation", text_field)[0]]
    return _assemble([train], validations, [("train_dataset", fmt, len(train))], validation_split, seed)


def _subsample(rows, samples: float | None, seed: int):
    """`samples` examples (a fraction below 1), drawn with the seed, in their original order."""
    if samples is None:
        return rows
    count = int(samples) if samples >= 1 else max(1, round(len(rows) * samples))
    if count >= len(rows):
        return rows
    import numpy as np

    chosen = sorted(np.random.default_rng(seed).permutation(len(rows))[:count].tolist())
    return rows.select(chosen) if hasattr(rows, "select") else [rows[i] for i in chosen]


def _normalise_source(rows, name: str, split: str, text_field: str, key: str = "train"):
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty (no examples in split '{key}').")
    fmt = detect_format(_columns(rows), name, text_field)
    return _normalise(rows, fmt, name, split, text_field), fmt


def _assemble(trains: list, validations: list, summary: list[tuple[str, str, int]], validation_split: float,
              seed: int) -> RawData:
    train = _concatenate(trains)
    validation = _concatenate(validations) if validations else None
    if validation is None and validation_split > 0 and len(train) >= 2:
        n_eval = max(1, round(len(train) * validation_split))
        if n_eval >= len(train):
            n_eval = len(train) - 1
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    formats = sorted({fmt for _, fmt, _ in summary})
    return RawData(train=train, validation=validation, format=formats[0] if len(formats) == 1 else
                   f"mixed ({', '.join(formats)})", source=", ".join(name for name, _, _ in summary), sources=summary)


def _concatenate(parts: list):
    """Normalised datasets of any formats as one: chat and text rows side by side, the other column empty."""
    if len(parts) == 1:
        return parts[0]
    import datasets

    rows = [row for part in parts for row in part.to_list()]
    columns = sorted({key for row in rows for key in row})
    return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def _read(name_or_path: str, config_name: str | None) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(name_or_path).expanduser()
    why = missing_local(name_or_path)
    if why:
        raise DataError(f"{name_or_path}: {why} (expected .json, .jsonl, .csv, .parquet, a folder of them, or a "
                        "save_to_disk folder).")
    try:
        if path.is_dir():
            if any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
                loaded = datasets.load_from_disk(str(path))
            else:
                # A folder of data files (a cloned Hub dataset repo): splits come from the file names.
                _check_one_file_type(path)
                loaded = datasets.load_dataset(str(path), config_name)
        elif path.suffix.lower() in FILE_LOADERS:
            if not path.is_file():
                raise DataError(f"{path}: no such file.")
            loader = FILE_LOADERS[path.suffix.lower()]
            if loader == "json":
                return {"train": _read_json(path)}
            if loader == "csv":
                return {"train": _read_csv(path)}
            loaded = datasets.load_dataset(loader, data_files=str(path))
        elif path.exists():
            raise DataError(f"{path}: not a data file this tool reads (expected .json, .jsonl, .csv, .parquet, a "
                            "folder of them, or a save_to_disk folder).")
        else:
            loaded = datasets.load_dataset(name_or_path, config_name)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types; all mean "could not read this"
        raise DataError(f"{name_or_path}: could not be read: {first_line(exc)}") from exc
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _check_one_file_type(folder: Path) -> None:
    """A folder of data files is read as one type; files of any other type would be silently left out."""
    kinds: dict[str, list[str]] = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder)
        if not file.is_file() or any(part.startswith(".") for part in rel.parts) \
                or file.name.upper().startswith(("README", "LICENSE", "LICENCE")) or file.suffix.lower() == ".md":
            continue
        suffixes = [x.lower() for x in file.suffixes]
        if suffixes and suffixes[-1] in COMPRESSION:
            suffixes = suffixes[:-1]
        kind = FOLDER_TYPES.get(suffixes[-1] if suffixes else "", "other")
        kinds.setdefault(kind, []).append(rel.as_posix())
    readable = {k: v for k, v in kinds.items() if k != "other"}
    if not readable:
        raise DataError(f"{folder}: no data files (.json, .jsonl, .csv, .parquet) in the folder.")
    if len(kinds) > 1:
        listed = "; ".join(f"{kind}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for kind, names in sorted(kinds.items()))
        raise DataError(f"{folder}: holds files of several types ({listed}), and a folder is read as one type, so "
                        "the others would be left out; keep one type in the folder, or point "
                        "--dataset_name_or_path at one file.")


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file as text (a cell "42" stays the text 42); a malformed line is reported by its number."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the dataset is empty (no examples).") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed CSV: {first_line(exc).replace('Error tokenizing data. C error: ', '')}") \
            from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed:")]
    if unnamed:
        raise DataError(f"{path}: the header row has {len(unnamed)} empty column name(s); name every column.")
    return frame.to_dict("records")


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects, an object wrapping one ({"data": [...]}), or JSON Lines; a malformed line is
    reported with its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    stripped = text.lstrip()
    rows = None
    if stripped.startswith(("[", "{")):
        try:
            whole = json.loads(text)
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to be a dataset.") from None
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
            except RecursionError:
                raise DataError(f"{path}: line {number}: nested too deeply to be an example.") from None
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


def _iter_rows(rows):
    """The records one by one; a Dataset is read a batch at a time, several times faster than row by row."""
    if not hasattr(rows, "iter"):
        yield from rows
        return
    for batch in rows.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(columns, values))


def _columns(rows) -> list[str]:
    if hasattr(rows, "column_names"):
        return rows.column_names
    return sorted({key for row in rows for key in row})


# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(columns: list[str], source: str, text_field: str = "text") -> str:
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
    if text_field in cols:
        return "text"
    hint = "" if text_field != "text" else "; for plain text under another column, pass --dataset_text_field NAME"
    raise DataError(f"{source}: columns {sorted(cols)} match no supported format; supported: "
                    f"{'; '.join(SUPPORTED_FORMATS)}{hint}.")


class _Unusable(ValueError):
    """A record that cannot mean what its author intended; `kind` names the problem in the summary."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


# What each problem means, and what is done about it: "error" stops the run (every kind found is listed), "skip"
# drops the example, "note" keeps it as described. Each is reported once with its count and first example.
PROBLEMS = {
    "content_mapping": ("message content that is a mapping, not text", "error"),
    "content_strings": ('message content that is a list of plain strings; give text, or parts like '
                        '{"type": "text", "text": "..."}', "error"),
    "content_list": ("message content that is a list of something other than text parts", "error"),
    "content_parts": ("message content with non-text parts (images, audio, ...), which text training cannot use",
                      "error"),
    "content_bool": ("message content that is true or false, not text", "error"),
    "malformed_message": ("a message that is not a mapping with a role and content", "error"),
    "malformed_tool_calls": ("tool_calls that are not a list on an assistant message", "error"),
    "malformed_tools": ("a tools field that is not a list of function definitions", "error"),
    "messages_not_list": ("a conversation that is not a list of messages", "error"),
    "text_not_text": ("a text field that is a list or mapping, not text", "error"),
    "content_number": ("message content that is a number, trained as its text", "note"),
    "empty_prompt": ("an empty or null user/system message, kept as empty text", "note"),
    "empty_reply": ("an empty or null assistant message", "skip"),
    "empty_text": ("empty or null text", "skip"),
}


class _Tally:
    """Problems found in one split's records: count and first example of each kind, reported together."""

    def __init__(self, source: str, split: str, total: int):
        self.source, self.split, self.total = source, split, total
        self.kinds: dict[str, list[int]] = {}  # kind -> [count, first index]

    def add(self, kind: str, index: int) -> None:
        entry = self.kinds.setdefault(kind, [0, index])
        entry[0] += 1

    def report(self, kept: int) -> None:
        def describe(kind: str) -> tuple[str, str]:
            if kind.startswith("unknown_role:"):
                return (f"an unknown role '{kind.split(':', 1)[1]}' (use {', '.join(CHAT_ROLES)}; ShareGPT: "
                        "human, gpt, system)", "error")
            return PROBLEMS[kind]

        lines = {"error": [], "skip": [], "note": []}
        for kind, (count, first) in self.kinds.items():
            text, severity = describe(kind)
            lines[severity].append(f"{count} with {text} (first: example {first})")
        if lines["error"]:
            raise DataError("\n".join(f"{self.source}: {self.split} data: {line}." for line in lines["error"]))
        if lines["skip"]:
            log.warning("%s: skipped %d of %d %s examples: %s.", self.source, self.total - kept, self.total,
                        self.split, "; ".join(lines["skip"]))
        for line in lines["note"]:
            log.warning("%s: %s data: %s.", self.source, self.split, line)
        if kept == 0:
            raise DataError(f"{self.source}: no usable {self.split} example is left; see the warnings above.")


def to_messages(row: dict, fmt: str, note=lambda kind: None) -> list[dict[str, Any]]:
    """One record as chat messages, system turns kept. Raises _Unusable for content that cannot mean text;
    `note(kind)` is told of content that was interpreted (a number taken as its text). Tool calls are kept as JSON
    text (`tool_calls`), so that records of any shape fit one Arrow column; `chat_messages` turns them back."""
    if fmt in ("messages", "sharegpt"):
        turns = _turns(row["messages" if fmt == "messages" else "conversations"])
        return [_message(turn, note, sharegpt=fmt == "sharegpt") for turn in turns]
    system = [{"role": "system", "content": _content(row["system"], note)}] if row.get("system") else []
    if fmt == "alpaca":
        user = _content(row["instruction"], note)
        if row.get("input"):
            user = f"{user}\n\n{_content(row['input'], note)}"
        return system + [{"role": "user", "content": user},
                         {"role": "assistant", "content": _content(row["output"], note)}]
    for prompt, completion in PROMPT_COMPLETION_PAIRS:
        if prompt in row and completion in row:
            if _is_conversation(row[prompt]) or _is_conversation(row[completion]):
                # TRL's conversational prompt/completion: both sides are lists of messages.
                asked = _turns(row[prompt]) if _is_conversation(row[prompt]) else [
                    {"role": "user", "content": row[prompt]}]
                answered = _turns(row[completion]) if _is_conversation(row[completion]) else [
                    {"role": "assistant", "content": row[completion]}]
                return system + [_message(turn, note) for turn in asked + answered]
            return system + [{"role": "user", "content": _content(row[prompt], note)},
                             {"role": "assistant", "content": _content(row[completion], note)}]
    raise ValueError(f"format {fmt} has no chat form")


def _turns(value: Any) -> list:
    if isinstance(value, str):  # CSV and parquet exports often hold the list as a JSON string
        value = json.loads(value)
    if not isinstance(value, list):
        raise _Unusable("messages_not_list")
    return value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _message(turn: Any, note, sharegpt: bool = False) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise _Unusable("malformed_message")
    if sharegpt:
        speaker = turn.get("from", turn.get("role"))
        if str(speaker).lower() not in SHAREGPT_ROLES:
            raise _Unusable(f"unknown_role:{speaker}")
        return {"role": SHAREGPT_ROLES[str(speaker).lower()], "content": _content(turn.get("value", turn.get(
            "content")), note)}
    role = turn["role"]
    if not isinstance(role, str) or role.lower() not in CHAT_ROLES:
        raise _Unusable(f"unknown_role:{role}")
    message: dict[str, Any] = {"role": role.lower(), "content": _content(turn.get("content"), note)}
    if turn.get("tool_calls"):
        if role.lower() != "assistant" or not isinstance(turn["tool_calls"], (list, str)):
            raise _Unusable("malformed_tool_calls")
        message["tool_calls"] = turn["tool_calls"] if isinstance(turn["tool_calls"], str) else json.dumps(
            turn["tool_calls"], sort_keys=True)
    for key in ("name", "tool_call_id"):
        if turn.get(key) is not None:
            message[key] = str(turn[key])
    return message


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalised messages as a chat template wants them: fields Arrow filled with null dropped, tool calls parsed."""
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in clean:
            clean["tool_calls"] = json.loads(clean["tool_calls"])
        out.append(clean)
    return out


def _tools(value: Any) -> str | None:
    """A record's tool definitions as JSON text (or None)."""
    if value is None or value == [] or value == "":
        return None
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        raise _Unusable("malformed_tools")
    return json.dumps(parsed, sort_keys=True)


def _content(value: Any, note) -> str:
    """Message content as text: strings as they are, null as empty, text parts joined; anything else refused."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        raise _Unusable("content_bool")
    if isinstance(value, (int, float)):
        note("content_number")
        return str(value)
    if isinstance(value, list):
        if any(isinstance(part, str) for part in value):
            raise _Unusable("content_strings")
        if not all(isinstance(part, dict) for part in value):
            raise _Unusable("content_list")
        if any(part.get("type", "text") != "text" for part in value):
            raise _Unusable("content_parts")
        return "".join(str(part.get("text") or "") for part in value)
    raise _Unusable("content_mapping")


def _normalise(rows, fmt: str, source: str, split: str = "training", text_field: str = "text"):
    """Reduce every format to `messages` (or `text`). Content that cannot mean text stops the run, empty replies
    are skipped, and both are reported with counts; a structurally malformed record fails with its index."""
    import datasets

    tally = _Tally(source, split, len(rows))
    rows = _iter_rows(rows)
    if fmt == "text":
        texts, kept_index = [], []
        for index, row in enumerate(rows):
            value = row.get(text_field)
            if isinstance(value, (list, dict)):
                tally.add("text_not_text", index)
            elif value is None or not str(value).strip():
                tally.add("empty_text", index)
            else:
                texts.append(str(value))
                kept_index.append(index)
        tally.report(len(texts))
        return datasets.Dataset.from_dict({"text": texts, "_index": kept_index})
    normalised = []
    for index, row in enumerate(rows):
        try:
            messages = to_messages(row, fmt, lambda kind: tally.add(kind, index))
        except _Unusable as exc:
            tally.add(exc.kind, index)
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{source}: example {index}: malformed {fmt} record ({first_line(exc)}).") from None
        try:
            tools = _tools(row.get("tools"))
        except (_Unusable, ValueError):
            tally.add("malformed_tools", index)
            continue
        if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in messages):
            tally.add("empty_reply", index)
            continue
        if any(m["role"] in ("system", "user") and not m["content"].strip() for m in messages):
            tally.add("empty_prompt", index)
        normalised.append({"messages": messages, "tools": tools, "_index": index})
    tally.report(len(normalised))
    return datasets.Dataset.from_list(normalised)


# ---------------------------------------------------------------------------------------------------------------
# Rendering and tokenization


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next reply, as at inference."""
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


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


# Notes tokenize_example leaves on an example; `tokenize` counts them and reports each kind once.
NOTE_NO_ASSISTANT = "no_assistant"
NOTE_LAST_TURN = "last_turn_only"
NOTE_WHOLE = "whole_conversation"
NOTE_TEMPLATE = "template_error:"


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
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=conversations, chat_template=tokenizer.get_chat_template(),
                                            add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
        return list(rendered)
    except (ImportError, AttributeError, TypeError):
        rendered = tokenizer.apply_chat_template(conversations, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        return [rendered] if isinstance(rendered, str) else list(rendered)


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
        key = _cache_key(dataset, tokenizer, max_length, train_on_prompt) if cache else None
        tokenized = _read_cache(key) if key else None
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
                _write_cache(key, tokenized)
        found: dict[str, list] = {}
        notes = arrow_column(tokenized, "_note").to_pylist()
        indices = arrow_column(tokenized, "_index").to_pylist() if "_index" in tokenized.column_names \
            else range(len(tokenized))
        for note, index in zip(notes, indices):
            if note:
                kind = NOTE_TEMPLATE if note.startswith(NOTE_TEMPLATE) else note
                found.setdefault(kind, [0, index, note])[0] += 1
        _report_notes(found, raw.source, split)
        kept = tokenized.select(_with_trained_tokens(tokenized))
        truncated = len(tokenized) - len(kept) - found.get(NOTE_NO_ASSISTANT, [0])[0]
        if truncated:
            log.warning("%s: %d %s example(s) have no assistant tokens within --max_seq_length %d and are skipped.",
                        raw.source, truncated, split, max_length)
        if len(kept) == 0:
            raise DataError(f"{raw.source}: no {split} example has assistant tokens to train within "
                            f"--max_seq_length {max_length}; raise it or check the data.")
        return kept.remove_columns([c for c in ("_note", "_index") if c in kept.column_names])

    return run(raw.train, "train"), run(raw.validation, "validation")


def arrow_column(dataset, name: str):
    """One column of a Dataset (through any selection of its rows) as Arrow data, for whole-column arithmetic:
    iterating `dataset[name]` formats one row at a time, which dominates the run on large datasets."""
    return dataset.with_format("arrow")[name].combine_chunks()


def trained_per_example(tokenized):
    """The number of trained (assistant) tokens in each example, as a numpy array."""
    import numpy as np
    import pyarrow.compute as pc

    masks = arrow_column(tokenized, "assistant_masks")
    return np.bincount(pc.list_parent_indices(masks).to_numpy(), minlength=len(masks),
                       weights=pc.list_flatten(masks).to_numpy(zero_copy_only=False)).astype(np.int64)


def token_counts(tokenized) -> tuple[int, int]:
    """All tokens and trained tokens of a tokenized dataset."""
    import pyarrow.compute as pc

    return (int(pc.sum(pc.list_value_length(arrow_column(tokenized, "input_ids"))).as_py() or 0),
            int(trained_per_example(tokenized).sum()))


def _with_trained_tokens(tokenized) -> list[int]:
    """Indices of the examples with at least one trained token."""
    import numpy as np

    return np.flatnonzero(trained_per_example(tokenized) > 0).tolist()


# Below this many examples, starting worker processes costs more than it saves.
PARALLEL_FROM = 2000


def _cache_key(dataset, tokenizer, max_length: int, train_on_prompt: bool) -> str:
    """Everything the tokenized result depends on, hashed: the examples (their Arrow table), the tokenizer, the
    settings, and the code that tokenizes (this file)."""
    import pyarrow as pa

    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(json.dumps([max_length, train_on_prompt, type(tokenizer).__name__, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, tokenizer.bos_token_id,
                              getattr(tokenizer, "chat_template", None)]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
                  .encode())
    # A split (train_test_split, select) shares its parent's Arrow table and differs only by an indices mapping:
    # without the mapping, a validation split would hash like its training split and read the training set back.
    indices = getattr(dataset, "_indices", None)
    for part in (dataset.data, indices):
        if part is None:
            continue
        table = part.table if hasattr(part, "table") else part
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def _read_cache(key: str):
    import datasets

    folder = cache_dir() / "tokenized" / key
    if not (folder / "dataset_info.json").is_file():
        return None
    try:
        # In memory: the filtering that follows must not write cache files into the shared entry.
        return datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None


def _write_cache(key: str, tokenized) -> None:
    """Best effort and atomic: written under a temporary name and renamed; an unwritable cache only costs time."""
    import shutil
    import tempfile

    target = cache_dir() / "tokenized" / key
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    except OSError:
        return
    try:
        tokenized.save_to_disk(str(staging))
        os.replace(staging, target)
    except OSError:
        pass  # another run stored the same entry first, or the disk is full: either way nothing to do
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _report_notes(found: dict[str, list], source: str, split: str) -> None:
    if NOTE_TEMPLATE in found:
        count, first, note = found[NOTE_TEMPLATE]
        raise DataError(f"{source}: the model's chat template rejects {count} {split} example(s) (first: example "
                        f"{first}: {note[len(NOTE_TEMPLATE):]}); fix the data, or use a model or template that "
                        "accepts it.")
    if NOTE_WHOLE in found:
        count, first, _ = found[NOTE_WHOLE]
        raise DataError(f"{source}: in {count} {split} example(s) (first: example {first}) the chat template renders "
                        "earlier turns differently once later ones follow, so the assistant tokens cannot be told "
                        "apart from the prompt; add --train_on_prompt to train on whole conversations.")
    if NOTE_LAST_TURN in found:
        count, first, _ = found[NOTE_LAST_TURN]
        log.warning("%s: in %d %s example(s) (first: example %d) the chat template rewrites earlier turns once later "
                    "ones follow; only the last assistant turn of each is trained.", source, count, split, first)
    if NOTE_NO_ASSISTANT in found:
        count, first, _ = found[NOTE_NO_ASSISTANT]
        log.warning("%s: skipped %d %s example(s) with no assistant turn (first: example %d); add --train_on_prompt "
                    "to train on them as plain text.", source, count, split, first)
