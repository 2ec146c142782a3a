"""Read the user's data in whatever format it comes, check it, and tokenize it with a loss mask.

Every record is normalised to a list of chat messages (or plain text) and rendered with the tokenizer's chat
template, so training sees exactly the prompt layout that `fnsft generate` and chat servers use at inference.
The loss mask is derived by rendering conversation prefixes, which works for any chat template without
`{% generation %}` markers, and trains every assistant turn of a multi-turn chat.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.paths import missing_local
from functionalnetworkssft.errors import DataError, first_line

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

    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor):
            raise _TemplateNotPrefixStable
        pieces += [(full[cursor:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        cursor = len(upto)
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


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
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    note = ""
    if "text" in example and example.get("text") is not None:
        ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"] + [eos]
        mask = [1] * len(ids)
    else:
        messages = chat_messages(example["messages"])
        tools = json.loads(example["tools"]) if example.get("tools") else None
        if not any(m["role"] == "assistant" for m in messages) and not train_on_prompt:
            return {"input_ids": [], "assistant_masks": [], "_note": NOTE_NO_ASSISTANT}
        if has_chat_template(tokenizer):
            try:
                pieces, note = _template_pieces(tokenizer, messages, tools)
            except Exception as exc:  # the template's own raise_exception, or any error inside the template
                return {"input_ids": [], "assistant_masks": [], "_note": NOTE_TEMPLATE + first_line(exc)[:200]}
            for text, trained in pieces:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [int(trained)] * len(piece)
        else:
            for message in messages:
                piece = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [eos]
                ids += piece
                mask += [int(message["role"] == "assistant")] * len(piece)
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
    return {"input_ids": ids[:max_length], "assistant_masks": mask[:max_length], "_note": note}


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


def tokenize(raw: RawData, tokenizer, max_length: int, train_on_prompt: bool) -> tuple[Any, Any | None]:
    """Tokenized train and validation sets. Examples with nothing to train are dropped, and every example that was
    not tokenized as written is counted and reported; a template that rejects the data stops the run."""

    _refuse_tools_without_support(raw, tokenizer)

    def run(dataset, split: str):
        if dataset is None:
            return None
        tokenized = dataset.map(lambda ex: tokenize_example(tokenizer, ex, train_on_prompt, max_length),
                                remove_columns=[c for c in dataset.column_names if c != "_index"],
                                desc=f"Tokenizing {split}")
        found: dict[str, list] = {}
        for note, index in zip(tokenized["_note"], tokenized["_index"] if "_index" in tokenized.column_names
                               else range(len(tokenized))):
            if note:
                kind = NOTE_TEMPLATE if note.startswith(NOTE_TEMPLATE) else note
                found.setdefault(kind, [0, index, note])[0] += 1
        _report_notes(found, raw.source, split)
        kept = tokenized.filter(lambda ex: any(ex["assistant_masks"]))
        truncated = len(tokenized) - len(kept) - found.get(NOTE_NO_ASSISTANT, [0])[0]
        if truncated:
            log.warning("%s: %d %s example(s) have no assistant tokens within --max_seq_length %d and are skipped.",
                        raw.source, truncated, split, max_length)
        if len(kept) == 0:
            raise DataError(f"{raw.source}: no {split} example has assistant tokens to train within "
                            f"--max_seq_length {max_length}; raise it or check the data.")
        return kept.remove_columns([c for c in ("_note", "_index") if c in kept.column_names])

    return run(raw.train, "train"), run(raw.validation, "validation")


def _refuse_tools_without_support(raw: RawData, tokenizer) -> None:
    """Tool definitions and tool calls only mean something to a template that renders them; others drop them."""
    for dataset in (raw.train, raw.validation):
        if dataset is None or "messages" not in dataset.column_names:
            continue
        tools = dataset["tools"] if "tools" in dataset.column_names else []
        uses = any(tools) or any(m["role"] == "tool" or m.get("tool_calls")
                                 for row in dataset["messages"] for m in row or ())  # text rows have none
        if uses and "tool" not in (getattr(tokenizer, "chat_template", None) or ""):
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
