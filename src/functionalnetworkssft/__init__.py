"""FunctionalNetworksSFT: supervised fine-tuning of causal language models you can trust.

From Python (imported on first use, so `import functionalnetworkssft` stays light):

    from functionalnetworkssft import TrainConfig, train, merge_adapter, push
"""

import os

__version__ = "0.1.0"

# transformers 5 kernelizes every model it loads with code fetched from the Hub (kernels-community) unless told not
# to: on a GPU without network that fails at the first training step, and with network it runs binaries nobody asked
# for. fnsft runs only the model's own code; USE_HUB_KERNELS=YES in the environment opts back in.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

_API = {"TrainConfig": ("functionalnetworkssft.training.config", "TrainConfig"),
        "train": ("functionalnetworkssft.training.pipeline", "train"),
        "TrainResult": ("functionalnetworkssft.training.pipeline", "TrainResult"),
        "merge_adapter": ("functionalnetworkssft.merge", "merge_adapter"),
        "push": ("functionalnetworkssft.hub", "push")}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'functionalnetworkssft' has no attribute {name!r}")
