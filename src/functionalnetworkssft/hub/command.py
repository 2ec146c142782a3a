"""`fnsft push`: upload a run's folder to the Hub with a model card."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.hub.auth import preflight, resolve_token
from functionalnetworkssft.hub.card import KIND_LABEL, detect_kind
from functionalnetworkssft.hub.upload import push_folder
from functionalnetworkssft.options import Options, arg, field_problems, parse


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
