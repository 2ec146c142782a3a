"""`fnsft train`: fine-tune a causal LM (LoRA, QLoRA or all weights), then merge, export and upload.

- `config`: `TrainConfig`, every flag with its help text, and the rules that tie flags together.
- `command`: the command line: flags are parsed and checked before the training stack is imported.
- `pipeline`: the whole run, top to bottom (`run`, and `train` for Python callers).
- `preflight`: what is checked before anything is loaded: outputs, inputs, templates, the checkpoint to resume.
- `trainer`: the LoRA and SFT configuration, TRL's trainer, and the functional network that restricts it.
- `guard`: the callback that keeps the output folder's record and stops a diverging run.
- `results`: final_model/, adapter/, the training record, run_config.yaml, loss.png and the sample replies.
- `after`: the merge and the GGUF export at the end of a run.
"""

# Imported on first use, so that parsing `fnsft train` flags does not load torch and TRL.
_API = {"TrainConfig": "config", "TrainResult": "pipeline", "train": "pipeline", "run": "pipeline",
        "lora_config": "trainer", "sft_config": "trainer"}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"functionalnetworkssft.training.{_API[name]}"), name)
    raise AttributeError(f"module 'functionalnetworkssft.training' has no attribute {name!r}")
