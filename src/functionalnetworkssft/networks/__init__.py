"""Functional networks: groups of MLP output channels that co-activate, found with ICA, and used in training to
restrict which output rows of the MLP projections may change.

- `layout`: where a model's decoder layers, MLP blocks and MLP output projections are; layer specs ("0:4,9:").
- `collect`: MLP block outputs over sample tokens, in a seeded token reservoir of bounded size.
- `ica`: standardise, PCA, FastICA, and the channel selection rule (zscore or percentile) per component.
- `templates`: the template file (the earlier tools' format plus provenance), read and checked against a model.
- `masks`: the update restriction (lesion/preserve) for LoRA and full fine-tuning, and the forward-pass masking.
- `plan`: the network one training run uses, attached for training and recorded beside the weights.
- `command`: `fnsft templates`, and building templates from a run's own data.
"""

from functionalnetworkssft.networks.command import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES, build_templates, sample_rows
from functionalnetworkssft.networks.plan import NetworkPlan
from functionalnetworkssft.networks.templates import Templates, read_templates

# Where `fnsft train --mask_mode ...` saves the templates it built from its own training data.
TEMPLATES_FILE = "global_templates.json"

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_SAMPLES", "NetworkPlan", "TEMPLATES_FILE", "Templates", "build_templates",
           "read_templates", "sample_rows"]
