"""Upload an adapter, a merged model or a fully fine-tuned model to the Hugging Face Hub, with a model card.

The pieces, in the order a run uses them:

- `resolve_token(cli_token)`: HF_TOKEN, then --hub_token, then the cached login; never a prompt.
- `preflight(repo_id, token)`: before any model is loaded, proves that the upload at the end can succeed (token
  present and accepted, repo id well formed, the account may create or write the repo), in seconds.
- `push_folder(folder, repo_id, token=...)`: creates the repo if missing (private by default; an existing repo's
  visibility is left alone), uploads the folder as is plus a generated README.md, retries transient failures with
  backoff, and on final failure says that the local files are intact and how to retry with `fnsft push`.
- `main(argv)`: the `fnsft push` command.

`HF_ENDPOINT` selects a self-hosted Hub; huggingface_hub reads it when it is imported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from functionalnetworkssft.config import MERGE_REPORT, TRAINING_RECORD, arg, parse
from functionalnetworkssft.errors import FnsftError, UsageError, first_line

logger = logging.getLogger(__name__)

PUBLIC_ENDPOINT = "https://huggingface.co"
PREFLIGHT_TIMEOUT_S = 15.0
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 2.0
# Tests (and impatient users) shorten the backoff of a subprocess through the environment.
RETRY_BASE_DELAY_ENV = "FNSFT_HUB_RETRY_BASE_DELAY"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Files that decide what `from_pretrained` loads. A stale one left in the repo from an earlier upload (an adapter
# config beside a merged model, an extra shard) would make the repo load something other than what was pushed.
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "adapter_config.json", "*.gguf", "*.pt", "*.pth")
# Above this size a file is a weight shard; a token cannot be hiding in it, and reading it twice would be slow.
SECRET_SCAN_MAX_BYTES = 64 * 1024 * 1024
LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".gguf", ".arrow", ".yaml", ".yml")
REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")

# Merge report entries that are machine detail (per-tensor lists, file hashes, local paths), not figures for a reader.
REPORT_DETAIL = ("base_model", "adapter_path", "output_dir", "replaced_tensors", "inputs", "notes", "tokenizer_from")
TABLE_LIST_MAX = 8

KIND_LABEL = {"adapter": "LoRA adapter", "merged": "merged model", "full": "fine-tuned model"}
RUN_SUBFOLDERS = ("final_model", "adapter", "merged_model")


@dataclass
class PushConfig:
    """Upload a run's final_model/, adapter/ or merged_model/ folder to the Hugging Face Hub, with a model card."""

    model_dir: str = arg("Folder to upload: final_model/, adapter/ or merged_model/ of a run (or any PEFT adapter or "
                         "transformers model folder). Its kind is detected and the matching model card written.")
    hub_repo_id: str = arg("Hub repository to upload to, as user-or-org/name.")
    hub_private: bool = arg("Create the repo private (--no_hub_private: public). An existing repo's visibility is "
                            "never changed.", default=True)
    hub_commit_message: str | None = arg("Commit message; 'Upload <kind> with fnsft' when not given.", default=None)
    hub_revision: str | None = arg("Branch to upload to, created from main if missing; main when not given.",
                                   default=None)
    hub_token: str | None = arg("Hub token; HF_TOKEN in the environment takes precedence, then this, then the "
                                "cached `hf auth login`. Never written to disk.", default=None)


@dataclass
class CardInfo:
    """What the model card says about how the model was made. Local paths are reduced to folder names."""

    base_model: str | None = None  # as the user gave it: a Hub id goes into the metadata, anything else only as a name
    datasets: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    license: str | None = None  # the base model's; looked up when None
    tags: list[str] = field(default_factory=list)
    merge_report: dict[str, Any] | None = None
    method: str | None = None  # lora, qlora, lora-8bit or full, as fnsft_training.json records it

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CardInfo":
        """Read what a run left in the folder: fnsft_training.json, else the adapter's or model's own config."""
        folder = Path(folder)
        record = _read_json(folder / TRAINING_RECORD)
        if record is None:
            # merged_model/ sits beside the run's final_model/ and adapter/, whose record names the base as the user
            # gave it (a Hub id), where the merge report only knows the local copy that was merged.
            record = next((found for name in ("final_model", "adapter")
                           if (found := _read_json(folder.parent / name / TRAINING_RECORD)) is not None), {})
        report = _read_json(folder / MERGE_REPORT)
        base = record.get("base_model")
        if not base:
            adapter_config = _read_json(folder / "adapter_config.json") or {}
            config = _read_json(folder / "config.json") or {}
            base = (adapter_config.get("base_model_name_or_path") or (report or {}).get("base_model")
                    or config.get("_name_or_path"))
        datasets = record.get("datasets") or record.get("dataset") or []
        if isinstance(datasets, str):
            datasets = [datasets]
        return cls(base_model=base or None, datasets=[str(d) for d in datasets],
                   hyperparameters=dict(record.get("hyperparameters") or {}), license=record.get("license"),
                   tags=list(record.get("tags") or []), merge_report=report, method=record.get("method"))


