"""Reading the user's sources (files, folders, save_to_disk folders, Hub datasets, in-memory records) into one
normalised training set and its validation data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.data.formats import KNOWN_COLUMNS, normalise_source
from functionalnetworkssft.errors import DataError, UsageError, first_line
from functionalnetworkssft.paths import missing_local

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What datasets reads from a folder of data files, by suffix; every other file in such a folder is "other".
FOLDER_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                ".arrow": "arrow", ".txt": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


@dataclass
class RawData:
    """The user's records, normalised: each row has `messages` (chat) or `text`, and the detected format."""

    train: Any  # datasets.Dataset
    validation: Any | None
    format: str
    source: str
    # One (source, format, training examples) per source, for the data summary.
    sources: list[tuple[str, str, int]] = field(default_factory=list)


def is_data_file(path: str | Path) -> bool:
    """Whether `path`'s name says it is a data file this tool reads (rather than plain text)."""
    return Path(path).suffix.lower() in FILE_LOADERS


@dataclass
class Source:
    """One dataset of a run: a file, folder or Hub id, its configuration, the split to train on, and how much of it
    to use (a count of examples, or a fraction below 1, drawn with the run's seed)."""

    name: str
    config: str | None = None
    split: str | None = None
    samples: float | None = None


def load(name_or_path: str, config_name: str | None, validation_split: float, seed: int,
         text_field: str = "text") -> RawData:
    """Read, check and normalise the dataset; carve a validation split when it has none."""
    return load_sources([Source(name_or_path, config_name)], None, validation_split, seed, text_field)


def load_sources(sources: list[Source], eval_source: Source | None, validation_split: float, seed: int,
                 text_field: str = "text") -> RawData:
    """Read, check and normalise every source (each in its own format), put their training examples together, and
    take the validation data from `eval_source`, else from the sources' validation splits, else carve it."""
    trains, validations, summary = [], [], []
    for source in sources:
        splits = _read(source.name, source.config)
        key = source.split or ("train" if "train" in splits else next(iter(splits)))
        if key not in splits:
            raise DataError(f"{source.name}: no split '{key}' (it has {', '.join(splits)}); choose one with "
                            "--dataset_split.")
        if source.samples is not None and source.samples >= 1 and int(source.samples) > len(splits[key]):
            raise UsageError(f"datasets: {source.name} asks for {int(source.samples)} samples, but its split "
                             f"'{key}' has {len(splits[key])} examples; give at most {len(splits[key])}, or a fraction "
                             "below 1.")
        train = _subsample(splits[key], source.samples, seed)
        train, fmt = normalise_source(train, source.name, "training", text_field, key)
        trains.append(train)
        summary.append((source.name, fmt, len(train)))
        if eval_source is None:
            held = next((splits[k] for k in VALIDATION_SPLITS if k in splits and k != key), None)
            if held is not None and len(held):
                validations.append(normalise_source(held, source.name, "validation", text_field)[0])
    if eval_source is not None:
        splits = _read(eval_source.name, eval_source.config)
        key = eval_source.split or next((k for k in (*VALIDATION_SPLITS, "test", "train") if k in splits),
                                        next(iter(splits)))
        if key not in splits:
            raise DataError(f"{eval_source.name}: no split '{key}' (it has {', '.join(splits)}).")
        validations = [normalise_source(splits[key], eval_source.name, "validation", text_field, key)[0]]
    return _assemble(trains, validations, summary, validation_split, seed)


def from_memory(train, validation=None, validation_split: float = 0.0, seed: int = 0,
                text_field: str = "text") -> RawData:
    """In-memory data (a datasets.Dataset or a list of records, in any supported format), checked and normalised
    like a file."""
    import datasets

    def as_rows(value, name):
        if isinstance(value, datasets.Dataset) or (isinstance(value, list) and all(isinstance(r, dict)
                                                                                    for r in value)):
            return value
        raise DataError(f"{name}: expected a datasets.Dataset or a list of records (dicts), got "
                        f"{type(value).__name__}.")

    train, fmt = normalise_source(as_rows(train, "train_dataset"), "train_dataset", "training", text_field)
    validations = [] if validation is None else [
        normalise_source(as_rows(validation, "eval_dataset"), "eval_dataset", "validation", text_field)[0]]
    return _assemble([train], validations, [("train_dataset", fmt, len(train))], validation_split, seed)


def _subsample(rows, samples: float | None, seed: int):
    """`samples` examples (a fraction below 1), drawn with the seed, in their original order."""
    if samples is None:
        return rows
    count = int(samples) if samples >= 1 else max(1, round(len(rows) * samples))
    if count >= len(rows):
        return rows
    import numpy as np

    chosen = sorted(np.random.default_rng(seed).permutation(len(rows))[:count].tolist())
    return rows.select(chosen) if hasattr(rows, "select") else [rows[i] for i in chosen]


