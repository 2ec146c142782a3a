"""`push_folder`: create the repo if needed, upload the folder and its card in one commit, retry what is transient,
and on final failure say that the local files are intact and how to retry."""

from __future__ import annotations

import importlib.util
import logging
import shlex
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from functionalnetworkssft.errors import FnsftError
from functionalnetworkssft.hub.auth import token_source
from functionalnetworkssft.hub.card import (
    KIND_LABEL,
    PUBLIC_ENDPOINT,
    CardInfo,
    base_license,
    detect_kind,
    read_json,
    render_card,
)
from functionalnetworkssft.hub.http import (
    PREFLIGHT_TIMEOUT_S,
    RETRY_ATTEMPTS,
    TRANSIENT_STATUS,
    is_transient,
    one_line,
)
from functionalnetworkssft.hub.http import retry_base_delay as default_retry_delay
from functionalnetworkssft.hub.publish import files_to_upload, refuse_secret
from functionalnetworkssft.records import MERGE_REPORT

logger = logging.getLogger(__name__)

# Files that decide what `from_pretrained` loads. A stale one left in the repo from an earlier upload (an adapter
# config beside a merged model, an extra shard) would make the repo load something other than what was pushed.
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "adapter_config.json", "*.gguf", "*.pt", "*.pth")


def retry_command(folder: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                  commit_message: str | None = None) -> str:
    """The `fnsft push` command that repeats an upload (never with the token on the command line)."""
    words = ["fnsft", "push", "--model_dir", str(folder), "--hub_repo_id", repo_id]
    if not private:
        words.append("--no_hub_private")
    if revision:
        words += ["--hub_revision", revision]
    if commit_message:
        words += ["--hub_commit_message", commit_message]
    return " ".join(shlex.quote(word) for word in words)


def push_folder(folder: str | Path, repo_id: str, *, token: str | None, private: bool = True,
                revision: str | None = None, commit_message: str | None = None, card: CardInfo | None = None,
                attempts: int = RETRY_ATTEMPTS, retry_base_delay: float | None = None,
                extra_files: tuple[Path, ...] = ()) -> str:
    """Upload `folder` (adapter, merged or full model) to `repo_id` with a model card; return the commit URL.

    Transient failures (5xx, 429, connection errors) are retried `attempts` times with exponential backoff starting
    at `retry_base_delay` seconds (default: $FNSFT_HUB_RETRY_BASE_DELAY or 2). Nothing local is changed or deleted.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    kind = detect_kind(folder)
    retry = retry_command(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if token and token_source(token) == "--hub_token":
        # The token came from a flag, which the command above must not repeat: it would land in shell history.
        retry += " (with HF_TOKEN set to your token, or --hub_token)"
    card = card if card is not None else CardInfo.from_folder(folder)
    if card.merge_report is None and kind == "merged":
        card = replace(card, merge_report=read_json(folder / MERGE_REPORT))
    if card.license is None:
        card = replace(card, license=base_license(card.base_model, token))
    readme = render_card(card, kind, repo_id, endpoint=constants.ENDPOINT)
    files = files_to_upload(folder, tuple(Path(p) for p in extra_files))
    refuse_secret(files, token, readme, retry)

    branch = revision or "main"
    message = commit_message or f"Upload {KIND_LABEL[kind]} with fnsft"
    base_delay = default_retry_delay() if retry_base_delay is None else retry_base_delay
    logger.info("Uploading %s %s (%d files) to %s/%s%s", KIND_LABEL[kind], folder, len(files) + 1,
                constants.ENDPOINT, repo_id, "" if branch == "main" else f" (branch {branch})")
    for attempt in range(1, attempts + 1):
        api = HfApi(token=token)
        try:
            return _push_once(api, folder, files, readme, repo_id, kind, private, branch, message, token)
        except Exception as exc:  # every failure ends in an FnsftError that says local files are intact
            reason = one_line(exc, token)
            if not is_transient(exc) or attempt == attempts:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise FnsftError(f"upload of {folder} to {repo_id} failed{tried}: {reason}\n"
                                 f"Local outputs are intact in {folder}; retry with: {retry}") from None
            delay = base_delay * 2 ** (attempt - 1)
            logger.warning("Upload attempt %d/%d failed (%s); retrying in %.1fs.", attempt, attempts, reason, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _push_once(api, folder: Path, files, readme: str, repo_id: str, kind: str, private: bool, branch: str,
               message: str, token: str | None) -> str:
    from fnmatch import fnmatch

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    # Sent on every create; the Hub ignores it (409) for an existing repo, so its visibility is never changed.
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    local = {item.path_in_repo for item in files}
    stale = [path for path in api.list_repo_files(repo_id, revision=branch)
             if path not in local and any(fnmatch(path.rsplit("/", 1)[-1], p) for p in MODEL_FILE_PATTERNS)]
    # Operations are rebuilt on every attempt: the client marks them as used, even after a failed commit.
    operations = [CommitOperationAdd(path_in_repo=item.path_in_repo,
                                     path_or_fileobj=item.content if item.content is not None else str(item.local))
                  for item in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    with _large_file_transfer(api, repo_id, branch, token):
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=branch)
    logger.info("Uploaded %s to %s", KIND_LABEL[kind], info.commit_url)
    return info.commit_url


@contextmanager
def _large_file_transfer(api, repo_id: str, branch: str, token: str | None) -> Iterator[None]:
    """Use Git LFS instead of Xet when a self-hosted Hub does not offer Xet storage.

    With hf_xet installed, huggingface_hub sends every LFS-mode file through Xet without asking the server, which
    fails on Hub-compatible servers that only implement the LFS batch API. The Xet token endpoint tells us which one
    the server speaks; the public Hub always speaks Xet and is not asked.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = api.endpoint.rstrip("/")
    xet_possible = not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None
    if not xet_possible or endpoint == PUBLIC_ENDPOINT:
        yield
        return
    probe = get_session().get(f"{endpoint}/api/models/{repo_id}/xet-write-token/{quote(branch, safe='')}",
                              headers=build_hf_headers(token=token), timeout=PREFLIGHT_TIMEOUT_S)
    if probe.status_code in TRANSIENT_STATUS:
        probe.raise_for_status()  # transient: let the retry loop try again
    if probe.status_code == 200 and constants.HUGGINGFACE_HEADER_X_XET_ENDPOINT in probe.headers:
        yield
        return
    logger.info("%s offers no Xet storage; large files go through Git LFS.", endpoint)
    # huggingface_hub reads HF_HUB_DISABLE_XET into this constant at import and checks it at upload time.
    previous = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = previous
