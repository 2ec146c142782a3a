"""Flags from a config dataclass, and `parse`: a command's configuration from its flags and `--config FILE.yaml`.

`parse(Config, argv, prog)` accepts `--config FILE.yaml` whose keys are flag names; flags given on the command line
override the file, and unknown keys are an error. A file's values are converted field by field with the field's own
type, never turned back into command-line words, so a value can never become a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, TypeVar

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.options.config_file import read_config_file
from functionalnetworkssft.options.fields import ALIASES

T = TypeVar("T")


class _HelpFormatter(argparse.HelpFormatter):
    """One spelling per flag, a short metavar, and the default only where it tells the reader something."""

    METAVARS = {int: "N", float: "X"}

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        aliases = getattr(action, "fnsft_aliases", ())
        if aliases:
            flag += "".join(f" | --{alias}" for alias in aliases)
        if action.nargs == 0 or (action.nargs == "?" and action.const is True):
            return flag
        metavar = self.METAVARS.get(action.type, "VALUE") if action.metavar is None else action.metavar
        return f"{flag} {metavar} ..." if action.nargs == "+" else f"{flag} {metavar}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if getattr(action, "fnsft_required", False):
            return f"{text} (required)"
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line naming it, exit status 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


class _ConfigOnce(argparse.Action):
    """--config FILE or --config=FILE, once: a second file would silently hide the first one's values."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, _UNSET) is not _UNSET:
            raise UsageError("--config is given twice; merge the files into one, or override single values with "
                             "flags.")
        setattr(namespace, self.dest, values)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def string_to_bool(value: str | bool) -> bool:
    """A flag's boolean value as transformers' HfArgumentParser reads it (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of yes/no, true/false, "
                                     "t/f, y/n, 1/0 (case insensitive).")


def _field_flags(cls: type) -> argparse.ArgumentParser:
    """The typed fields as flags, the way transformers' HfArgumentParser makes them (bools accept `--flag` alone and
    get `--no_flag` when they default to true, Literals become choices, lists take one or more values, Optional[X]
    takes X), written out here because importing transformers costs every command half a second."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    builder = argparse.ArgumentParser(add_help=False)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind) \
                and bool not in typing.get_args(kind):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind) or kind
        kwargs: dict[str, Any] = {"help": f.metadata.get("help")}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        is_bool = kind is bool or kind == (bool | None)
        if origin is Literal:
            choices = typing.get_args(kind)
            by_text = {str(choice): choice for choice in choices}
            kwargs.update(choices=choices, type=lambda text, by_text=by_text: by_text.get(text, text))
        elif is_bool:
            kwargs["type"] = string_to_bool
            if kind is bool or f.default is not None:
                default, has_default = (False if not has_default else default), True
                kwargs.update(nargs="?", const=True)
        elif isinstance(origin, type) and issubclass(origin, list):
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kwargs["type"] = kind
        if has_default:
            kwargs["default"] = default
        else:
            kwargs["required"] = True
        options = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        builder.add_argument(*options, **kwargs)
        if f.default is True and is_bool:
            builder.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                                 dest=f.name, default=False, help=f.metadata.get("help"))
    return builder


def build_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    builder = _field_flags(cls)
    fields = {f.name: f.metadata.get(ALIASES, ()) for f in dataclasses.fields(cls)}
    parser = _Parser(prog=prog, usage="%(prog)s [--config FILE.yaml] [--flag VALUE ...]",
                     description=(cls.__doc__ or "").strip() or None, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", action=_ConfigOnce,
                        help="YAML file whose keys are flag names; flags on the command line override it.")
    for action in builder._actions:
        if action.dest == "help":
            continue
        if action.type is string_to_bool and action.nargs is None:
            # An optional bool (None = decided at run time) is still switched on by the flag alone.
            action.nargs, action.const = "?", True
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn off {action.option_strings[0].replace('--no_', '--')}."
        # A required value may come from the config file instead; `parse` checks it once both are read.
        action.fnsft_required = action.required  # type: ignore[attr-defined]
        action.required = False
        aliases = fields.get(action.dest, ())
        if aliases and not action.option_strings[0].startswith("--no_"):
            action.option_strings.extend(f"--{alias}" for alias in aliases)
            action.fnsft_aliases = aliases  # type: ignore[attr-defined]
        parser._add_action(action)
    for alias, dest in getattr(cls, "INVERTED_FLAGS", {}).items():
        if dest in fields:
            parser.add_argument(f"--{alias}", dest=dest, nargs="?", const=True, type=string_to_bool,
                                action=_Inverted, help=argparse.SUPPRESS)
    return parser


class _Inverted(argparse.Action):
    """A flag that means the opposite of the field it sets (TRL's --assistant_only_loss for --train_on_prompt)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not values)


def parse(cls: type[T], argv: list[str] | None, prog: str) -> T:
    """Read a config from `--config FILE.yaml` and flags (flags win); reject unknown keys and bad values."""
    import sys

    parser = build_parser(cls, prog)
    actions = {a.dest: a for a in parser._actions
               if a.dest not in ("help", "config") and not isinstance(a, _Inverted)}
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_two_spellings(parser, argv)
    # Every field starts unset, so that only what the command line really gave overrides the file.
    namespace = argparse.Namespace(**{dest: _UNSET for dest in [*actions, "config"]})
    parser.parse_args(argv, namespace)
    given = {dest: value for dest, value in vars(namespace).items() if value is not _UNSET}
    config_file = given.pop("config", None)
    sections = getattr(cls, "FILE_SECTIONS", {})
    values = read_config_file(config_file, actions, prog, getattr(cls, "INVERTED_FLAGS", {}), sections) \
        if config_file is not None else {}
    values.update(given)
    missing = [f"--{dest} is required (or {dest}: in the --config file)" if config_file else f"--{dest} is required"
               for dest, action in actions.items() if action.fnsft_required and dest not in values]
    if missing:
        raise UsageError([f"{line}; see {prog} --help." for line in missing])
    structured = {sections[key][0]: values.pop(key) for key in list(values) if key in sections}
    cfg = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values and f.init})
    for name, value in structured.items():
        setattr(cfg, name, value)
    cfg.config_file = config_file
    return cfg


def _refuse_two_spellings(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A flag given under two of its names (--max_length and --max_seq_length): which one wins would be a guess."""
    seen: dict[str, str] = {}
    for word in argv:
        option = word.split("=", 1)[0]
        action = parser._option_string_actions.get(option) if option.startswith("--") else None
        if action is None:
            continue
        first = seen.setdefault(action.dest, option)
        if first != option:
            raise UsageError(f"{first} and {option} set the same value; give one of them.")

