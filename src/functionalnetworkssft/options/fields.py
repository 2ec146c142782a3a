"""Declaring an option: a dataclass field whose help text is written once, with its bounds and other spellings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, ClassVar

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


def field_problems(cfg: Any) -> list[str]:
    """Every field that breaks its declared bounds, is a non-finite number, or holds a NUL byte: one line each."""
    found: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
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

