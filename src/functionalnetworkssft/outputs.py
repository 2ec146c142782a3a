"""The output folder of a run: who may write it, what a run may replace, and what it must never touch.

Three rules keep a user's files safe, whatever the flags:

- One writer at a time. A run holds an exclusive `flock` on a lock file for as long as it writes; the kernel drops
  the lock when the process dies, however it dies, so a killed run never leaves a folder locked.
- Only what fnsft recorded is replaceable. Before a run writes an entry of the folder it adds the name to
  `fnsft_outputs.json`; `--overwrite_output_dir` removes exactly the recorded names, nothing else. An entry that no
  run recorded, under a name this run would write (or a `checkpoint-*` folder, which the Trainer's rotation
  deletes), stops the run before it starts, as does any input of the run (data, model, config file, checkpoint) that
  lies inside something the run would write or remove.
- Nothing is written before training starts. A run that fails while reading data or loading the model leaves the
  folder as it found it, so the rerun is not refused as "an earlier run".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from functionalnetworkssft import __version__
from functionalnetworkssft.errors import FnsftError, UsageError
from functionalnetworkssft.paths import within

MANIFEST = "fnsft_outputs.json"
LOCK_NAME = ".fnsft.lock"
# Entries that show an earlier run produced something worth keeping; a run that recorded only these others (it
# failed or was killed before its first checkpoint) left nothing to protect, and a rerun may replace it.
VALUABLE = ("checkpoint-*", "final_model", "adapter", "merged_model")


class FolderLock:
    """An exclusive lock held through a lock file that is removed on release; stale files from killed runs are
    simply locked again (flock belongs to the open file, which dies with its process)."""

    def __init__(self, path: Path, label: str, target: Path):
        self.path, self.label, self.target = path, label, target
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                # Never through a link, never anything but a regular file: a lock file planted as a link to a
                # file elsewhere would have that file truncated and overwritten with this run's name.
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise FnsftError(f"{self.target}: the lock file {self.path} is a link; fnsft never writes "
                                     "through one. Remove the link and run again.") from None
                raise FnsftError(f"{self.target}: cannot create the lock file {self.path.name} "
                                 f"({exc.strerror}); choose a folder you can write.") from None
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:  # a hard link writes elsewhere just the same
                os.close(fd)
                raise FnsftError(f"{self.target}: {self.path} is not a plain file of its own, so it cannot be the lock "
                                 "file; remove it and run again.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FnsftError(f"{self.target} is being written by {holder}; wait for it to finish, or choose "
                                 "another folder.") from None
            # The holder before us may have removed the file between our open and our lock: then we hold a lock on
            # a name nobody else sees, so open it again.
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.label} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writable_problem(folder: Path, flag: str = "--output_dir") -> str | None:
    """Why files cannot be created in `folder` (or, when it does not exist yet, in its nearest existing parent).

    Probed by creating a file, because permission bits do not tell (root ignores them; read-only mounts and
    immutable folders refuse root too)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{flag} {folder}: {probe} is a file, not a folder; choose another path."
    try:
        handle, name = tempfile.mkstemp(prefix=".fnsft-write-probe-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        return f"{flag} {folder}: cannot write in {probe} ({exc.strerror}); choose a writable folder."
    return None


def read_manifest(folder: Path) -> dict | None:
    """The record of what fnsft wrote in `folder`; None when there is none; a damaged one is treated as nothing
    recorded (so nothing becomes removable through it)."""
    try:
        loaded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("entries"), list):
        return None
    loaded["entries"] = [e for e in loaded["entries"] if isinstance(e, str) and e and "/" not in e and e not in
                         (".", "..")]
    return loaded


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a fresh temporary name and rename into place: a kill leaves the old file or the new, never half,
    and the rename replaces a link at `path` rather than writing through it (the temporary file is created new, so
    nothing planted in the folder can redirect it)."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    finally:
        if os.path.lexists(staging):
            os.unlink(staging)


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


