"""Typed options, shared by every command: one dataclass per subcommand, help written once, read from flags and/or
a YAML file.

- `fields`: `arg(help, bounds...)` declares an option; `field_problems(cfg)` checks every field against the bounds
  declared with it (and that every number is finite), one line each.
- `flags`: the dataclass as argparse flags (the actions HfArgumentParser makes, without importing transformers), and
  `parse(Config, argv, prog)`, which reads `--config FILE.yaml` and the flags (flags win).
- `config_file`: the YAML file, read safely, each value converted with its field's own type.

A command's own rules that tie flags together live with its config (e.g. `TrainConfig.problems()`); all problems
are reported together, before any model or dataset is loaded.
"""

from functionalnetworkssft.options.config_file import load_yaml_file, yaml_kind
from functionalnetworkssft.options.fields import ALIASES, BOUNDS, Options, arg, field_problems, type_problems
from functionalnetworkssft.options.flags import build_parser, parse, string_to_bool

__all__ = ["ALIASES", "BOUNDS", "Options", "arg", "build_parser", "field_problems", "load_yaml_file", "parse",
           "string_to_bool", "type_problems", "yaml_kind"]
