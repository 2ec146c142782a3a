"""Data-parallel runs (torchrun, accelerate launch): every process trains on its share of the data; the main one
alone checks and owns the output folder, prints, writes, merges and uploads. The others stay quiet.

The launchers set RANK and WORLD_SIZE before Python starts, so this is known before anything is imported or read.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def quiet_replica() -> None:
    """On a process other than the main one: no prints, progress bars, notices or warnings (the main process says
    everything once); errors still end the process with a non-zero status, which ends the whole run."""
    if is_main():
        return
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    warnings.simplefilter("ignore")
    logging.getLogger("functionalnetworkssft").setLevel(logging.ERROR)
    for library in ("transformers", "datasets"):
        if library in sys.modules:  # imported before this ran: their loggers read the variables above only once
            getattr(sys.modules[library], "logging").set_verbosity_error()
