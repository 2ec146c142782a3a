"""Hub access, checked before anything expensive: which token, whether the repo id and branch are valid, and
whether this token may create or write the repo (`preflight`)."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.hub.http import PREFLIGHT_TIMEOUT_S, TRANSIENT_STATUS, one_line, retry_base_delay

logger = logging.getLogger(__name__)

REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")


def resolve_token(cli_token: str | None) -> str | None:
    """The Hub token to use, in huggingface_hub's order: the one given explicitly (--hub_token), then HF_TOKEN, then
    the cached login. None when there is none."""
    if cli_token and cli_token.strip():
        return cli_token.strip()
    env_token = (os.environ.get("HF_TOKEN") or "").strip()
    if env_token:
        return env_token
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as exc:  # e.g. an HF_OIDC_RESOURCE exchange that fails: opting in to it was explicit
        raise UsageError(f"could not read the cached Hub login: {exc}") from None


def repo_id_problem(repo_id: str | None) -> str | None:
    """Why `repo_id` cannot name a Hub model repo, or None when it can."""
    if not repo_id:
        return "--push_to_hub needs --hub_repo_id USER-OR-ORG/NAME."
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        return (f"--hub_repo_id '{repo_id}': expected USER-OR-ORG/NAME with exactly one '/', "
                "e.g. alice/my-model.")
    for part in parts:
        if not REPO_PART.match(part) or "--" in part or ".." in part or len(part) > 96:
            return (f"--hub_repo_id '{repo_id}': '{part}' is not a valid Hub name; use letters, digits, '-', '_' "
                    "and '.', at most 96 characters, no '--' or '..', not starting or ending with '-' or '.'.")
    if parts[1].endswith(".git"):
        return f"--hub_repo_id '{repo_id}': a repo name cannot end with '.git'."
    return None


def revision_problem(revision: str | None) -> str | None:
    if revision is None:
        return None
    if not revision.strip() or any(c.isspace() for c in revision) or revision.startswith(("-", "/", "refs/")) \
            or ".." in revision or revision.endswith(("/", ".lock")):
        return f"--hub_revision '{revision}': not a valid branch name; use e.g. 'main' or 'experiment-1'."
    return None


def token_source(token: str) -> str:
    if token == (os.environ.get("HF_TOKEN") or "").strip():
        return "HF_TOKEN"
    from huggingface_hub import constants

    try:
        cached = Path(constants.HF_TOKEN_PATH).read_text().strip()
    except OSError:
        cached = None
    return "the cached login (hf auth login)" if token == cached else "--hub_token"


# ---- preflight -------------------------------------------------------------------------------------------------------
def preflight(repo_id: str, token: str | None, private: bool = True, revision: str | None = None,
              timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Raise UsageError (one line per problem) unless an upload to `repo_id` with `token` can succeed.

    Called before anything expensive: a missing or read-only token must not surface after hours of training.
    """
    from huggingface_hub import constants

    problems = [p for p in (repo_id_problem(repo_id), revision_problem(revision)) if p]
    if not token:
        problems.append("no Hub token: set HF_TOKEN, pass --hub_token, or run `hf auth login` "
                        "(create a token with write access at https://huggingface.co/settings/tokens).")
    if constants.HF_HUB_OFFLINE:
        problems.append("HF_HUB_OFFLINE is set, which blocks all Hub requests; unset it to upload, "
                        "or drop --push_to_hub.")
    if problems:
        raise UsageError(problems)

    endpoint = constants.ENDPOINT
    source = token_source(token)
    who = _preflight_get(f"{endpoint}/api/whoami-v2", token, timeout, endpoint)
    if who.status_code == 401:
        raise UsageError(f"the Hub at {endpoint} rejected the token from {source} (401 Unauthorized); "
                         "create a new token with write access at https://huggingface.co/settings/tokens.")
    _raise_preflight_http(who, endpoint, "checking the token")
    problem = _write_permission_problem(who.json(), repo_id, source)
    if problem:
        raise UsageError(problem)

    info = _preflight_get(f"{endpoint}/api/models/{repo_id}", token, timeout, endpoint)
    if info.status_code in (401, 404):
        logger.info("Hub repo %s does not exist yet; it will be created %s at upload.", repo_id,
                    "private" if private else "public")
        return
    if info.status_code == 403:
        raise UsageError(f"--hub_repo_id {repo_id}: the token from {source} may not access this repo (403); "
                         "use a repo you own or a token with access to it.")
    _raise_preflight_http(info, endpoint, f"looking up {repo_id}")
    is_private = bool(info.json().get("private"))
    if is_private != private:
        logger.info("Hub repo %s exists and is %s; its visibility is kept.", repo_id,
                    "private" if is_private else "public")


def _preflight_get(url: str, token: str, timeout: float, endpoint: str):
    """GET with a timeout (the library's shared client has none), one retry on a transient failure."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session

    for attempt in (1, 2):
        try:
            response = get_session().get(url, headers=build_hf_headers(token=token), timeout=timeout)
        except httpx2.TransportError as exc:
            if attempt == 2:
                raise UsageError(f"cannot reach the Hub at {endpoint} ({one_line(exc, token)}); check the network, "
                                 "or HF_ENDPOINT if you use a self-hosted Hub.") from None
        else:
            if response.status_code not in TRANSIENT_STATUS or attempt == 2:
                return response
        time.sleep(min(1.0, retry_base_delay()))
    raise AssertionError("unreachable")


def _raise_preflight_http(response, endpoint: str, doing: str) -> None:
    if response.status_code >= 400:
        detail = response.headers.get("X-Error-Message") or response.reason_phrase
        raise UsageError(f"the Hub at {endpoint} answered HTTP {response.status_code} ({detail}) while {doing}; "
                         "try again later, or check HF_ENDPOINT.")


def _write_permission_problem(who: dict, repo_id: str, source: str) -> str | None:
    """Whether the whoami-v2 answer shows that this token may create or write `repo_id`."""
    namespace = repo_id.split("/")[0]
    user = who.get("name") or "this account"
    orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or []}
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    fix = "create a token with write access at https://huggingface.co/settings/tokens"
    if role == "read":
        return f"the token from {source} ({user}) is read-only; {fix} and pass it with HF_TOKEN or --hub_token."
    if role == "fineGrained":
        for scoped in (access.get("fineGrained") or {}).get("scoped") or []:
            entity = scoped.get("entity") or {}
            if entity.get("name") in (namespace, repo_id) and "repo.write" in (scoped.get("permissions") or []):
                return None
        return (f"the fine-grained token from {source} ({user}) has no 'repo.write' permission for '{namespace}'; "
                f"add it to the token or {fix}.")
    if namespace != user and namespace not in orgs:
        known = ", ".join([user, *sorted(o for o in orgs if o)])
        return (f"--hub_repo_id {repo_id}: {user} cannot create repos under '{namespace}' (namespaces of this token: "
                f"{known}); use {user}/{repo_id.split('/')[1]} or an organization you belong to.")
    if namespace in orgs and orgs[namespace] == "read":
        return (f"--hub_repo_id {repo_id}: {user} has only the read role in organization '{namespace}'; ask an admin "
                "for write access or upload to your own namespace.")
    return None
