"""What `fnsft train` checks and decides before anything is loaded: the entries it may write, the inputs nothing may
overwrite, the template file, and the checkpoint to resume from."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from functionalnetworkssft import checkpoints, forgetting, networks
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.outputs import OutputFolder, read_manifest
from functionalnetworkssft.paths import looks_like_local_path
from functionalnetworkssft.training.after import GGUF_FILE
from functionalnetworkssft.training.config import TrainConfig


# Every entry any `fnsft train` run may write into its output folder, whatever its flags: a manifest naming anything
# else was not written by fnsft, and nothing it names may be deleted.
EVERY_ENTRY = re.compile("|".join([*(re.escape(name) for name in (
    "final_model", "adapter", "merged_model", "trainer_state.json", "run_config.yaml", "loss.png", "samples.json",
    "runs", "Modelfile", networks.TEMPLATES_FILE, GGUF_FILE, GGUF_FILE + ".json", GGUF_FILE + ".rejected")),
    r"checkpoint-\d+"]))


def writes(cfg: TrainConfig) -> tuple[str, ...]:
    """The entries of output_dir this run may create (fnmatch patterns)."""
    names = ["final_model", "trainer_state.json", "run_config.yaml", "loss.png", "checkpoint-*"]
    if cfg.mask_mode != "none" and cfg.ica_template_path is None:
        names.append(networks.TEMPLATES_FILE)
    if cfg.use_peft:
        names.append("adapter")
    if cfg.merge_adapter_with_base:
        names.append("merged_model")
    if cfg.convert_to_gguf:
        names += [GGUF_FILE, GGUF_FILE + ".json", GGUF_FILE + ".rejected", "Modelfile"]
    if cfg.sample_prompts:
        names.append("samples.json")
    if {"tensorboard", "all"} & set(cfg.report_to):
        names.append("runs")  # the Trainer's TensorBoard folder
    return tuple(names)


def inputs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(flag, path) of the local files and folders this run reads; nothing it writes or removes may contain them."""
    found = []
    for flag, value in (*(("--dataset_name_or_path", source.name) for source in cfg.sources()),
                        ("--eval_dataset_name_or_path", cfg.eval_dataset_name_or_path),
                        ("--model_name_or_path", cfg.model_name_or_path),
                        ("--config", cfg.config_file),
                        ("--chat_template_path", cfg.chat_template_path),
                        ("--ica_template_path", cfg.ica_template_path),
                        ("--forgetting_dataset", cfg.forgetting_dataset),
                        ("--resume_from_checkpoint", cfg.resume_from_checkpoint)):
        if value and value != "latest" and (Path(value).expanduser().exists() or looks_like_local_path(value)):
            found.append((flag, str(Path(value).expanduser())))
    return found


def shape_settings(cfg: TrainConfig, templates: networks.Templates | None = None) -> dict[str, Any]:
    """What a checkpoint of this run holds, to be compared when a run resumes from it."""
    settings: dict[str, Any] = {"use_peft": cfg.use_peft, "mask_mode": cfg.mask_mode}
    if cfg.use_peft:
        settings.update(lora_r=cfg.lora_r, lora_target_modules=list(cfg.lora_target_modules))
    if cfg.mask_mode != "none":
        settings.update(ica_component_ids=sorted(cfg.ica_component_ids), ica_mask_layers=cfg.ica_mask_layers or "all")
        if templates is not None:
            settings["ica_template"] = templates.sha256[:16]
    # A run that changed its guard half-way would be recorded as if guarded one way throughout.
    settings["forgetting_guard"] = cfg.forgetting_guard
    if cfg.forgetting_guard != "none":
        settings["forgetting_weight"] = forgetting.guard_weight(cfg.forgetting_guard, cfg.forgetting_weight)
        if cfg.forgetting_guard in ("kl", "replay"):
            settings["forgetting_guard_share"] = cfg.forgetting_guard_share
    return settings


def given_templates(cfg: TrainConfig, out: Path) -> tuple[networks.Templates | None, list[str]]:
    """The template file the mask comes from, read now: --ica_template_path, or the one an earlier run of this
    folder built (so that resuming recomputes nothing)."""
    if cfg.mask_mode == "none":
        return None, []
    path = cfg.ica_template_path
    if path is None and cfg.resume_from_checkpoint and (out / networks.TEMPLATES_FILE).is_file():
        path = str(out / networks.TEMPLATES_FILE)
    if path is None:
        return None, []
    try:
        templates = networks.read_templates(path)
        if cfg.ica_component_ids:
            templates.network(cfg.ica_component_ids, templates.layers, path)
    except UsageError as exc:
        return None, exc.problems
    return templates, []


def resume_checkpoint(cfg: TrainConfig, out: Path, templates: networks.Templates | None = None
                       ) -> tuple[list[str], checkpoints.Latest | None]:
    """The checkpoint to resume from, or why it cannot be used (incomplete, missing, saved with other shapes)."""
    given = cfg.resume_from_checkpoint
    if not given:
        return [], None
    if given == "latest":
        found = checkpoints.latest(out)
        if found.path is None:
            skipped = "; ".join(f"{p.name} is incomplete ({why})" for p, why in found.skipped)
            return [f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {out}"
                    + (f" ({skipped})" if skipped else "") + "; start without it."], None
    else:
        path = Path(given)
        if not path.is_dir():
            return [f"--resume_from_checkpoint {given}: no such checkpoint folder; give a checkpoint-N folder or "
                    "'latest'."], None
        reason = checkpoints.incomplete_reason(path)
        if reason is not None:
            return [f"--resume_from_checkpoint {given}: not a complete Trainer checkpoint ({reason}); give another "
                    "checkpoint-N folder or 'latest'."], None
        found = checkpoints.Latest(path, [])
    return (checkpoints.settings_problems(found.path, shape_settings(cfg, templates))
            + checkpoints.code_problems(found.path)), found


def announce_resume(found: checkpoints.Latest, folder: OutputFolder, main: bool) -> str:
    """Say which checkpoint the run continues from; remove this run's own incomplete ones that were skipped, so that
    the Trainer's rotation can never keep one of them in place of a complete checkpoint."""
    if not main:
        return str(found.path)
    recorded = set((read_manifest(folder.path) or {}).get("entries", []))
    for path, why in found.skipped:
        ours = path.parent == folder.path and path.name in recorded
        if ours:
            shutil.rmtree(path, ignore_errors=True)
        print(f"Skipped {path.name}: incomplete ({why}){'; removed it' if ours else ''}.")
    print(f"Resuming from {found.path}")
    return str(found.path)
