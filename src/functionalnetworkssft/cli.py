"""The `fnsft` command: a thin layer that parses a subcommand's config and calls the stage that does the work."""

from __future__ import annotations

import importlib
import sys

from functionalnetworkssft.errors import FnsftError

USAGE = """usage: fnsft {train,merge,push,generate} [--help] ...

  train     fine-tune a causal LM (LoRA, QLoRA or full), optionally merge and upload
  merge     merge any PEFT LoRA adapter into its base, streaming and verified
  push      upload final_model/, adapter/ or merged_model/ to the Hugging Face Hub
  generate  print a model's reply to a prompt (chat template applied)
"""


# Subcommand -> module with its `main`; imported only when used, so that `fnsft --help` and flag errors answer at
# once and `fnsft merge` does not pay for the training stack.
COMMANDS = {"train": "training", "merge": "merge", "push": "hub", "generate": "generate"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fnsft: error: unknown command '{name}'; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(f"functionalnetworkssft.{COMMANDS[name]}")
    return run_guarded(module.main, rest, prog=f"fnsft {name}")


def setup_logging() -> None:
    import logging
    import warnings

    # Deprecation notices inside transformers/PEFT/TRL are for their maintainers, not for someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    # bitsandbytes tries to fetch an optional CPU kernel from the Hub at import and warns when it cannot.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    ours = logging.getLogger("functionalnetworkssft")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def run_guarded(command, argv: list[str], prog: str) -> int:
    """Run a subcommand; errors a user can cause become one line on stderr with exit status 2 or 1."""
    setup_logging()
    try:
        command(argv, prog=prog)
    except FnsftError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"{prog}: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs written so far are kept.", file=sys.stderr)
        return 130
    return 0
