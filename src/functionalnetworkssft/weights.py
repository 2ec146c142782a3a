"""Weight and adapter files checked before anything trusts them: a damaged or hostile file is one line, never a
traceback, a huge allocation, or code run.

- `read_safetensors_header(path)`: the header of a .safetensors file, with every offset checked against the file's
  size before a byte of data is read (a forged header length of 2^62 is refused, not allocated).
- `load_tensors(path)`: a whole adapter-sized tensor file: safetensors, or a .bin through
  torch.load(weights_only=True), which never unpickles code.
- `read_adapter_config(folder)`: adapter_config.json as a mapping with a usable rank and alpha.
- `model_folder_problem(folder)`: whether a model folder's config and weight files are whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import FnsftError, UsageError

# The safetensors library refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class DamagedFile(ValueError):
    """A file whose content is not what its name promises; the message says what is wrong."""


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) after checking the whole layout."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DamagedFile("the file is shorter than a safetensors header (truncated or empty)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise DamagedFile(f"its header claims {header_len} bytes but the file has {size} (truncated or "
                                  "not a safetensors file)")
            raw = handle.read(header_len)
    except OSError as exc:
        raise DamagedFile(f"cannot be read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DamagedFile("its header is not valid JSON (not a safetensors file, or damaged)") from None
    if not isinstance(header, dict):
        raise DamagedFile("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise DamagedFile(f"tensor {name} has a malformed header entry") from None
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise DamagedFile(f"tensor {name} has impossible offsets or shape")
        if dtype in DTYPE_BYTES and (end - begin) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise DamagedFile(f"tensor {name} ({dtype}, shape {shape}) does not fill its {end - begin} bytes")
        spans.append((begin, end, name))
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            raise DamagedFile(f"tensor {name} overlaps another or leaves a gap (damaged header)")
        cursor = end
    if cursor != data_size:
        what = "ends before its last tensor" if cursor > data_size else "has bytes after its last tensor"
        raise DamagedFile(f"the file {what} ({data_size} data bytes, header says {cursor}): truncated or damaged")
    return header, 8 + header_len


def safetensors_problem(path: Path) -> str | None:
    try:
        read_safetensors_header(path)
    except DamagedFile as exc:
        return str(exc)
    return None


def load_tensors(path: Path) -> dict:
    """All tensors of an adapter-sized file; DamagedFile when it is damaged or is a pickle that runs code."""
    import torch

    if path.suffix == ".safetensors":
        read_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # the library's own error type; the header was checked, so this is rare damage
            raise DamagedFile(f"cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
                from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: never fall back to an unsafe load
        raise DamagedFile(f"refused to load: not a plain tensor file that torch.load(weights_only=True) accepts "
                          f"({type(exc).__name__}); it may run code when unpickled. Re-save it with safetensors") \
            from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DamagedFile("expected a mapping of names to tensors")
    return loaded


def adapter_weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FnsftError(f"{folder}: no adapter_model.safetensors or adapter_model.bin; the adapter was not saved "
                     "completely.")


def read_adapter_config(folder: Path, flag: str = "--adapter_path") -> dict[str, Any]:
    """adapter_config.json as a mapping whose rank and alpha PEFT can use (UsageError naming the file otherwise)."""
    path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: no such folder.")
    if not path.is_file():
        raise UsageError(f"{flag} {folder}: no adapter_config.json; point it at a PEFT adapter folder "
                         "(e.g. OUTPUT/final_model or OUTPUT/adapter).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); re-save the adapter.") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object of LoRA settings, got a {type(config).__name__}; "
                         "re-save the adapter.")
    problems: list[str] = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return config  # other adapter types have no rank; whoever reads them refuses or handles them
    rank = config.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.append(f"{path}: r must be a positive whole number (got {rank!r}).")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.append(f"{path}: lora_alpha must be a finite number (got {alpha!r}).")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (key == "alpha_pattern" or (isinstance(v, int) and v > 0)) for v in value.values()):
            problems.append(f"{path}: {key} must map module names to "
                            f"{'positive whole numbers' if key == 'rank_pattern' else 'finite numbers'}.")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append(f"{path}: target_modules must be a name or a list of names.")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"{path}: base_model_name_or_path must be text.")
    if problems:
        raise UsageError(problems)
    return config


def index_shards(index: Path) -> list[str]:
    """The shard files a *.index.json names, each a plain file name beside it (DamagedFile otherwise: a shard named
    elsewhere is never followed)."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedFile("damaged index") from None
    if not all(isinstance(n, str) and n and n == Path(n).name for n in names):
        raise DamagedFile("damaged index (a shard named outside the folder)")
    return names


def model_folder_problem(folder: Path) -> str | None:
    """Why the model folder's config or weight files cannot be loaded (None when they look whole)."""
    config = folder / "config.json"
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return "config.json is not valid JSON"
    if not isinstance(loaded, dict):
        return "config.json is not a JSON object"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = index_shards(index)
            except DamagedFile:
                return f"{index_name} is damaged"
            for shard in shards:
                if not (folder / shard).is_file():
                    return f"shard {shard} named in {index_name} is missing"
                problem = _weight_file_problem(folder / shard)
                if problem:
                    return f"{shard}: {problem}"
            return None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    for path in files:
        problem = _weight_file_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def _weight_file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".bin":
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic[:2] == b"PK":
            try:
                with zipfile.ZipFile(path):
                    return None
            except (zipfile.BadZipFile, OSError):
                return "the archive is cut short or damaged"
    return None
