"""The merge's input files: which files hold a model folder's weights, and their sha256 for merge_report.json.

Hashing reads every byte of the base once (1.7 s for 2 GB on one core). `fnsft merge` starts it on a spare core
before the engine's libraries load (importing torch is about 1.5 s of one core), so the report's fingerprints cost
the merge almost nothing; anything not hashed ahead is hashed on demand. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from functionalnetworkssft.errors import FnsftError, MergeError
from functionalnetworkssft.weights import DamagedFile, adapter_weights_file, index_shards

_AHEAD: dict[tuple[str, int, int], Future] = {}
_LOCK = threading.Lock()


def weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files: the shards its index names, else its single weights file."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                names = index_shards(index)
            except DamagedFile as exc:
                raise MergeError(f"{index}: {exc}; re-download the base model.") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise MergeError(f"{index}: shard {missing[0]} is missing; re-download the base model.")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    raise MergeError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin found; "
                     "point --base_model_name_or_path at a transformers model folder.")


def _key(path: Path) -> tuple[str, int, int]:
    # A file replaced or rewritten after it was hashed ahead has another size or mtime, and is hashed again.
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(8 << 20)  # one buffer for the whole file: no 8 MB allocation per read beside the merge
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def hash_ahead(paths: list[Path]) -> None:
    """Start hashing these files on a background thread. A daemon thread: a merge refused a moment later exits at
    once instead of waiting for the hashing of a model it will never read."""
    pending: list[tuple[Path, Future]] = []
    with _LOCK:
        for path in paths:
            try:
                key = _key(path)
            except OSError:
                continue
            if key not in _AHEAD:
                _AHEAD[key] = Future()
                pending.append((path, _AHEAD[key]))

    def work() -> None:
        for path, future in pending:
            try:
                future.set_result(_digest(path))
            except OSError as exc:
                future.set_exception(exc)

    if pending:
        threading.Thread(target=work, name="fnsft-hash-ahead", daemon=True).start()


def sha256_file(path: Path) -> str:
    """The file's sha256, from the hashing started ahead when it covered this very file."""
    with _LOCK:
        ahead = _AHEAD.get(_key(path))
    if ahead is not None:
        try:
            return ahead.result()
        except OSError:
            pass
    return _digest(path)


def hash_inputs_ahead(adapter_dir: Path, base_name: str | None) -> None:
    """Best effort, before anything is validated: the adapter's files and, when the base is a local folder (named by
    the flag or the adapter's config), its weight files. Whatever this cannot find is reported later by the merge."""
    paths = [adapter_dir / "adapter_config.json"]
    try:
        paths.append(adapter_weights_file(adapter_dir))
    except FnsftError:
        pass
    if base_name is None:
        try:
            base_name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base_name = None
    base = Path(os.path.expanduser(str(base_name))) if base_name else None
    try:
        if base is not None and base.is_dir():
            paths += weight_files(base)
        hash_ahead([p for p in paths if p.is_file()])
    except (MergeError, OSError):  # an unreadable folder: the merge itself says so, in its own words
        pass
