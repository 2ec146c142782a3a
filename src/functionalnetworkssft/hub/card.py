"""The model card (README.md) uploaded with a model: Hub metadata, how to use it, and how it was made, from what
the run recorded. Local paths are never published: they are cut to a folder name."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.hub.auth import REPO_PART
from functionalnetworkssft.hub.http import PREFLIGHT_TIMEOUT_S
from functionalnetworkssft.records import MERGE_REPORT, TRAINING_RECORD
from functionalnetworkssft.weights import ADAPTER_WEIGHTS

PUBLIC_ENDPOINT = "https://huggingface.co"
LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".gguf", ".arrow", ".yaml", ".yml")
# Merge report entries that are machine detail (per-tensor lists, file hashes, local paths), not figures for a reader.
REPORT_DETAIL = ("base_model", "adapter_path", "output_dir", "replaced_tensors", "inputs", "notes", "tokenizer_from",
                 "files")
TABLE_LIST_MAX = 8
KIND_LABEL = {"adapter": "LoRA adapter", "merged": "merged model", "full": "fine-tuned model"}
RUN_SUBFOLDERS = ("final_model", "adapter", "merged_model")


@dataclass
class CardInfo:
    """What the model card says about how the model was made. Local paths are reduced to folder names."""

    base_model: str | None = None  # as the user gave it: a Hub id goes into the metadata, anything else only as a name
    datasets: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    license: str | None = None  # the base model's; looked up when None
    tags: list[str] = field(default_factory=list)
    merge_report: dict[str, Any] | None = None
    method: str | None = None  # lora, qlora, lora-8bit or full, as fnsft_training.json records it
    networks: dict[str, Any] | None = None  # the functional-network mask, as fnsft_training.json records it
    forgetting: dict[str, Any] | None = None  # the forgetting probe's measurements and the guard, as recorded

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CardInfo":
        """Read what a run left in the folder: fnsft_training.json, else the adapter's or model's own config."""
        folder = Path(folder)
        record = read_json(folder / TRAINING_RECORD)
        if record is None:
            # merged_model/ sits beside the run's final_model/ and adapter/, whose record names the base as the user
            # gave it (a Hub id), where the merge report only knows the local copy that was merged.
            record = next((found for name in ("final_model", "adapter")
                           if (found := read_json(folder.parent / name / TRAINING_RECORD)) is not None), {})
        report = read_json(folder / MERGE_REPORT)
        base = record.get("base_model_hub_id") or record.get("base_model")
        if not base:
            adapter_config = read_json(folder / "adapter_config.json") or {}
            config = read_json(folder / "config.json") or {}
            base = (adapter_config.get("base_model_name_or_path") or (report or {}).get("base_model")
                    or config.get("_name_or_path"))
        datasets = record.get("datasets") or record.get("dataset") or []
        if isinstance(datasets, str):
            datasets = [datasets]
        return cls(base_model=base or None, datasets=[str(d) for d in datasets],
                   hyperparameters=dict(record.get("hyperparameters") or {}), license=record.get("license"),
                   tags=list(record.get("tags") or []), merge_report=report, method=record.get("method"),
                   networks=record.get("functional_networks") if isinstance(record.get("functional_networks"), dict)
                   else None,
                   forgetting=record.get("forgetting") if isinstance(record.get("forgetting"), dict) else None)


def detect_kind(folder: str | Path) -> str:
    """'adapter' (PEFT), 'merged' (an fnsft merge) or 'full' (any transformers model folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--model_dir {folder}: no such folder.")
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
            raise UsageError(f"--model_dir {folder} has adapter_config.json but no adapter_model.safetensors; "
                             "the adapter was not saved completely.")
        return "adapter"
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UsageError(f"--model_dir {folder} has config.json but no weights (*.safetensors); "
                             "the model was not saved completely.")
        return "merged" if (folder / MERGE_REPORT).is_file() or folder.name == "merged_model" else "full"
    present = [name for name in RUN_SUBFOLDERS if (folder / name).is_dir()]
    if present:
        choices = " or ".join(str(folder / name) for name in present)
        raise UsageError(f"--model_dir {folder} is a run's output folder; pass {choices}.")
    raise UsageError(f"--model_dir {folder} holds neither adapter_config.json (an adapter) nor config.json "
                     "(a model); pass a run's final_model/, adapter/ or merged_model/ folder.")


def render_card(card: CardInfo, kind: str, repo_id: str, endpoint: str | None = None) -> str:
    """README.md for the Hub: YAML metadata the Hub indexes, then how to use the model and how it was made."""
    from huggingface_hub import ModelCardData

    endpoint = (endpoint or PUBLIC_ENDPOINT).rstrip("/")
    base_id = card.base_model if card.base_model and is_hub_id(card.base_model) else None
    hub_datasets = [d for d in card.datasets if is_hub_id(d)]
    tags = ["fnsft", "sft", "text-generation"]
    tags += {"adapter": ["peft", "lora"], "merged": ["lora", "merged"], "full": ["full-finetune"]}[kind]
    if base_id and kind == "adapter":
        tags.append(f"base_model:adapter:{base_id}")
    tags += [t for t in card.tags if t not in tags]
    # A merged LoRA is a fine-tune of its base for the Hub's model tree, not a merge of several models.
    relation = {"base_model_relation": "finetune"} if base_id and kind != "adapter" else {}
    metadata = ModelCardData(
        base_model=base_id, library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags, datasets=hub_datasets or None, license=card.license, **relation,
    )

    name = repo_id.split("/")[1]
    if base_id:
        base_text = f"[{base_id}]({endpoint}/{base_id})"
    else:
        base_text = f"a local model (`{_public(card.base_model)}`)" if card.base_model else "an unrecorded base model"
    lines = [f"---\n{metadata.to_yaml()}\n---", "", f"# {name}", ""]
    if kind == "adapter":
        lines += [f"A LoRA adapter for {base_text}, trained with supervised fine-tuning by "
                  "[FunctionalNetworksSFT](https://pypi.org/project/functionalnetworkssft/) (`fnsft`).", "",
                  "## Use", "", "```python",
                  "from peft import AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]
    else:
        what = ("A standalone model: a LoRA adapter merged into" if kind == "merged"
                else "A model fully fine-tuned from")
        lines += [f"{what} {base_text} with supervised fine-tuning by "
                  "[FunctionalNetworksSFT](https://pypi.org/project/functionalnetworkssft/) (`fnsft`). "
                  "No adapter is needed to use it.", "",
                  "## Use", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]

    lines += ["", "## Training", "", f"- Base model: {base_text}"]
    if card.method:
        lines.append(f"- Method: {card.method}")
    if card.networks:
        net = card.networks
        meaning = {"lesion": "the network's channels were protected and everything else could change",
                   "preserve": "only the network's channels could change"}.get(str(net.get("mask_mode")), "")
        lines.append(f"- Functional networks ({net.get('mask_mode')}): {net.get('network_channels')} MLP output "
                     f"channels from ICA components {', '.join(map(str, net.get('component_ids') or []))} (layers "
                     f"{net.get('mask_layers')}); {meaning}. The protected rows of the MLP output projections are "
                     "bit-identical to the base model's.")
    lines += _forgetting_lines(card.forgetting)
    for dataset in card.datasets:
        shown = (f"[{dataset}]({endpoint}/datasets/{dataset})" if is_hub_id(dataset)
                 else f"a local dataset (`{_public(dataset)}`)")
        lines.append(f"- Dataset: {shown}")
    if card.license:
        lines.append(f"- License: {card.license} (the base model's)")
    rows = _table_rows(card.hyperparameters)
    if rows:
        lines += ["", "### Hyperparameters", "", "| Name | Value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in rows]
    if kind == "merged" and card.merge_report:
        report = card.merge_report
        verification = report.get("verification") if isinstance(report.get("verification"), dict) else {}
        rows = _table_rows(verification, skip=("probes", "blocks")) + _table_rows(
            {k: v for k, v in report.items() if k != "verification"}, skip=REPORT_DETAIL)
        if rows:
            lines += ["", "## Merge verification", "",
                      "The merged model was reloaded and compared with base + adapter on fixed probe inputs "
                      "(figures from `merge_report.json`).", "", "| Figure | Value |", "| --- | --- |"]
            lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines) + "\n"


def _forgetting_lines(record: dict[str, Any] | None) -> list[str]:
    """How far the model moved from its base on general text, as the run's forgetting probe measured it."""
    if not record:
        return []
    lines = []
    guard = record.get("guard") if isinstance(record.get("guard"), dict) else None
    if guard:
        lines.append(f"- Forgetting guard: {guard.get('kind')} (weight {guard.get('weight')})")
    measured = record.get("measurements") if isinstance(record.get("measurements"), list) else []
    last = measured[-1] if measured and isinstance(measured[-1], dict) else None
    try:
        kl, agreement = float(last["forgetting_kl"]), float(last["base_agreement"])
    except (TypeError, KeyError, ValueError):
        return lines
    lines.append(f"- Forgetting, measured at the end of training on {_public(str(record.get('text', 'general text')))}"
                 f": KL(base || tuned) {kl:.4f} nats per token, next-token agreement with the base {agreement:.1%}")
    return lines


def _table_rows(values: dict, skip: tuple[str, ...] = (), prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a mapping into (name, value) rows with secrets dropped and local paths cut to folder names."""
    rows: list[tuple[str, str]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in skip or "token" in str(key).lower():
            continue
        if isinstance(value, dict):
            rows += _table_rows(value, skip, prefix=f"{name}.")
            continue
        if isinstance(value, (list, tuple)):
            shown = (", ".join(str(_public(v)) for v in value) if len(value) <= TABLE_LIST_MAX
                     else f"{len(value)} entries")
        elif isinstance(value, float):
            shown = repr(value) if len(repr(value)) <= 10 else f"{value:.6g}"
        else:
            shown = str(_public(value))
        rows.append((name, shown.replace("|", "\\|").replace("\n", " ")))
    return rows


def looks_local(value: str) -> bool:
    return (value.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))
            or os.path.isabs(value) or os.path.exists(value))


def _public(value: Any) -> Any:
    """A value safe to publish: a local path becomes its last component, so no machine layout leaks."""
    if isinstance(value, str) and looks_local(value):
        return Path(value.rstrip("/\\")).name or value
    return value


def is_hub_id(value: str) -> bool:
    if looks_local(value) or value.lower().endswith(LOCAL_FILE_SUFFIXES):
        return False
    parts = value.split("/")
    return len(parts) <= 2 and all(REPO_PART.match(p) and "--" not in p and ".." not in p for p in parts)


def base_license(base_model: str | None, token: str | None) -> str | None:
    """The base model's license from its card: a local folder's README.md, the download cache, or the Hub."""
    if not base_model:
        return None
    if os.path.isdir(base_model):
        return _card_license(Path(base_model) / "README.md")
    if not is_hub_id(base_model):
        return None
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(base_model, "README.md")
    if isinstance(cached, str):
        found = _card_license(Path(cached))
        if found:
            return found
    try:
        info = HfApi(token=token).model_info(base_model, timeout=PREFLIGHT_TIMEOUT_S)
    except Exception:  # the card is better without a license than the upload failing over one
        return None
    return getattr(info.card_data, "license", None) if info.card_data else None


def _card_license(readme: Path) -> str | None:
    try:
        from huggingface_hub import ModelCard

        data = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    value = getattr(data, "license", None)
    return value if isinstance(value, str) else None


def read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
