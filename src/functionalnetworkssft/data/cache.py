"""The tokenization cache: a rerun with the same data, tokenizer, settings and code reads the tokenized sets back
instead of tokenizing again. A cache only ever saves time: an entry that cannot be read is rebuilt."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from functionalnetworkssft.paths import cache_dir

log = logging.getLogger("functionalnetworkssft.data")
# Written into each entry: the key it was stored under and its row count, checked when it is read back.
STAMP = "fnsft_entry.json"


def cache_key(dataset, tokenizer, max_length: int, train_on_prompt: bool) -> str:
    """Everything the tokenized result depends on, hashed: the examples (their Arrow table), the tokenizer, the
    settings, and the code that reads, normalises and tokenizes (this package's files)."""
    import pyarrow as pa

    digest = hashlib.sha256()
    digest.update(_code_digest())
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


@functools.lru_cache(maxsize=1)
def _code_digest() -> bytes:
    """This package's code, hashed once per process (the key of every split of every run depends on it)."""
    digest = hashlib.sha256()
    for code in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(code.read_bytes())
    return digest.digest()


def read_cache(key: str, rows: int, vocab_size: int, max_length: int):
    """The entry stored under `key`, if it is what it claims to be: written for this key (a stamp inside the entry
    says so), one row per example, the schema tokenization writes, token ids inside the vocabulary, masks of 0 and
    1 as long as their ids, no row longer than `max_length`. Anything else (a damaged, swapped or forged entry) is
    said in one line, removed, and rebuilt by the caller."""
    import datasets

    folder = cache_dir() / "tokenized" / key
    if not folder.is_dir():
        return None
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception:  # any reason at all: a cache entry is never trusted when it cannot be read whole
        why = "cannot be read"
    else:
        why = _mismatch(stamp, key, loaded, rows, vocab_size, max_length)
    if why is None:
        return loaded
    log.warning("The tokenization cache entry %s %s; tokenizing again.", key[:12], why)
    _discard(folder)
    return None


def _mismatch(stamp, key: str, loaded, rows: int, vocab_size: int, max_length: int) -> str | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(stamp, dict) or stamp.get("key") != key:
        return "was written for other data or settings"
    if len(loaded) != rows or stamp.get("rows") != rows:
        return f"holds {len(loaded)} rows for {rows} examples"
    table = loaded.with_format("arrow")[:]
    kinds = {name: table.schema.field(name).type for name in table.column_names}

    def integers(kind) -> bool:
        return kind is not None and pa.types.is_list(kind) and pa.types.is_integer(kind.value_type)

    if not (integers(kinds.get("input_ids")) and integers(kinds.get("assistant_masks"))
            and kinds.get("_note") == pa.string()) or set(kinds) - {"input_ids", "assistant_masks", "_note", "_index"}:
        return "does not have the columns tokenization writes"
    ids, masks = (pc.list_flatten(table.column(name).combine_chunks()) for name in ("input_ids", "assistant_masks"))
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks())
    if len(ids) and (pc.min(ids).as_py() < 0 or pc.max(ids).as_py() >= vocab_size):
        return f"holds token ids outside the vocabulary of {vocab_size}"
    if len(masks) and not pc.all(pc.is_in(masks, value_set=pa.array([0, 1], masks.type))).as_py():
        return "holds loss-mask values other than 0 and 1"
    if not pc.all(pc.equal(lengths, pc.list_value_length(table.column("assistant_masks").combine_chunks()))).as_py() \
            or (len(lengths) and pc.max(lengths).as_py() > max_length):
        return "holds rows whose masks do not match their tokens"
    return None


def _discard(folder: Path) -> None:
    """Move the entry aside first, so that a run reading it now never sees it half removed."""
    import shutil

    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


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
        (staging / STAMP).write_text(json.dumps({"key": key, "rows": len(tokenized)}), encoding="utf-8")
        os.replace(staging, target)
    except OSError:
        pass  # another run stored the same entry first, or the disk is full: either way nothing to do
    finally:
        shutil.rmtree(staging, ignore_errors=True)
