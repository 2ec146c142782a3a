"""`python -m functionalnetworkssft.fnsft_trainer ARGS` is `fnsft train ARGS`, as the reference document shows."""

import sys

from functionalnetworkssft.cli import run_guarded


def train(argv: list[str], prog: str) -> None:
    from functionalnetworkssft.config import TrainConfig, parse
    from functionalnetworkssft.errors import UsageError

    # Help and flag errors need only the flags: answered before importing the training stack (seconds of torch and
    # PEFT), with the same lines training would give.
    config = parse(TrainConfig, argv, prog)
    problems = config.problems()
    if problems:
        raise UsageError(problems)
    # Imported here, after run_guarded has set up logging, since the training stack logs as it is imported.
    from functionalnetworkssft.training import run

    run(config)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(train, list(sys.argv[1:] if argv is None else argv), prog="fnsft train")


if __name__ == "__main__":
    raise SystemExit(main())