def _assemble(trains: list, validations: list, summary: list[tuple[str, str, int]], validation_split: float,
              seed: int) -> RawData:
    train = _concatenate(trains)
    validation = _concatenate(validations) if validations else None
    if validation is None and validation_split > 0 and len(train) >= 2:
        n_eval = max(1, round(len(train) * validation_split))
        if n_eval >= len(train):
            n_eval = len(train) - 1
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    formats = sorted({fmt for _, fmt, _ in summary})
    return RawData(train=train, validation=validation, format=formats[0] if len(formats) == 1 else
                   f"mixed ({', '.join(formats)})", source=", ".join(name for name, _, _ in summary), sources=summary)


def _concatenate(parts: list):
    """Normalised datasets of any formats as one: chat and text rows side by side, the other column empty."""
    if len(parts) == 1:
        return parts[0]
    import datasets

    rows = [row for part in parts for row in part.to_list()]
    columns = sorted({key for row in rows for key in row})
    return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def _read(name_or_path: str, config_name: str | None) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(name_or_path).expanduser()
    why = missing_local(name_or_path)
    if why:
        raise DataError(f"{name_or_path}: {why} (expected .json, .jsonl, .csv, .parquet, a folder of them, or a "
                        "save_to_disk folder).")
    try:
        if path.is_dir():
            if any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
                loaded = datasets.load_from_disk(str(path))
            else:
                # A folder of data files (a cloned Hub dataset repo): splits come from the file names.
                _check_one_file_type(path)
                loaded = datasets.load_dataset(str(path), config_name)
        elif path.suffix.lower() in FILE_LOADERS:
            if not path.is_file():
                raise DataError(f"{path}: no such file.")
            loader = FILE_LOADERS[path.suffix.lower()]
            if loader == "json":
                return {"train": _read_json(path)}
            if loader == "csv":
                return {"train": _read_csv(path)}
            loaded = datasets.load_dataset(loader, data_files=str(path))
        elif path.exists():
            raise DataError(f"{path}: not a data file this tool reads (expected .json, .jsonl, .csv, .parquet, a "
                            "folder of them, or a save_to_disk folder).")
        else:
            loaded = datasets.load_dataset(name_or_path, config_name)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types; all mean "could not read this"
        raise DataError(f"{name_or_path}: could not be read: {first_line(exc)}") from exc
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _check_one_file_type(folder: Path) -> None:
    """A folder of data files is read as one type; files of any other type would be silently left out."""
    kinds: dict[str, list[str]] = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder)
        if not file.is_file() or any(part.startswith(".") for part in rel.parts) \
                or file.name.upper().startswith(("README", "LICENSE", "LICENCE")) or file.suffix.lower() == ".md":
            continue
        suffixes = [x.lower() for x in file.suffixes]
        if suffixes and suffixes[-1] in COMPRESSION:
            suffixes = suffixes[:-1]
        kind = FOLDER_TYPES.get(suffixes[-1] if suffixes else "", "other")
        kinds.setdefault(kind, []).append(rel.as_posix())
    readable = {k: v for k, v in kinds.items() if k != "other"}
    if not readable:
        raise DataError(f"{folder}: no data files (.json, .jsonl, .csv, .parquet) in the folder.")
    if len(kinds) > 1:
        listed = "; ".join(f"{kind}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for kind, names in sorted(kinds.items()))
        raise DataError(f"{folder}: holds files of several types ({listed}), and a folder is read as one type, so "
                        "the others would be left out; keep one type in the folder, or point "
                        "--dataset_name_or_path at one file.")


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file as text (a cell "42" stays the text 42); a malformed line is reported by its number."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the dataset is empty (no examples).") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed CSV: {first_line(exc).replace('Error tokenizing data. C error: ', '')}") \
            from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed:")]
    if unnamed:
        raise DataError(f"{path}: the header row has {len(unnamed)} empty column name(s); name every column.")
    return frame.to_dict("records")


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects, an object wrapping one ({"data": [...]}), or JSON Lines; a malformed line is
    reported with its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    stripped = text.lstrip()
    rows = None
    if stripped.startswith(("[", "{")):
        try:
            whole = json.loads(text)
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to be a dataset.") from None
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg}).") from None
        else:
            rows = whole if isinstance(whole, list) else _unwrap(whole)
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg}).") from None
            except RecursionError:
                raise DataError(f"{path}: line {number}: nested too deeply to be an example.") from None
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no examples).")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: example {bad} is {type(rows[bad]).__name__}, expected a JSON object.")
    # Kept as Python rows: Arrow would reject records whose optional fields differ; they are normalised first.
    return rows


def _unwrap(obj: dict) -> list:
    """{"data": [records]} holds the records; any other object is itself one record."""
    if len(obj) == 1:
        (key, value), = obj.items()
        if key not in KNOWN_COLUMNS and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    return [obj]
