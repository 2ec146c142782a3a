"""What an upload publishes, and the two things it must never publish: the Hub token and this machine's paths.

- Every file is scanned for the token, streaming, whatever its size; one hit stops the upload.
- The records fnsft and PEFT write beside the weights (adapter_config.json, fnsft_training.json,
  merge_report.json, and the top level of config.json and friends) are uploaded as public copies: a value that is
  a local path is replaced by the base model's Hub id where it names the base and that id is known, and otherwise
  left out, which the upload says in one line. The local files are never changed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import FnsftError
from functionalnetworkssft.hub.card import LOCAL_FILE_SUFFIXES, is_hub_id, read_json
from functionalnetworkssft.paths import within
from functionalnetworkssft.records import MERGE_REPORT, TRAINING_RECORD

logger = logging.getLogger(__name__)

SCAN_CHUNK = 8 << 20
# Records whose every value is ours to check, at any depth.
RECORDS = ("adapter_config.json", TRAINING_RECORD, MERGE_REPORT)
# The report beside an exported GGUF (FILE.gguf.json) is ours too.
GGUF_REPORT_SUFFIX = ".gguf.json"
# Library configs: only their top-level name keys can hold a path (name_or_path and the like); their other values
# are chat templates, vocabularies and token tables, whose strings must stay as they are.
CONFIGS = ("config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json",
           "preprocessor_config.json")
# Keys that name the base model: a local path there becomes the base's Hub id when it is known.
BASE_KEYS = ("base_model_name_or_path", "base_model", "base_model_path", "_name_or_path", "name_or_path")


@dataclass
class UploadFile:
    path_in_repo: str
    local: Path
    content: bytes | None = None  # a public copy to upload instead of the local file


def files_to_upload(folder: Path, extra: tuple[Path, ...] = ()) -> list[UploadFile]:
    """Every file of the folder (minus hidden ones and the local README.md the card replaces) and the `extra` files
    (uploaded at the top of the repository, e.g. an exported GGUF and its Modelfile), with public copies of the
    records that carry local paths."""
    hub_id = base_hub_id(folder)
    dropped: list[str] = []
    found = [UploadFile(path.name, path, _public_copy(path, hub_id, dropped)) for path in extra]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if rel.as_posix() == "README.md":
            continue
        if path.is_symlink() and not within(path, folder.resolve()):
            raise FnsftError(f"{path} is a link to {path.resolve()}, outside {folder}; refusing to upload what it "
                             "points to. Replace the link with the file itself, or remove it.")
        found.append(UploadFile(rel.as_posix(), path, _public_copy(path, hub_id, dropped)))
    if dropped:
        logger.warning("Left out of the upload, being local paths%s: %s.",
                       "" if hub_id else " (the base model's Hub id is not known)", "; ".join(dropped))
    return found


def base_hub_id(folder: Path) -> str | None:
    """The base model's Hub repository, as far as the run's records tell."""
    records = [read_json(folder / TRAINING_RECORD)] + [read_json(folder.parent / name / TRAINING_RECORD)
                                                        for name in ("final_model", "adapter")]
    candidates = []
    for record in filter(None, records):
        candidates += [record.get("base_model_hub_id"), record.get("base_model")]
    candidates.append((read_json(folder / "adapter_config.json") or {}).get("base_model_name_or_path"))
    return next((c for c in candidates if isinstance(c, str) and is_hub_id(c) and "/" in c), None)


def _public_copy(path: Path, hub_id: str | None, dropped: list[str]) -> bytes | None:
    """The file's public content when it differs from the local one, else None."""
    deep = path.name in RECORDS or path.name.endswith(GGUF_REPORT_SUFFIX)
    if not (deep or path.name in CONFIGS):
        return None
    loaded = read_json(path)
    if loaded is None:
        return None
    removed: list[str] = []
    public = _scrub(loaded, hub_id, deep, removed, prefix="")
    if public == loaded:
        return None
    dropped += [f"{path.name} {key}" for key in removed]
    return (json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _scrub(value: Any, hub_id: str | None, deep: bool, removed: list[str], prefix: str) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = f"{prefix}{key}"
            if isinstance(item, str) and (deep or key in BASE_KEYS) and is_local_path(item):
                if key in BASE_KEYS and hub_id:
                    out[key] = hub_id
                else:
                    removed.append(name)
                continue
            kept = _scrub(item, hub_id, True, removed, f"{name}.") if deep and isinstance(item, (dict, list)) \
                else item
            if isinstance(item, list) and item and not kept:
                continue  # every entry was a local path: an empty list would still say one was there
            out[key] = kept
        return out
    if isinstance(value, list) and deep:
        kept = []
        for index, item in enumerate(value):
            if isinstance(item, str) and is_local_path(item):
                removed.append(f"{prefix.rstrip('.')}[{index}]")
                continue
            kept.append(_scrub(item, hub_id, True, removed, f"{prefix.rstrip('.')}[{index}]."))
        return kept
    return value


def is_local_path(value: str) -> bool:
    """A string that names something on this machine rather than on the Hub."""
    if not value or "\n" in value or len(value) > 4096:
        return False
    if value.startswith(("pkg:", "/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if re.match(r"^[\w.-]+(/[\w.-]+)+$", value) and value.lower().endswith(LOCAL_FILE_SUFFIXES):
        return True  # a relative file path such as data/train.jsonl
    return value.count("/") > 1 and not value.startswith(("http://", "https://"))


def refuse_secret(files: list[UploadFile], token: str | None, readme: str, retry: str) -> None:
    """Never publish the token: a file that contains it (a config saved unmasked, a log) stops the upload. Every
    byte that would be uploaded is read, in chunks, so no file is too large to be checked."""
    if not token:
        return
    needle = token.encode()
    if needle in readme.encode():
        raise FnsftError("the generated model card contains the Hub token; refusing to upload. This is a bug.")
    for item in files:
        if item.content is not None:
            found = needle in item.content
        else:
            found = _file_contains(item.local, needle)
        if found:
            raise FnsftError(f"{item.local} contains the Hub token; refusing to upload it. Remove the token from that "
                             f"file, then retry with: {retry}")


def _file_contains(path: Path, needle: bytes) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(SCAN_CHUNK):
            window = tail + chunk
            if needle in window:
                return True
            tail = window[-overlap:] if overlap else b""
    return False
