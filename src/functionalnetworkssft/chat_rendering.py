"""A chat template is code from the model's folder or the user's file: every render is bounded and its failures are
one line naming the template.

jinja's sandbox keeps a template from reaching Python, but not from looping: two nested `range(100000)` loops render
for hours, and `'x' * 10**8` in a loop fills memory. So each render gets a time budget (enforced with an interval
timer where a signal can be delivered: the main thread of this process or of a tokenizing worker) and its output a
size limit; a template the sandbox stops (SecurityError) is reported as such, and nothing runs.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from functionalnetworkssft.errors import FnsftError, first_line

# Seconds a render call may take: a fixed allowance plus a little per conversation (a normal template renders one in
# well under a millisecond; a batch of 256 gets about 36 s).
SECONDS = 10.0
SECONDS_PER_CONVERSATION = 0.1
# Characters one rendered conversation may hold: far beyond any context window (128k tokens are about 0.5 M).
MAX_CHARS = 8 << 20
# Set on a tokenizer whose template came from somewhere other than its own folder (--chat_template_path).
ORIGIN = "fnsft_chat_template_origin"


class TemplateProblem(FnsftError):
    """The chat template loops too long, writes too much, or does what the sandbox forbids."""


class _Expired(BaseException):
    """Raised by the timer inside the template's own code; BaseException so that no `except Exception` in a library
    between here and the template swallows it."""


def origin(tokenizer) -> str:
    return getattr(tokenizer, ORIGIN, None) or f"the chat template of {getattr(tokenizer, 'name_or_path', 'the model')}"


@contextmanager
def bounded(tokenizer, conversations: int = 1) -> Iterator[None]:
    """Render inside this block: past its time budget, or on a sandbox violation, a TemplateProblem naming the
    template is raised instead."""
    from jinja2.exceptions import SecurityError

    seconds = SECONDS + SECONDS_PER_CONVERSATION * conversations
    try:
        with _alarm(seconds):
            yield
    except _Expired:
        raise TemplateProblem(f"{origin(tokenizer)} did not finish rendering {conversations} conversation(s) in "
                              f"{seconds:.0f} s, so it may loop without end; fix the template or use another.") \
            from None
    except SecurityError as exc:
        raise TemplateProblem(f"{origin(tokenizer)} tries something the template sandbox forbids "
                              f"({first_line(exc)[:200]}); nothing of it ran. Use a template without it.") from None


def check_size(tokenizer, texts: list[str]) -> list[str]:
    """The rendered texts, or a TemplateProblem when one is larger than any conversation can be."""
    for text in texts:
        if len(text) > MAX_CHARS:
            raise TemplateProblem(f"{origin(tokenizer)} rendered one conversation as {len(text):,} characters, more "
                                  f"than the {MAX_CHARS:,} any model can read; fix the template or use another.")
    return texts


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`, raising _Expired where it lands; a timer already running (a test harness's) is put
    back with what it had left. Without a deliverable signal the block runs unbounded in time."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise _Expired

    previous_handler = signal.signal(signal.SIGALRM, expired)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        # None: a handler installed outside Python, which signal.signal cannot put back; the default then stands.
        signal.signal(signal.SIGALRM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if previous_delay:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)
