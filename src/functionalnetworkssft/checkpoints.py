"""Trainer checkpoints a run can trust: which are complete, which one `latest` means, and whether it fits the flags.

A checkpoint is complete when the Trainer finished writing it. After each save, `fnsft train` writes
`fnsft_checkpoint.json` into the folder, listing every file with its size and the settings that fix the shapes of
what was saved; a folder killed or cut short mid-write has no such file, or files of other sizes. Checkpoints made
by other tools are judged by their structure (trainer state, weights and optimizer files that open).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functionalnetworkssft.weights import DamagedFile, index_shards, safetensors_problem

MARKER = "fnsft_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "adapter_model.bin",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# torch.save zip archives; a cut-short one has no central directory at its end, so opening it fails.
ARCHIVES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")
# Settings that fix what a checkpoint holds: the shapes of its weights and optimizer state (resuming with others
# cannot load them) and the functional-network mask (resuming with another would break its protected rows).
SHAPE_SETTINGS = ("use_peft", "lora_r", "lora_target_modules", "mask_mode", "ica_template", "ica_component_ids",
                  "ica_mask_layers", "forgetting_guard", "forgetting_weight", "forgetting_guard_share")


def step_of(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def write_marker(folder: Path, settings: dict[str, Any]) -> None:
    """Record a finished save: every file's size, and the shape settings it was saved with."""
    from functionalnetworkssft.outputs import write_json_atomic

    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    write_json_atomic(folder / MARKER, {"files": files, "settings": settings})


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint; None when it is."""
    if not folder.is_dir():
        return "no such folder"
    marker = folder / MARKER
    if marker.exists():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MARKER} is damaged"
        if not isinstance(files, dict):
            return f"{MARKER} is damaged"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return _weights_problem(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save did not finish)"
    try:
        loaded = json.loads(state.read_text())
        if not isinstance(loaded, dict) or "global_step" not in loaded:
            return f"{TRAINER_STATE} is damaged"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is damaged"
    for name in ARCHIVES:
        path = folder / name
        if path.exists():
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError):
                return f"{name} is cut short"
    if not (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file():
        return "optimizer.pt is missing"
    return _weights_problem(folder)


def _weights_problem(folder: Path) -> str | None:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        return "no weights file"
    for name in present:
        if name.endswith(".safetensors"):
            problem = safetensors_problem(folder / name)
            if problem:
                return f"{name}: {problem}"
        elif name.endswith(".index.json"):
            try:
                shards = index_shards(folder / name)
            except DamagedFile:
                return f"{name} is damaged"
            for shard in shards:
                if not (folder / shard).is_file():
                    return f"{shard} is missing"
                if shard.endswith(".safetensors") and (problem := safetensors_problem(folder / shard)):
                    return f"{shard}: {problem}"
    return None


@dataclass
class Latest:
    """The newest complete checkpoint of a folder, and the newer ones that were skipped (with the reason)."""

    path: Path | None
    skipped: list[tuple[Path, str]]


def latest(output_dir: Path) -> Latest:
    if not output_dir.is_dir():
        return Latest(None, [])
    found = sorted(((s, p) for p in output_dir.iterdir() if p.is_dir() and (s := step_of(p)) is not None),
                   reverse=True)
    skipped = []
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            return Latest(path, skipped)
        skipped.append((path, reason))
    return Latest(None, skipped)


def settings_problems(folder: Path, current: dict[str, Any]) -> list[str]:
    """One line per shape setting whose value differs from the one `folder` was saved with."""
    saved = _saved_settings(folder)
    found = []
    for name in SHAPE_SETTINGS:
        if name in saved and name in current and _normal(saved[name]) != _normal(current[name]):
            if name == "ica_template":
                found.append(f"the functional-network template (sha256 {_shown(current[name])}) differs from the one "
                             f"{folder.name} was trained with ({_shown(saved[name])}); resume with that template, "
                             "or start a new run.")
                continue
            found.append(f"--{name} {_shown(current[name])} differs from the {_shown(saved[name])} that {folder.name} "
                         f"was trained with, so it cannot continue that run; resume with --{name} "
                         f"{_shown(saved[name])}, or start a new run.")
    return found


def _saved_settings(folder: Path) -> dict[str, Any]:
    try:
        settings = json.loads((folder / MARKER).read_text()).get("settings")
        if isinstance(settings, dict):
            return settings
    except (OSError, ValueError, AttributeError):
        pass
    # A checkpoint from an older fnsft or another tool: what its adapter config says.
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {"use_peft": False} if any((folder / n).is_file() for n in ("model.safetensors",
                                                                            "model.safetensors.index.json")) else {}
    if not isinstance(adapter, dict):
        return {}
    saved: dict[str, Any] = {"use_peft": True}
    if isinstance(adapter.get("r"), int):
        saved["lora_r"] = adapter["r"]
    return saved


def code_problems(folder: Path) -> list[str]:
    """The torch archives of `folder` that would run code when the Trainer loads them: each is opened now, as the
    Trainer will (torch.load with weights_only, numpy's arrays allowed, memory-mapped so nothing large is read), so
    that a payload is refused in one line before anything loads, not as an error after training has started."""
    present = [folder / name for name in ARCHIVES if (folder / name).is_file()]
    if not present:
        return []
    import numpy as np
    import torch

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    found = []
    for path in present:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # whatever the unpickler refuses, the Trainer would refuse mid-run
            found.append(f"--resume_from_checkpoint: {folder.name}/{path.name} is not plain saved state: loading it "
                         f"would run code or fails ({type(exc).__name__}); it was not loaded. Resume from another "
                         "checkpoint, or start a new run.")
    return found


def _normal(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == []:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
