"""Options `fnsft templates` and `fnsft train --mask_mode` share: one definition, one help text."""

from __future__ import annotations

from typing import Any

from functionalnetworkssft.options import arg


def ica_components_arg() -> Any:
    return arg("ICA components (networks) to find (when templates are built).", default=10, positive=True)


def ica_threshold_arg() -> Any:
    return arg("How a component's channels are chosen: zscore (z-scored mixing weight above --ica_z, as the paper's "
               "code does) or percentile (|weight| at or above --ica_percentile, as earlier tools did).",
               default="zscore")


def ica_percentile_arg() -> Any:
    return arg("Percentile of |mixing weight| for --ica_threshold percentile.", default=98.0, positive=True,
               below=100)


def ica_z_arg() -> Any:
    return arg("z-score cut for --ica_threshold zscore.", default=1.96, positive=True)
