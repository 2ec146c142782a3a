"""`fnsft train ARGS`: the flags, checked before the training stack is imported, then the run."""

from __future__ import annotations

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.options import parse
from functionalnetworkssft.training.config import TrainConfig


def train(argv: list[str], prog: str) -> None:
    # Help and flag errors need only the flags: answered before importing the training stack (seconds of torch and
    # PEFT), with the same lines training would give.
    config = parse(TrainConfig, argv, prog)
    problems = config.problems()
    if problems:
        raise UsageError(problems)
    # Imported here, after run_guarded has set up logging, since the training stack logs as it is imported.
    from functionalnetworkssft.training.pipeline import run

    run(config)