# ---- tokens and repo ids ---------------------------------------------------------------------------------------------
def resolve_token(cli_token: str | None) -> str | None:
    """The Hub token to use: HF_TOKEN, then --hub_token, then the cached login. None when there is none."""
    env_token = (os.environ.get("HF_TOKEN") or "").strip()
    if env_token:
        return env_token
    if cli_token and cli_token.strip():
        return cli_token.strip()
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


def _token_source(token: str) -> str:
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
    source = _token_source(token)
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
                raise UsageError(f"cannot reach the Hub at {endpoint} ({_one_line(exc, token)}); check the network, "
                                 "or HF_ENDPOINT if you use a self-hosted Hub.") from None
        else:
            if response.status_code not in TRANSIENT_STATUS or attempt == 2:
                return response
        time.sleep(min(1.0, _retry_base_delay()))
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


# ---- the folder and its card -----------------------------------------------------------------------------------------
def detect_kind(folder: str | Path) -> str:
    """'adapter' (PEFT), 'merged' (an fnsft merge) or 'full' (any transformers model folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--model_dir {folder}: no such folder.")
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
            raise UsageError(f"--model_dir {folder} has adapter_config.json but no adapter_model.safetensors; "
                             "the adapter was not saved completely.")
        return "adapter"
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UsageError(f"--model_dir {folder} has config.json but no weights (*.safetensors); "
                             "the model was not saved completely.")
        return "merged" if (folder / MERGE_REPORT).is_file() or folder.name == "merged_model" else "full"
    present = [name for name in RUN_SUBFOLDERS if (folder / name).is_dir()]
    if present:
        choices = " or ".join(str(folder / name) for name in present)
        raise UsageError(f"--model_dir {folder} is a run's output folder; pass {choices}.")
    raise UsageError(f"--model_dir {folder} holds neither adapter_config.json (an adapter) nor config.json "
                     "(a model); pass a run's final_model/, adapter/ or merged_model/ folder.")


def render_card(card: CardInfo, kind: str, repo_id: str, endpoint: str | None = None) -> str:
    """README.md for the Hub: YAML metadata the Hub indexes, then how to use the model and how it was made."""
    from huggingface_hub import ModelCardData

    endpoint = (endpoint or PUBLIC_ENDPOINT).rstrip("/")
    base_id = card.base_model if card.base_model and _is_hub_id(card.base_model) else None
    hub_datasets = [d for d in card.datasets if _is_hub_id(d)]
    tags = ["fnsft", "sft", "text-generation"]
    tags += {"adapter": ["peft", "lora"], "merged": ["lora", "merged"], "full": ["full-finetune"]}[kind]
    if base_id and kind == "adapter":
        tags.append(f"base_model:adapter:{base_id}")
    tags += [t for t in card.tags if t not in tags]
    # A merged LoRA is a fine-tune of its base for the Hub's model tree, not a merge of several models.
    relation = {"base_model_relation": "finetune"} if base_id and kind != "adapter" else {}
    metadata = ModelCardData(
        base_model=base_id, library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags, datasets=hub_datasets or None, license=card.license, **relation,
    )

    name = repo_id.split("/")[1]
    if base_id:
        base_text = f"[{base_id}]({endpoint}/{base_id})"
    else:
        base_text = f"a local model (`{_public(card.base_model)}`)" if card.base_model else "an unrecorded base model"
    lines = [f"---\n{metadata.to_yaml()}\n---", "", f"# {name}", ""]
    if kind == "adapter":
        lines += [f"A LoRA adapter for {base_text}, trained with supervised fine-tuning by "
                  "[FunctionalNetworksSFT](https://pypi.org/project/functionalnetworkssft/) (`fnsft`).", "",
                  "## Use", "", "```python",
                  "from peft import AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]
    else:
        what = ("A standalone model: a LoRA adapter merged into" if kind == "merged"
                else "A model fully fine-tuned from")
        lines += [f"{what} {base_text} with supervised fine-tuning by "
                  "[FunctionalNetworksSFT](https://pypi.org/project/functionalnetworkssft/) (`fnsft`). "
                  "No adapter is needed to use it.", "",
                  "## Use", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]

    lines += ["", "## Training", "", f"- Base model: {base_text}"]
    if card.method:
        lines.append(f"- Method: {card.method}")
    for dataset in card.datasets:
        shown = (f"[{dataset}]({endpoint}/datasets/{dataset})" if _is_hub_id(dataset)
                 else f"a local dataset (`{_public(dataset)}`)")
        lines.append(f"- Dataset: {shown}")
    if card.license:
        lines.append(f"- License: {card.license} (the base model's)")
    rows = _table_rows(card.hyperparameters)
    if rows:
        lines += ["", "### Hyperparameters", "", "| Name | Value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in rows]
    if kind == "merged" and card.merge_report:
        report = card.merge_report
        verification = report.get("verification") if isinstance(report.get("verification"), dict) else {}
        rows = _table_rows(verification, skip=("probes",)) + _table_rows(
            {k: v for k, v in report.items() if k != "verification"}, skip=REPORT_DETAIL)
        if rows:
            lines += ["", "## Merge verification", "",
                      "The merged model was reloaded and compared with base + adapter on fixed probe inputs "
                      "(figures from `merge_report.json`).", "", "| Figure | Value |", "| --- | --- |"]
            lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines) + "\n"


def _table_rows(values: dict, skip: tuple[str, ...] = (), prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a mapping into (name, value) rows with secrets dropped and local paths cut to folder names."""
    rows: list[tuple[str, str]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in skip or "token" in str(key).lower():
            continue
        if isinstance(value, dict):
            rows += _table_rows(value, skip, prefix=f"{name}.")
            continue
        if isinstance(value, (list, tuple)):
            shown = (", ".join(str(_public(v)) for v in value) if len(value) <= TABLE_LIST_MAX
                     else f"{len(value)} entries")
        elif isinstance(value, float):
            shown = repr(value) if len(repr(value)) <= 10 else f"{value:.6g}"
        else:
            shown = str(_public(value))
        rows.append((name, shown.replace("|", "\\|").replace("\n", " ")))
    return rows


def _looks_local(value: str) -> bool:
    return (value.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))
            or os.path.isabs(value) or os.path.exists(value))


