"""The `fnsft` command: a thin layer that parses a subcommand's config and calls the stage that does the work."""

from __future__ import annotations

import importlib
import os
import sys
import time

from functionalnetworkssft.errors import FnsftError, describe_write_error, first_line

USAGE = """usage: fnsft {train,templates,merge,export-gguf,push,generate,chat} [--help] ...
       fnsft --version

  train        fine-tune a causal LM (LoRA, QLoRA or full), optionally with functional-network masks; merge;
               export; upload
  templates    find a model's functional networks (ICA over MLP outputs) and write a template file
  merge        merge any PEFT LoRA adapter into its base, streaming and verified
  export-gguf  export a model folder to GGUF for llama.cpp and Ollama, verified, with an Ollama Modelfile
  push         upload final_model/, adapter/ or merged_model/ to the Hugging Face Hub
  generate     print a model's reply to a prompt as it is generated (chat template applied)
  chat         chat with a model in the terminal, keeping the conversation
"""


# Subcommand -> module with its `main`; imported only when used, so that `fnsft --help` and flag errors answer at
# once and `fnsft merge` does not pay for the training stack.
COMMANDS = {"train": "training.command:train", "templates": "networks.command", "merge": "merge",
            "export-gguf": "export.command", "push": "hub.command", "generate": "generate", "chat": "generate:chat"}


# How long a replica of a data-parallel run waits, after an error, for the main process to report it.
REPLICA_GRACE_S = 15.0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from functionalnetworkssft import __version__

        print(f"fnsft {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fnsft: error: unknown command '{name}'; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name].partition(":")
    setup_logging()  # before the command's module imports the libraries, some of which log at import
    module = importlib.import_module(f"functionalnetworkssft.{module_name}")
    return run_guarded(getattr(module, function or "main"), rest, prog=f"fnsft {name}")


def setup_logging() -> None:
    import logging
    import warnings

    # Deprecation notices inside transformers/PEFT/TRL are for their maintainers, not for someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    ours = logging.getLogger("functionalnetworkssft")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def run_guarded(command, argv: list[str], prog: str) -> int:
    """Run a subcommand; every failure becomes one line on stderr with exit status 2 (usage) or 1 (runtime).

    Errors the code anticipates say what to fix. A failed write (disk full, read-only) is recognised wherever it
    happens. Anything else is a bug: one line, with the traceback saved to a file (or shown with FNSFT_DEBUG=1)."""
    from functionalnetworkssft import distributed

    setup_logging()
    distributed.quiet_replica()
    try:
        command(argv, prog=prog)
    except FnsftError as exc:
        # In a data-parallel run every process checks the same things; the main one says what failed.
        # A replica that returned at once could end the run (the launcher stops every process when one fails)
        # before the main one had printed, so it waits for the main one to fail first; an error the main process
        # did not share is then printed with the replica's rank.
        if not distributed.is_main():
            time.sleep(REPLICA_GRACE_S)
        where = "" if distributed.is_main() else f" (rank {distributed.rank()})"
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"{prog}: error{where}: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs written so far are kept.", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: never a traceback for the user
        if os.environ.get("FNSFT_DEBUG"):
            raise
        where = "" if distributed.is_main() else f" (rank {distributed.rank()})"
        print(f"{prog}: error{where}: {_describe_unexpected(exc)}", file=sys.stderr)
        return 1
    return 0


def _describe_unexpected(exc: Exception) -> str:
    cause = describe_write_error(exc)
    filename = getattr(exc, "filename", None)
    if cause:
        return f"could not write{f' {filename}' if filename else ''}: {cause}."
    if isinstance(exc, MemoryError):
        return "ran out of memory; use a smaller model, batch or --max_seq_length, or a machine with more memory."
    if isinstance(exc, OSError) and exc.strerror:
        return f"{filename + ': ' if filename else ''}{exc.strerror}."
    import tempfile
    import traceback

    handle, log = tempfile.mkstemp(prefix="fnsft-error-", suffix=".log")
    with os.fdopen(handle, "w") as file:
        traceback.print_exception(exc, file=file)
    return (f"unexpected {type(exc).__name__}: {first_line(exc)[:300]} (this is a bug in fnsft or a library it "
            f"uses; the traceback is in {log}, FNSFT_DEBUG=1 shows it here).")
