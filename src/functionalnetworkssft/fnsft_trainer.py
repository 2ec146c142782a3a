"""`python -m functionalnetworkssft.fnsft_trainer ARGS` is `fnsft train ARGS`, as the reference document shows."""

import sys

from functionalnetworkssft.cli import run_guarded
from functionalnetworkssft.training.command import train


def main(argv: list[str] | None = None) -> int:
    return run_guarded(train, list(sys.argv[1:] if argv is None else argv), prog="fnsft train")


if __name__ == "__main__":
    raise SystemExit(main())