def _public(value: Any) -> Any:
    """A value safe to publish: a local path becomes its last component, so no machine layout leaks."""
    if isinstance(value, str) and _looks_local(value):
        return Path(value.rstrip("/\\")).name or value
    return value


def _is_hub_id(value: str) -> bool:
    if _looks_local(value) or value.lower().endswith(LOCAL_FILE_SUFFIXES):
        return False
    parts = value.split("/")
    return len(parts) <= 2 and all(REPO_PART.match(p) and "--" not in p and ".." not in p for p in parts)


def _base_license(base_model: str | None, token: str | None) -> str | None:
    """The base model's license from its card: a local folder's README.md, the download cache, or the Hub."""
    if not base_model:
        return None
    if os.path.isdir(base_model):
        return _card_license(Path(base_model) / "README.md")
    if not _is_hub_id(base_model):
        return None
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(base_model, "README.md")
    if isinstance(cached, str):
        found = _card_license(Path(cached))
        if found:
            return found
    try:
        info = HfApi(token=token).model_info(base_model, timeout=PREFLIGHT_TIMEOUT_S)
    except Exception:  # the card is better without a license than the upload failing over one
        return None
    return getattr(info.card_data, "license", None) if info.card_data else None


def _card_license(readme: Path) -> str | None:
    try:
        from huggingface_hub import ModelCard

        data = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    value = getattr(data, "license", None)
    return value if isinstance(value, str) else None


