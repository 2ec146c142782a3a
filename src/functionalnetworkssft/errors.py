"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

import errno
import os
import re


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line error reports."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class FnsftError(Exception):
    """A runtime failure the user can act on (bad data, missing model, failed upload): exit status 1."""

    exit_code = 1


class UsageError(FnsftError):
    """Flags or configuration that can never work: exit status 2, reported before anything expensive starts."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(FnsftError):
    """The dataset cannot be read or has no usable examples."""


class MergeError(FnsftError):
    """The adapter could not be merged, or the merged model does not compute what base+adapter computed."""


def describe_write_error(exc: BaseException) -> str | None:
    """A one-line cause when `exc` (or an exception it wraps) is a failed write: disk full, file too large,
    read-only or permission denied. Libraries that write through C or Rust (torch.save, safetensors) raise their own
    types with the OS error only in the text, so the text is read too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return "the disk is full (No space left on device); free space"
        if code == errno.EFBIG:
            return "a file size limit was reached (File too large; see ulimit -f); raise the limit or free space"
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{os.strerror(code)}; make the folder writable or choose another"
        text = str(current)
        for needle, cause in (("No space left", "the disk is full (No space left on device); free space"),
                              ("StorageFull", "the disk is full (No space left on device); free space"),
                              ("File too large", "a file size limit was reached (File too large; see ulimit -f); "
                                                 "raise the limit or free space"),
                              ("FileTooLarge", "a file size limit was reached (File too large; see ulimit -f); "
                                               "raise the limit or free space"),
                              ("Read-only file system", "the file system is read-only; choose another folder"),
                              ("file write failed", "the write failed (is the disk full?); free space")):
            if needle in text:
                return cause
        if re.search(r"\d+ requested and \d+ written", text):  # numpy's tofile: a short write, and no errno
            return _short_write_cause()
        current = current.__cause__ or current.__context__
    return None


def _short_write_cause() -> str:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return (f"a file size limit was reached (ulimit -f allows {limit} bytes per file); raise the limit or free "
                "space")
    return "the write stopped short (is the disk full?); free space"

