"""The base's tokenizer files that transformers 5's save_pretrained no longer writes, carried into every model and
adapter folder fnsft writes.

transformers 5 saves a tokenizer as tokenizer.json and tokenizer_config.json only. A SentencePiece model
(`tokenizer.model` of Llama-2, Mistral, Phi-3 and Gemma) and the slow tokenizers' vocabulary files are then missing,
and the tools that read them (llama.cpp's GGUF converter, sentencepiece, older transformers) cannot use the folder.
They are copied from the base as they are: tokenizer.json keeps any token the training added.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Vocabulary files of the tokenizer kinds transformers knows, which save_pretrained may leave out.
VOCABULARY_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                    "vocab.txt", "qwen.tiktoken", "tiktoken.model")


def carry(source: str | Path, destination: Path, revision: str | None = None) -> list[str]:
    """Copy each vocabulary file the base has and `destination` lacks; returns their names. `source` is a model
    folder or a Hub id (its files are taken from the local Hub cache, or downloaded where the Hub is reachable)."""
    carried = []
    for name in VOCABULARY_FILES:
        if os.path.lexists(destination / name):  # also a link: never written through
            continue
        found = _find(source, name, revision)
        if found is not None:
            shutil.copyfile(found, destination / name)
            carried.append(name)
    return carried


def _find(source: str | Path, name: str, revision: str | None) -> Path | None:
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError

        cached = try_to_load_from_cache(str(source), name, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache knows the Hub has no such file
            return None
        try:
            return Path(hf_hub_download(str(source), name, revision=revision))
        except EntryNotFoundError:
            return None
    except Exception:  # offline, gated or not a Hub id: the folder is complete without the file
        return None
