"""fnsft from Python: fine-tune on an in-memory dataset, merge, and look at the metrics.

    python examples/python_api.py MODEL_DIR OUTPUT_DIR

MODEL_DIR is any model fnsft train takes (a local folder, a Hub id, a .gguf file or pkg:PACKAGE/FILE).
"""

import sys

import datasets

from functionalnetworkssft import TrainConfig, merge_adapter, train
from functionalnetworkssft.errors import FnsftError

model, output = sys.argv[1], sys.argv[2]
rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                      {"role": "assistant", "content": "It is blue."}]} for i in range(32)]
config = TrainConfig(model_name_or_path=model, output_dir=output, use_peft=True, max_steps=4,
                     per_device_train_batch_size=8, validation_split=0.25, learning_rate=1e-3)
try:
    result = train(config, train_dataset=datasets.Dataset.from_list(rows))
except FnsftError as error:  # the same one-line messages as the command line
    sys.exit(f"training failed: {error}")
print(result.output_dir, {k: round(v, 4) for k, v in result.metrics.items() if "loss" in k})
report = merge_adapter(result.output_dir / "final_model", result.output_dir / "merged_model")
print(report.summary())
