"""How the Hub's answers and failures are read: which are worth retrying, and each as one line without the token."""

from __future__ import annotations

import os

from functionalnetworkssft.errors import first_line

PREFLIGHT_TIMEOUT_S = 15.0
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 2.0
# Tests (and impatient users) shorten the backoff of a subprocess through the environment.
RETRY_BASE_DELAY_ENV = "FNSFT_HUB_RETRY_BASE_DELAY"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: a 5xx/429/408 answer or a network error, anywhere in the exception's causes."""
    import httpx2

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None:
            return status in TRANSIENT_STATUS or status >= 500
        if isinstance(current, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def one_line(exc: BaseException, token: str | None = None) -> str:
    """The root cause of `exc` as one line, without the token."""
    import httpx2

    # Walk down to the HTTP answer or network error: the wrappers above it ("Error while uploading ...") say less.
    root: BaseException = exc
    while (getattr(root, "response", None) is None and not isinstance(root, httpx2.TransportError)
           and (root.__cause__ or root.__context__) is not None):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    response = getattr(root, "response", None)
    if isinstance(response, httpx2.Response):
        request = response.request
        where = f"{request.method} {request.url.copy_with(query=None)}" if request is not None else ""
        detail = response.headers.get("X-Error-Message") or response.reason_phrase
        text = f"HTTP {response.status_code} {detail} from {where}".strip()
    elif isinstance(root, httpx2.TransportError):
        where = ""
        try:
            where = f" to {root.request.url.scheme}://{root.request.url.netloc.decode()}"
        except RuntimeError:  # an error raised before a request was attached
            pass
        kind = "cannot connect" if isinstance(root, httpx2.ConnectError) else "network error"
        text = f"{kind}{where} ({str(root).strip() or type(root).__name__})"
    else:
        text = first_line(root)
    return text.replace(token, "***") if token else text


def retry_base_delay() -> float:
    value = os.environ.get(RETRY_BASE_DELAY_ENV)
    try:
        return max(0.0, float(value)) if value else RETRY_BASE_DELAY_S
    except ValueError:
        return RETRY_BASE_DELAY_S



