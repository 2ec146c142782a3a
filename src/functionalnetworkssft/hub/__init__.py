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
- `main(argv)`: the `fnsft push` command.

`HF_ENDPOINT` selects a self-hosted Hub; huggingface_hub reads it when it is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from functionalnetworkssft.config import Options, arg, field_problems, parse
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.hub.auth import preflight, repo_id_problem, resolve_token, revision_problem
from functionalnetworkssft.hub.card import KIND_LABEL, CardInfo, detect_kind, render_card
from functionalnetworkssft.hub.http import RETRY_ATTEMPTS
from functionalnetworkssft.hub.upload import push_folder, retry_command

__all__ = ["CardInfo", "PushConfig", "RETRY_ATTEMPTS", "detect_kind", "main", "preflight", "push", "push_folder",
           "render_card", "repo_id_problem", "resolve_token", "retry_command", "revision_problem"]


@dataclass
class PushConfig(Options):
    """Upload a run's final_model/, adapter/ or merged_model/ folder to the Hugging Face Hub, with a model card."""

    model_dir: str = arg("Folder to upload: final_model/, adapter/ or merged_model/ of a run (or any PEFT adapter or "
                         "transformers model folder). Its kind is detected and the matching model card written.")
    hub_repo_id: str = arg("Hub repository to upload to, as user-or-org/name.")
    hub_private: bool = arg("Create the repo private (--no_hub_private: public). An existing repo's visibility is "
                            "never changed.", default=True)
    hub_commit_message: str | None = arg("Commit message; 'Upload <kind> with fnsft' when not given.", default=None)
    hub_revision: str | None = arg("Branch to upload to, created from main if missing; main when not given.",
                                   default=None)
    hub_token: str | None = arg("Hub token. Wins over HF_TOKEN, which wins over the cached `hf auth login` (the order "
                                "huggingface_hub uses). Never written to disk.", default=None)


def push(folder, repo_id: str, *, token: str | None = None, private: bool = True, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """`fnsft push` from Python: check the token and repo, upload the folder with its card, return the commit URL.
    Raises UsageError (bad token or repo id) or FnsftError (failed upload; local files untouched)."""
    detect_kind(folder)
    resolved = resolve_token(token)
    preflight(repo_id, resolved, private=private, revision=revision)
    return push_folder(folder, repo_id, token=resolved, private=private, revision=revision,
                       commit_message=commit_message)


def main(argv: list[str] | None, prog: str = "fnsft push") -> None:
    cfg = parse(PushConfig, argv, prog)
    problems = field_problems(cfg)
    if problems:
        raise UsageError(problems)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request drowns the progress
    kind = detect_kind(cfg.model_dir)
    token = resolve_token(cfg.hub_token)
    preflight(cfg.hub_repo_id, token, private=cfg.hub_private, revision=cfg.hub_revision)
    url = push_folder(cfg.model_dir, cfg.hub_repo_id, token=token, private=cfg.hub_private,
                      revision=cfg.hub_revision, commit_message=cfg.hub_commit_message)
    print(f"Uploaded {KIND_LABEL[kind]} {cfg.model_dir} to {url}")
