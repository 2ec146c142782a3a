"""Names of the records fnsft writes beside its outputs, which later commands read back."""

# Written beside an adapter or model by `fnsft train` (base, data, method, quantized layers) so that merge,
# generate and push need no extra flags.
TRAINING_RECORD = "fnsft_training.json"
# Written into merged_model/ by the merge: verification figures and input hashes.
MERGE_REPORT = "merge_report.json"
