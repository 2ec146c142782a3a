"""Declaring an option: a dataclass field whose help text is written once, with its bounds and other spellings."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal

# Field metadata keys of the bounds and aliases declared with `arg`; argparse never sees them.
BOUNDS = "fnsft_bounds"
ALIASES = "fnsft_aliases"


def arg(help: str, *, minimum: float | None = None, maximum: float | None = None, below: float | None = None,
        positive: bool = False, hint: str | None = None, aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A dataclass field whose help text is the single source for --help, the README and error messages.

    The bounds are checked by `field_problems` for every command alike: `positive` (> 0), `minimum` (>=),
    `maximum` (<=), `below` (<). `hint` is appended to the message when a value is out of bounds. `aliases` are other
    spellings of the flag (TRL's names) accepted on the command line and as config-file keys.
    """
    bounds = {"minimum": minimum, "maximum": maximum, "below": below, "positive": positive, "hint": hint}
    return field(metadata={"help": help, BOUNDS: bounds, ALIASES: aliases}, **kwargs)



class Options:
    """What every command's configuration carries besides its flags."""

    # The --config file the values came from (an input of the run that nothing may overwrite); set by `parse`.
    config_file: str | None = None
    # Other tools' flags that mean the opposite of one of ours (TRL's --assistant_only_loss for --train_on_prompt):
    # accepted on the command line and as config-file keys, never shown in --help.
    INVERTED_FLAGS: ClassVar[dict[str, str]] = {}
    # Config-file keys that hold structured values no flag can (a mapping, a list of mappings): key -> (field, reader).
    # The reader returns the value to store or raises ValueError saying what it expects; the field is set after the
    # dataclass is built.
    FILE_SECTIONS: ClassVar[dict[str, tuple[str, Any]]] = {}


def type_problems(cfg: Any) -> list[str]:
    """Every field whose value is not of its declared type (a config built in Python can hold anything): one line
    each, naming the flag and what it takes."""
    hints = typing.get_type_hints(type(cfg))
    return [f"--{f.name} must be {_describe(hints[f.name])} (got {_shown(getattr(cfg, f.name))})."
            for f in dataclasses.fields(cfg) if f.init and not _matches(hints[f.name], getattr(cfg, f.name))]


def _matches(kind: Any, value: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in args)
    if kind is type(None):
        return value is None
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(args[0], item) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        named = [_describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" (or None)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ')} values"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, str(kind))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 60 else text


def field_problems(cfg: Any) -> list[str]:
    """Every field that is not of its type, breaks its declared bounds, is a non-finite number, or holds a NUL
    byte: one line each."""
    found: list[str] = type_problems(cfg)
    wrong = {line.split(" ", 1)[0] for line in found}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f"--{f.name}" in wrong:
            continue
        flag = f"--{f.name}"
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            found.append(f"{flag} contains a NUL byte; remove it.")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{flag} must be a finite number (got {value}).")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        meta = f.metadata.get(BOUNDS, {})
        low = (0, False) if meta.get("positive") else (meta["minimum"], True) if meta.get("minimum") is not None \
            else None
        high = (meta["below"], False) if meta.get("below") is not None else (meta["maximum"], True) \
            if meta.get("maximum") is not None else None
        broken = (low is not None and (value < low[0] or (value == low[0] and not low[1]))) or \
                 (high is not None and (value > high[0] or (value == high[0] and not high[1])))
        if not broken:
            continue
        if low and high:
            rule = f"in {'[' if low[1] else '('}{_number(low[0])}, {_number(high[0])}{']' if high[1] else ')'}"
        elif low:
            rule = f"at least {_number(low[0])}" if low[1] else "positive" if low[0] == 0 else \
                f"above {_number(low[0])}"
        else:
            rule = f"at most {_number(high[0])}" if high[1] else f"below {_number(high[0])}"
        hint = f"; {meta['hint']}" if meta.get("hint") else ""
        found.append(f"{flag} must be {rule} (got {_number(value)}){hint}.")
    return found


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)

