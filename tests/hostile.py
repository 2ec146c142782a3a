"""Helpers shared by the hostile-input tests: run a command as a user would, and see exactly what it said."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from functionalnetworkssft.cli import main


def cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """Run `fnsft ARGV` in this process: (exit status, the lines of stderr that are errors, stdout)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    return code, errors, captured.out


def one_line(errors: list[str], *needles: str) -> str:
    """The single error line, after checking it is one line that contains every needle."""
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def run_fnsft(*argv: str, env: dict | None = None, code: str | None = None, timeout: int = 300,
              preexec_fn=None) -> subprocess.CompletedProcess:
    """Run fnsft in a real process (for kills, locks and file-size limits); `code` replaces the entry script."""
    script = code or "import sys\nfrom functionalnetworkssft.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *[str(a) for a in argv]], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def train_with_callback(callback: str) -> str:
    """A script that runs `fnsft train ARGV` with one more Trainer callback, defined by `callback` (Python source of
    a class named Callback): the way a test reaches into a real training process at a chosen moment."""
    return f"""
import os, signal, sys, time
from transformers import TrainerCallback
import trl

{callback}

original_init = trl.SFTTrainer.__init__
def patched(self, *a, **k):
    original_init(self, *a, **k)
    self.add_callback(Callback())
trl.SFTTrainer.__init__ = patched

from functionalnetworkssft.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def no_traceback(stderr: str) -> None:
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]


def listing(folder: Path) -> list[str]:
    """Every path under folder, relative, sorted: what is (and is not) left on disk."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