def _files_to_upload(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file, minus hidden ones and the local README.md the card replaces."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if rel.as_posix() == "README.md":
            continue
        found.append((rel.as_posix(), path))
    return found


def _refuse_secret(files: list[tuple[str, Path]], token: str | None, readme: str, retry: str) -> None:
    """Never publish the token: a file that contains it (a config saved unmasked, say) stops the upload."""
    if not token:
        return
    needle = token.encode()
    if needle in readme.encode():
        raise FnsftError("the generated model card contains the Hub token; refusing to upload. This is a bug.")
    for _, path in files:
        if path.stat().st_size <= SECRET_SCAN_MAX_BYTES and needle in path.read_bytes():
            raise FnsftError(f"{path} contains the Hub token; refusing to upload it. Remove the token from that "
                             f"file, then retry with: {retry}")


# ---- upload ----------------------------------------------------------------------------------------------------------
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
                attempts: int = RETRY_ATTEMPTS, retry_base_delay: float | None = None) -> str:
    """Upload `folder` (adapter, merged or full model) to `repo_id` with a model card; return the commit URL.

    Transient failures (5xx, 429, connection errors) are retried `attempts` times with exponential backoff starting
    at `retry_base_delay` seconds (default: $FNSFT_HUB_RETRY_BASE_DELAY or 2). Nothing local is changed or deleted.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    kind = detect_kind(folder)
    retry = retry_command(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if token and _token_source(token) == "--hub_token":
        # The token came from a flag, which the command above must not repeat: it would land in shell history.
        retry += " (with HF_TOKEN set to your token, or --hub_token)"
    card = card if card is not None else CardInfo.from_folder(folder)
    if card.merge_report is None and kind == "merged":
        card = replace(card, merge_report=_read_json(folder / MERGE_REPORT))
    if card.license is None:
        card = replace(card, license=_base_license(card.base_model, token))
    readme = render_card(card, kind, repo_id, endpoint=constants.ENDPOINT)
    files = _files_to_upload(folder)
    _refuse_secret(files, token, readme, retry)

    branch = revision or "main"
    message = commit_message or f"Upload {KIND_LABEL[kind]} with fnsft"
    base_delay = _retry_base_delay() if retry_base_delay is None else retry_base_delay
    logger.info("Uploading %s %s (%d files) to %s/%s%s", KIND_LABEL[kind], folder, len(files) + 1,
                constants.ENDPOINT, repo_id, "" if branch == "main" else f" (branch {branch})")
    for attempt in range(1, attempts + 1):
        api = HfApi(token=token)
        try:
            return _push_once(api, folder, files, readme, repo_id, kind, private, branch, message, token)
        except Exception as exc:  # every failure ends in an FnsftError that says local files are intact
            reason = _one_line(exc, token)
            if not _is_transient(exc) or attempt == attempts:
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
    local = {rel for rel, _ in files}
    stale = [path for path in api.list_repo_files(repo_id, revision=branch)
             if path not in local and any(fnmatch(path.rsplit("/", 1)[-1], p) for p in MODEL_FILE_PATTERNS)]
    # Operations are rebuilt on every attempt: the client marks them as used, even after a failed commit.
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
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


def _is_transient(exc: BaseException) -> bool:
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


def _one_line(exc: BaseException, token: str | None = None) -> str:
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


def _retry_base_delay() -> float:
    value = os.environ.get(RETRY_BASE_DELAY_ENV)
    try:
        return max(0.0, float(value)) if value else RETRY_BASE_DELAY_S
    except ValueError:
        return RETRY_BASE_DELAY_S


def _read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


# ---- fnsft push ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None, prog: str = "fnsft push") -> None:
    cfg = parse(PushConfig, argv, prog)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request drowns the progress
    kind = detect_kind(cfg.model_dir)
    token = resolve_token(cfg.hub_token)
    preflight(cfg.hub_repo_id, token, private=cfg.hub_private, revision=cfg.hub_revision)
    url = push_folder(cfg.model_dir, cfg.hub_repo_id, token=token, private=cfg.hub_private,
                      revision=cfg.hub_revision, commit_message=cfg.hub_commit_message)
    print(f"Uploaded {KIND_LABEL[kind]} {cfg.model_dir} to {url}")
