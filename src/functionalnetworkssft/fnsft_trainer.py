"""`python -m functionalnetworkssft.fnsft_trainer ARGS` is `fnsft train ARGS`, as the reference document shows."""

import sys

from functionalnetworkssft.cli import run_guarded


def train(argv: list[str], prog: str) -> None:
    if "-h" in argv or "--help" in argv:
        # Help needs only the flags: answered without importing the training stack (seconds of torch and PEFT).
        from functionalnetworkssft.config import TrainConfig, parse

        parse(TrainConfig, argv, prog)
        return
    # Imported here, after run_guarded has set up logging, since the training stack logs as it is imported.
    from functionalnetworkssft.training import main

    main(argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(train, list(sys.argv[1:] if argv is None else argv), prog="fnsft train")


if __name__ == "__main__":
    raise SystemExit(main())
