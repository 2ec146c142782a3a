"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


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
