"""Merge a PEFT LoRA adapter into its base model: streaming, exact, verified.

The base model is never loaded as a model. Its safetensors shards are read one row block at a time; each tensor a
LoRA adapter touches gets its delta added in float32 and is cast once back to the tensor's own dtype; every other
tensor is copied byte for byte. Peak memory is therefore one row block plus the adapter, whatever the model's size.
The output goes to a hidden folder beside the target and is renamed into place only once complete and verified.

Semantics follow PEFT's LoRA layers exactly (scaling, rsLoRA, DoRA, rank/alpha patterns, fan_in_fan_out for
Conv1D, lora_bias, modules_to_save, trainable tokens, resized embeddings), with one deliberate difference: where
input and output embeddings are tied and the adapter changes only one of them, the merge unties them, so that the
merged model computes what base+adapter computed (PEFT's merge_and_unload adds the delta to the shared tensor).

QLoRA: PEFT does not record that an adapter was trained on a quantized base. When the adapter folder holds
`fnsft_training.json` (written by `fnsft train`), the merge reads from it:
  quantization               "4bit" | "8bit" | null
  quantized_modules          module names whose weights were quantized in training (embeddings and lm_head never)
  bnb_4bit_quant_type        "nf4" (default) or "fp4"
  bnb_4bit_use_double_quant  true (default)
  bnb_4bit_blocksize         64 (default)
"""

# Imported on first use, so that `fnsft merge` parses its flags and starts hashing before torch loads.
_API = {"LoraTarget": "adapter", "MergeReport": "report", "MergeConfig": "command", "main": "command",
        "merge_adapter": "run"}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"functionalnetworkssft.merge.{_API[name]}"), name)
    raise AttributeError(f"module 'functionalnetworkssft.merge' has no attribute {name!r}")
