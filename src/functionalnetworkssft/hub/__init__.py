"""Upload an adapter, a merged model or a fully fine-tuned model to the Hugging Face Hub, with a model card.

The pieces, in the order a run uses them:

- `resolve_token(cli_token)` (auth): --hub_token, then HF_TOKEN, then the cached login, as huggingface_hub orders
  them; never a prompt.
- `preflight(repo_id, token)` (auth): before any model is loaded, proves that the upload at the end can succeed
  (token present and accepted, repo id well formed, the account may create or write the repo), in seconds.
- `push_folder(folder, repo_id, token=...)` (upload): creates the repo if missing (private by default; an existing
  repo's visibility is left alone), uploads the folder plus a generated README.md (card) with local paths left out
  and the token nowhere (publish), retries transient failures with backoff, and on final failure says that the
  local files are intact and how to retry with `fnsft push`.
- `push(folder, repo_id, ...)`: all of the above from Python.
- `command`: the `fnsft push` command and its options.

`HF_ENDPOINT` selects a self-hosted Hub; huggingface_hub reads it when it is imported.
"""

from __future__ import annotations

from functionalnetworkssft.hub.auth import preflight, repo_id_problem, resolve_token, revision_problem
from functionalnetworkssft.hub.card import CardInfo, detect_kind, render_card
from functionalnetworkssft.hub.http import RETRY_ATTEMPTS
from functionalnetworkssft.hub.upload import push_folder, retry_command

__all__ = ["CardInfo", "RETRY_ATTEMPTS", "detect_kind", "preflight", "push", "push_folder", "render_card",
           "repo_id_problem", "resolve_token", "retry_command", "revision_problem"]


def push(folder, repo_id: str, *, token: str | None = None, private: bool = True, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """`fnsft push` from Python: check the token and repo, upload the folder with its card, return the commit URL.
    Raises UsageError (bad token or repo id) or FnsftError (failed upload; local files untouched)."""
    detect_kind(folder)
    resolved = resolve_token(token)
    preflight(repo_id, resolved, private=private, revision=revision)
    return push_folder(folder, repo_id, token=resolved, private=private, revision=revision,
                       commit_message=commit_message)
