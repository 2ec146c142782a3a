"""Reading a `--config FILE.yaml`: safe YAML, one line per problem, each value converted with its field's type."""

from __future__ import annotations

import argparse
import difflib
from typing import Any

import yaml

from functionalnetworkssft.errors import UsageError

# A config file is a handful of keys; anything larger is a mistake or an attack, refused before it is parsed.
CONFIG_MAX_BYTES = 1 << 20


class _ConfigLoader(yaml.SafeLoader):
    """safe_load without aliases (an alias bomb expands to gigabytes from a few lines) and without duplicate keys
    (the later one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in fnsft config files",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key '{key}' appears twice", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_file(path: str, flag: str = "--config") -> Any:
    """A YAML file's content, or a one-line UsageError naming the file: missing, too large, not YAML, aliases."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file.") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path} is a folder; give a YAML file.") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot be read ({exc.strerror}).") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise UsageError(f"{flag} {path} is larger than {CONFIG_MAX_BYTES >> 20} MiB; a config file holds flag "
                         "values only.")
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not UTF-8 text.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise UsageError(f"{flag} {path}: not valid YAML{where}" + (f": {problem}." if problem else ".")) from None
    except RecursionError:
        raise UsageError(f"{flag} {path}: nested too deeply to be a config file.") from None


def read_config_file(path: str, actions: dict[str, argparse.Action], prog: str, inverted: dict[str, str] | None = None,
                     sections: dict[str, tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Field values from a YAML mapping of flag names (or their aliases), each converted with its field's type; every
    problem listed. `inverted` maps other tools' names of a flag's opposite to the field; `sections` maps keys that
    hold structured values to (field, reader), whose result is returned under the key (see Options.FILE_SECTIONS)."""
    loaded = load_yaml_file(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {yaml_kind(loaded)}.")
    names = {dest: dest for dest in actions}
    names.update({alias: dest for dest, action in actions.items() for alias in getattr(action, "fnsft_aliases", ())})
    inverted = {alias: dest for alias, dest in (inverted or {}).items() if dest in actions}
    sections = sections or {}
    problems, values, spelled = [], {}, {}
    for key, value in loaded.items():
        if key in sections:
            try:
                values[key] = sections[key][1](value)
            except ValueError as exc:
                problems.append(f"--config {path}: key '{key}' {exc}.")
            continue
        if not isinstance(key, str) or (key not in names and key not in inverted):
            close = difflib.get_close_matches(str(key), [*names, *inverted], n=1)
            problems.append(f"--config {path}: unknown key '{key}'" + (
                f"; did you mean '{close[0]}'?" if close else f"; see {prog} --help for the keys."))
            continue
        dest = names.get(key) or inverted[key]
        if dest in spelled:
            problems.append(f"--config {path}: keys '{spelled[dest]}' and '{key}' set the same value; keep one.")
            continue
        spelled[dest] = key
        if value is None:
            continue  # `key:` with no value keeps the default
        try:
            converted = _convert(actions[dest], value)
            values[dest] = (not converted) if key in inverted else converted
        except ValueError as exc:
            problems.append(f"--config {path}: key '{key}' {exc}.")
    if problems:
        raise UsageError(problems)
    return values


def _convert(action: argparse.Action, value: Any) -> Any:
    """A YAML value as the field's type; ValueError says what was expected and what came."""
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in items):
            raise ValueError(f"expects a list of {_expected(action)} values, got {yaml_kind(value)}")
        return [_scalar(action, v) for v in items]
    if isinstance(value, (dict, list)):
        raise ValueError(f"expects {_expected(action)}, got {yaml_kind(value)}")
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    is_bool_field = action.nargs == "?" and action.const is True
    if isinstance(value, bool) and not is_bool_field:
        raise ValueError(f"expects {_expected(action)}, got {str(value).lower()}")
    if action.type is int and isinstance(value, float):
        raise ValueError(f"expects {_expected(action)}, got {value}")
    if is_bool_field and isinstance(value, bool):
        return value
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"expects {_expected(action)}, got {str(value)!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expects {_expected(action)}, got {str(value)!r}")
    return converted


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(str(c) for c in action.choices)
    if action.nargs == "?" and action.const is True:
        return "true or false"
    return {int: "a whole number", float: "a number"}.get(action.type, "text")


def yaml_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" + (" holding a mapping or list" if any(isinstance(v, (dict, list)) for v in value) else "")
    if isinstance(value, str):
        return "text"
    return {bool: "true or false", int: "a number", float: "a number"}.get(type(value), type(value).__name__)

