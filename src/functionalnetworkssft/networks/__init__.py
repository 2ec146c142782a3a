"""Functional networks: groups of MLP output channels that co-activate, found with ICA, and used in training to
restrict which output rows of the MLP projections may change.

- `layout`: where a model's decoder layers, MLP blocks and MLP output projections are; layer specs ("0:4,9:").
- `collect`: MLP block outputs over sample tokens, in a seeded token reservoir of bounded size.
- `ica`: standardise, PCA, FastICA, and the channel selection rule (zscore or percentile) per component.
- `templates`: the template file (the earlier tools' format plus provenance), read and checked against a model.
- `masks`: the update restriction (lesion/preserve) for LoRA and full fine-tuning, and the forward-pass masking.
- `plan`: the network one training run uses, attached for training and recorded beside the weights.
- `options`: the ICA options `fnsft templates` and `fnsft train` share.
- `command`: `fnsft templates`, and building templates from a run's own data.
"""

# Where `fnsft train --mask_mode ...` saves the templates it built from its own training data.
TEMPLATES_FILE = "global_templates.json"

# Imported on first use, so that parsing `fnsft train` flags (which share networks.options) does not load torch.
_API = {"DEFAULT_MAX_TOKENS": "command", "DEFAULT_SAMPLES": "command", "build_templates": "command",
        "sample_rows": "command", "NetworkPlan": "plan", "Templates": "templates", "read_templates": "templates"}

__all__ = ["TEMPLATES_FILE", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"functionalnetworkssft.networks.{_API[name]}"), name)
    raise AttributeError(f"module 'functionalnetworkssft.networks' has no attribute {name!r}")
