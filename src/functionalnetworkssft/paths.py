"""What a name on the command line can mean: a local path or a Hub id, and whether one path lies inside another."""

from __future__ import annotations

import os
from pathlib import Path


def looks_like_local_path(name: str) -> bool:
    """Whether a model or dataset name can only mean a local path: Hub ids are `name` or `owner/name` (dots allowed,
    as in `Qwen/Qwen2.5-0.5B`), so a missing path is reported as missing instead of being looked up on the Hub."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def dangling_link(name: str) -> bool:
    """A symlink (or a path through one) that resolves nowhere: a loop or a missing target. Such a name is a local
    path the user meant, never a Hub id to look up."""
    path = Path(name).expanduser()
    try:
        path.resolve(strict=True)
        return False
    except RuntimeError:  # a symlink loop (Python < 3.13)
        return True
    except OSError:
        return os.path.lexists(path) or any(os.path.islink(p) for p in path.parents if str(p) not in ("", "."))


def missing_local(name: str, what: str = "file or folder") -> str | None:
    """Why `name` is a local path that cannot be used (None when it exists or may be a Hub id)."""
    path = Path(name).expanduser()
    if dangling_link(name):
        return "is a symbolic link that resolves nowhere (a loop or a missing target)"
    if not path.exists() and looks_like_local_path(name):
        return f"no such {what}"
    return None


def same_data(name: str, others: list[str]) -> bool:
    """Whether `name` names the same dataset as one of `others`: the same local file or folder however it is spelled
    (relative, absolute, through a link), or the same Hub id."""
    def key(value: str) -> str:
        value = value.strip()
        path = Path(value).expanduser()
        try:
            return str(path.resolve()) if path.exists() else value
        except (OSError, RuntimeError):
            return value
    return bool(name.strip()) and key(name) in {key(other) for other in others if other.strip()}


def within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies inside it, after resolving links (so no alias escapes the check)."""
    try:
        path, folder = Path(path).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return False
    return path == folder or folder in path.parents


def cache_dir() -> Path:
    """Where fnsft keeps what it can rebuild (GGUF conversions, tokenized data): $FNSFT_CACHE, else
    $XDG_CACHE_HOME/fnsft, else ~/.cache/fnsft. Safe to delete."""
    root = os.environ.get("FNSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fnsft")
    return Path(root)
