"""The tokenization cache: a rerun with the same data, tokenizer, settings and code reads the tokenized sets back
instead of tokenizing again. A cache only ever saves time: an entry that cannot be read is rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from functionalnetworkssft.paths import cache_dir


def cache_key(dataset, tokenizer, max_length: int, train_on_prompt: bool) -> str:
    """Everything the tokenized result depends on, hashed: the examples (their Arrow table), the tokenizer, the
    settings, and the code that reads, normalises and tokenizes (this package's files)."""
    import pyarrow as pa

    digest = hashlib.sha256()
    for code in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(code.read_bytes())
    digest.update(json.dumps([max_length, train_on_prompt, type(tokenizer).__name__, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, tokenizer.bos_token_id,
                              getattr(tokenizer, "chat_template", None)]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
                  .encode())
    # A split (train_test_split, select) shares its parent's Arrow table and differs only by an indices mapping:
    # without the mapping, a validation split would hash like its training split and read the training set back.
    indices = getattr(dataset, "_indices", None)
    for part in (dataset.data, indices):
        if part is None:
            continue
        table = part.table if hasattr(part, "table") else part
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def read_cache(key: str):
    import datasets

    folder = cache_dir() / "tokenized" / key
    if not (folder / "dataset_info.json").is_file():
        return None
    try:
        # In memory: the filtering that follows must not write cache files into the shared entry.
        return datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None


def write_cache(key: str, tokenized) -> None:
    """Best effort and atomic: written under a temporary name and renamed; an unwritable cache only costs time."""
    import shutil
    import tempfile

    target = cache_dir() / "tokenized" / key
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    except OSError:
        return
    try:
        tokenized.save_to_disk(str(staging))
        os.replace(staging, target)
    except OSError:
        pass  # another run stored the same entry first, or the disk is full: either way nothing to do
    finally:
        shutil.rmtree(staging, ignore_errors=True)