@dataclass
class OutputFolder:
    """The output folder of one `fnsft train` run."""

    path: Path
    # Names (or fnmatch patterns) of the entries this run may create.
    writes: tuple[str, ...]
    # (flag, local path) of each input of the run; none of them may lie inside what the run writes or removes.
    inputs: list[tuple[str, str]] = field(default_factory=list)
    overwrite: bool = False
    resuming: bool = False
    # False on the other processes of a data-parallel run: they neither check, lock, record nor write here.
    writer: bool = True
    # Every entry name the command ever writes (whatever its flags); a manifest naming another was not written by
    # fnsft and is refused, so that no forged record can make the user's files removable.
    known: re.Pattern | None = None
    _lock: FolderLock | None = None
    _created: bool = False
    _began: bool = False
    _entries: list[str] = field(default_factory=list)

    # ---- checks, before anything is written ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        if not self.writer:
            return []
        out = self.path
        if out.exists() and not out.is_dir():
            return [f"--output_dir {out} is a file; name a folder."]
        problem = writable_problem(out)
        if problem:
            return [problem]
        if not out.is_dir():
            return self._input_problems(set())
        manifest = read_manifest(out)
        recorded = set(manifest["entries"]) if manifest else set()
        strangers = sorted(name for name in recorded - {MANIFEST, LOCK_NAME}
                           if self.known is not None and not self.known.fullmatch(name))
        if strangers:
            return [f"--output_dir {out}: {MANIFEST} names {', '.join(strangers[:6])}"
                    f"{' ...' if len(strangers) > 6 else ''}, which fnsft never writes, so fnsft did not write that "
                    "record; nothing was touched. Remove the file (it only lists outputs) or choose another folder."]
        present = {p.name for p in out.iterdir()}
        found = []
        # Resuming declares the folder's checkpoints part of the run being continued, whoever wrote them.
        adopted = {n for n in present if fnmatch(n, "checkpoint-*")} if self.resuming else set()
        foreign = sorted(name for name in present - recorded - adopted - {MANIFEST, LOCK_NAME}
                         if any(fnmatch(name, pattern) for pattern in self.writes))
        if foreign:
            shown = ", ".join(f"{n}/" if (out / n).is_dir() else n for n in foreign[:6])
            more = f" and {len(foreign) - 6} more" if len(foreign) > 6 else ""
            found.append(f"--output_dir {out} holds {shown}{more}, which no fnsft run recorded as its own "
                         f"({MANIFEST}); this run would overwrite or delete them. Move them away or choose another "
                         "folder.")
        valuable = sorted(n for n in recorded & present if any(fnmatch(n, p) for p in VALUABLE))
        if valuable and not (self.overwrite or self.resuming):
            found.append(f"--output_dir {out} holds an earlier run ({', '.join(valuable[:4])}); add "
                         "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or "
                         "pick another folder.")
        removed = set() if self.resuming else recorded & present
        return found + self._input_problems(removed)

    def _input_problems(self, removed: set[str]) -> list[str]:
        touched = [self.path / name for name in removed]
        if self.path.is_dir():
            touched += [p for p in self.path.iterdir() if any(fnmatch(p.name, w) for w in self.writes)]
        touched += [self.path / w for w in self.writes if "*" not in w]
        found = []
        for flag, value in self.inputs:
            hit = next((t for t in touched if within(value, t)), None)
            if hit is not None and not (self.resuming and flag == "--resume_from_checkpoint"):
                found.append(f"{flag} {value} lies inside {hit}, which this run would replace; move it or choose "
                             "another --output_dir.")
        return found

    # ---- the run's lifetime -------------------------------------------------------------------------------------
    @contextmanager
    def claim(self, label: str) -> Iterator["OutputFolder"]:
        """Hold the folder for this run; if the run ends before `begin`, leave the folder as it was found."""
        if not self.writer:
            yield self
            return
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FnsftError(f"--output_dir {self.path}: cannot create it ({exc.strerror}).") from None
        self._lock = FolderLock(self.path / LOCK_NAME, label, self.path)
        try:
            self._lock.acquire()
        except BaseException:
            self._remove_if_created()
            raise
        try:
            # Checked again under the lock: another run may have written here since the first check.
            problems = self.problems()
            if problems:
                raise UsageError(problems)
            yield self
        finally:
            self._lock.release()
            if not self._began:
                self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.path.rmdir()  # only when empty: never removes anything but the folder this run made
            except OSError:
                pass

    def begin(self) -> None:
        """Training starts: clear what an earlier run recorded (with --overwrite_output_dir), start this run's record."""
        if not self.writer:
            return
        manifest = read_manifest(self.path) or {"entries": []}
        previous = [e for e in manifest["entries"] if (self.path / e).exists() or os.path.islink(self.path / e)]
        if self.resuming:
            previous += [p.name for p in self.path.glob("checkpoint-*") if p.name not in previous]
        else:
            for name in previous:
                if name in (MANIFEST, LOCK_NAME):
                    continue
                _remove(self.path / name)
            previous = []
        self._entries = list(previous)
        self._began = True
        self._save_manifest("running")

    def record(self, name: str) -> Path:
        """Note `name` as this run's before it is written, and clear whatever stands there (an earlier run's entry,
        which this write replaces): every write then creates a fresh entry, so none goes through a link, a hard link
        or a folder's old contents to a file outside. Returns its path."""
        path = self.path / name
        if self.writer:
            if name not in self._entries:
                self._entries.append(name)
                self._save_manifest("running")
            if os.path.lexists(path):
                _remove(path)
        return path

    def finish(self, status: str = "complete") -> None:
        if not self.writer:
            return
        try:
            self._save_manifest(status)
        except OSError:
            if status == "complete":
                raise
            # Recording a failure must not hide the failure itself (a full disk refuses this write too).

    def _save_manifest(self, status: str) -> None:
        write_json_atomic(self.path / MANIFEST, {
            "fnsft_version": __version__, "status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "entries": sorted(set(self._entries)),
        })


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
