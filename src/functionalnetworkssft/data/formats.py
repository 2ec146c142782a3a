"""Detecting a dataset's format and normalising every record to chat messages (or plain text), with every
record that cannot mean what its author intended counted and reported."""

from __future__ import annotations

import json
from typing import Any

from functionalnetworkssft.data.report import ProblemTally
from functionalnetworkssft.errors import DataError, first_line

CHAT_ROLES = ("system", "user", "assistant", "tool")
PROMPT_COMPLETION_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
KNOWN_COLUMNS = {"messages", "conversations", "instruction", "input", "output", "system", "text",
                 *(name for pair in PROMPT_COMPLETION_PAIRS for name in pair)}
SUPPORTED_FORMATS = ("messages (chat: role/content)", "conversations (ShareGPT: from/value)",
                     "instruction/input/output (Alpaca)", "prompt/completion (or prompt/response, question/answer)",
                     "text (plain)")


def iter_rows(rows):
    """The records one by one; a Dataset is read a batch at a time, several times faster than row by row."""
    if not hasattr(rows, "iter"):
        yield from rows
        return
    for batch in rows.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(columns, values))


def columns(rows) -> list[str]:
    if hasattr(rows, "column_names"):
        return rows.column_names
    return sorted({key for row in rows for key in row})


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


class Unusable(ValueError):
    """A record that cannot mean what its author intended; `kind` names the problem in the summary."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


# What each problem means, and what is done about it: "error" stops the run (every kind found is listed), "skip"


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


def describe_problem(kind: str) -> tuple[str, str]:
    """What a problem kind means and what is done about it (see PROBLEMS)."""
    if kind.startswith("unknown_role:"):
        return (f"an unknown role '{kind.split(':', 1)[1]}' (use {', '.join(CHAT_ROLES)}; ShareGPT: "
                "human, gpt, system)", "error")
    return PROBLEMS[kind]


def normalise_source(rows, name: str, split: str, text_field: str, key: str = "train"):
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty (no examples in split '{key}').")
    fmt = detect_format(columns(rows), name, text_field)
    return normalise(rows, fmt, name, split, text_field), fmt


def to_messages(row: dict, fmt: str, note=lambda kind: None) -> list[dict[str, Any]]:
    """One record as chat messages, system turns kept. Raises Unusable for content that cannot mean text;
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
        raise Unusable("messages_not_list")
    return value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _message(turn: Any, note, sharegpt: bool = False) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise Unusable("malformed_message")
    if sharegpt:
        speaker = turn.get("from", turn.get("role"))
        if str(speaker).lower() not in SHAREGPT_ROLES:
            raise Unusable(f"unknown_role:{speaker}")
        return {"role": SHAREGPT_ROLES[str(speaker).lower()], "content": _content(turn.get("value", turn.get(
            "content")), note)}
    role = turn["role"]
    if not isinstance(role, str) or role.lower() not in CHAT_ROLES:
        raise Unusable(f"unknown_role:{role}")
    message: dict[str, Any] = {"role": role.lower(), "content": _content(turn.get("content"), note)}
    if turn.get("tool_calls"):
        if role.lower() != "assistant" or not isinstance(turn["tool_calls"], (list, str)):
            raise Unusable("malformed_tool_calls")
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
        raise Unusable("malformed_tools")
    return json.dumps(parsed, sort_keys=True)


def _content(value: Any, note) -> str:
    """Message content as text: strings as they are, null as empty, text parts joined; anything else refused."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        raise Unusable("content_bool")
    if isinstance(value, (int, float)):
        note("content_number")
        return str(value)
    if isinstance(value, list):
        if any(isinstance(part, str) for part in value):
            raise Unusable("content_strings")
        if not all(isinstance(part, dict) for part in value):
            raise Unusable("content_list")
        if any(part.get("type", "text") != "text" for part in value):
            raise Unusable("content_parts")
        return "".join(str(part.get("text") or "") for part in value)
    raise Unusable("content_mapping")


def normalise(rows, fmt: str, source: str, split: str = "training", text_field: str = "text"):
    """Reduce every format to `messages` (or `text`). Content that cannot mean text stops the run, empty replies
    are skipped, and both are reported with counts; a structurally malformed record fails with its index."""
    import datasets

    tally = ProblemTally(source, split, len(rows), describe_problem)
    rows = iter_rows(rows)
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
        except Unusable as exc:
            tally.add(exc.kind, index)
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{source}: example {index}: malformed {fmt} record ({first_line(exc)}).") from None
        try:
            tools = _tools(row.get("tools"))
        except (Unusable, ValueError):
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
