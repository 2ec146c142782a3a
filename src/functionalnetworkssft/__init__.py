"""FunctionalNetworksSFT: supervised fine-tuning of causal language models you can trust.

From Python (imported on first use, so `import functionalnetworkssft` stays light):

    from functionalnetworkssft import TrainConfig, train, merge_adapter, push
"""

from functionalnetworkssft import hub_code

__version__ = "0.1.0"

# transformers and bitsandbytes run kernels fetched from the Hub unless told not to (hub_code.py).
hub_code.keep_hub_kernels_out()
hub_code.keep_bitsandbytes_from_the_hub()

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
