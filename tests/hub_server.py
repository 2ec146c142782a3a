"""A small Hugging Face Hub-compatible HTTP server for tests, driven by the real `huggingface_hub` client.

It speaks the endpoints that `huggingface_hub` 2.x calls to upload and download a model repo:

    GET  /api/whoami-v2                                  token check
    POST /api/repos/create                               create (409 when it exists: visibility is never changed)
    POST /api/validate-yaml                              README.md metadata check done before every commit
    GET  /api/models/NS/NAME[/revision/REV]              repo_info / model_info
    POST /api/models/NS/NAME/preupload/REV               "regular" (inline base64) or "lfs" upload mode per file
    POST /api/models/NS/NAME/commit/REV                  NDJSON commit: header, file, lfsFile, deletedFile lines
    POST /api/models/NS/NAME/branch/BRANCH               create_branch
    GET  /api/models/NS/NAME/refs                        list_repo_refs
    GET  /api/models/NS/NAME/tree/REV[/PATH]             list_repo_tree
    GET  /api/models/NS/NAME/xet-write-token/REV         404: this server does not speak Xet, like many self-hosted Hubs
    POST /NS/NAME.git/info/lfs/objects/batch             LFS batch API, "basic" transfer only
    PUT  /__lfs__/OID, POST /__lfs__/OID/verify          LFS object upload (a stand-in for the presigned S3 URL)
    HEAD/GET /NS/NAME/resolve/REV/PATH                   file download, with the X-Repo-Commit / ETag headers

Repos live under `repos_dir`: one `repo.json` per repo (branches, commits, trees) and content-addressed blobs.

Use the `hub_server` fixture (registered in tests/conftest.py):

    def test_upload(hub_server):
        hub.push_folder(folder, "alice/demo", token=hub_server.token)      # in-process: the client is pointed at it
        assert "adapter_config.json" in hub_server.files("alice/demo")
        subprocess.run(["fnsft", "push", ...], env=hub_server.env())        # a subprocess gets HF_ENDPOINT and a token

    hub_server.fail("commit", times=2)            # the next 2 commit requests answer 500
    hub_server.stop()                             # later requests get "connection refused"

Accounts: `token` belongs to user `alice` (write role; member of org `acme` with write and of `viewers` with read);
`read_token` is a read-only token of `bob`. Every token starts with `hf_canary`, so that a test can search any output
for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

# Paths the public Hub stores with LFS because of its default .gitattributes; everything else is LFS only when it is
# large or binary. Keeping this rule means that small JSON files go inline in the commit and weights go through LFS,
# which is exactly the split that the client has to handle on the real Hub.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model",
                ".npy", ".npz", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".parquet", ".arrow")
REGULAR_MAX_BYTES = 5 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
ROUTES = [
    ("whoami", "GET", re.compile(r"^/api/whoami-v2$")),
    ("create", "POST", re.compile(r"^/api/repos/create$")),
    ("validate-yaml", "POST", re.compile(r"^/api/validate-yaml$")),
    ("info", "GET", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})(?:/revision/(?P<rev>[^/]+))?$")),
    ("preupload", "POST", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/preupload/(?P<rev>[^/]+)$")),
    ("commit", "POST", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/commit/(?P<rev>[^/]+)$")),
    ("branch", "POST", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/branch/(?P<rev>[^/]+)$")),
    ("refs", "GET", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/refs$")),
    ("tree", "GET", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("xet-token", "GET", re.compile(rf"^/api/models/(?P<repo>{NAME}/{NAME})/xet-(?:read|write)-token/.*$")),
    ("lfs-batch", "POST", re.compile(rf"^/(?P<repo>{NAME}/{NAME})\.git/info/lfs/objects/batch$")),
    ("lfs-upload", "PUT", re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})$")),
    ("lfs-verify", "POST", re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})/verify$")),
    ("resolve", "GET", re.compile(rf"^/(?P<repo>{NAME}/{NAME})/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


@dataclass
class Account:
    name: str
    role: str = "write"  # the token's role: "write", "read" or "fineGrained"
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> roleInOrg
    fine_grained: dict | None = None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The server, its accounts, its stored repos, and switches for failures. See the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.repos_dir = self.root / "repos"
        self.blobs_dir = self.repos_dir / "_blobs"
        self.home = self.root / "hf_home"  # HF_HOME of the clients: no cached login, a private download cache
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.token = "hf_canary" + secrets.token_hex(16)
        self.read_token = "hf_canary" + secrets.token_hex(16)
        self.accounts: dict[str, Account] = {
            self.token: Account("alice", "write", {"acme": "write", "viewers": "read"}),
            self.read_token: Account("bob", "read"),
        }
        self.requests: list[tuple[str, str, int]] = []  # (method, endpoint name, status) of every request
        self._faults: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut down: from now on connections to `url` are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ---- test controls ---------------------------------------------------------------------------------------------
    def fail(self, endpoint: str, times: int = 1, status: int = 500) -> None:
        """Answer the next `times` requests to `endpoint` (a ROUTES name, or "*" for any) with `status`."""
        with self._lock:
            self._faults.setdefault(endpoint, []).extend([status] * times)

    def calls(self, endpoint: str) -> list[int]:
        """Statuses returned so far for `endpoint`, in order."""
        return [status for _, name, status in self.requests if name == endpoint]

    def add_account(self, token: str, account: Account) -> None:
        self.accounts[token] = account

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for a subprocess client of this server (HF_TOKEN only when `token` is given)."""
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=self.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(self.home),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   FNSFT_HUB_RETRY_BASE_DELAY="0.01")
        env.pop("HF_HUB_CACHE", None)
        if token is not None:
            env["HF_TOKEN"] = token
        env.update(extra)
        return env

    def activate(self, monkeypatch) -> None:
        """Point this process's `huggingface_hub` at the server; `monkeypatch` undoes it after the test.

        huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME once, at import, so the constants derived from
        them are patched as well as the environment.
        """
        from huggingface_hub import constants

        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(self.home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(self.home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.home / "hub"))

    # ---- stored repos ----------------------------------------------------------------------------------------------
    def repo(self, repo_id: str) -> dict | None:
        path = self._repo_file(repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of the files of `repo_id` at a branch or commit."""
        repo = self.repo(repo_id)
        assert repo is not None, f"no repo {repo_id}"
        tree = repo["commits"][repo["branches"].get(revision, revision)]["tree"]
        return {path: (self.blobs_dir / entry["sha256"]).read_bytes() for path, entry in tree.items()}

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        """Commits of a branch, newest first."""
        repo = self.repo(repo_id)
        assert repo is not None, f"no repo {repo_id}"
        out, sha = [], repo["branches"][revision]
        while sha:
            out.append(repo["commits"][sha] | {"oid": sha})
            sha = repo["commits"][sha]["parent"]
        return out

    def create_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> None:
        """Seed a repo directly (e.g. a base model whose license a card should carry)."""
        with self._lock:
            self._new_repo(repo_id, private)
            if files:
                repo = self.repo(repo_id)
                self._commit(repo_id, repo, "main", "seed", {p: self._store(c) for p, c in files.items()}, [])

    def _repo_file(self, repo_id: str) -> Path:
        return self.repos_dir / repo_id / "repo.json"

    def _save(self, repo_id: str, repo: dict) -> None:
        path = self._repo_file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1))
        tmp.replace(path)

    def _store(self, data: bytes, lfs: bool | None = None) -> dict:
        sha256 = hashlib.sha256(data).hexdigest()
        (self.blobs_dir / sha256).write_bytes(data)
        if lfs is None:
            lfs = _is_lfs_path("x", len(data), data[:512])
        return {"sha256": sha256, "git_sha1": git_sha1(data), "size": len(data), "lfs": lfs}

    def _new_repo(self, repo_id: str, private: bool) -> dict:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo = {"id": repo_id, "private": private, "created": now, "branches": {}, "commits": {}}
        self._commit(repo_id, repo, None, "initial commit", {".gitattributes": self._store(GITATTRIBUTES, False)}, [])
        return repo

    def _commit(self, repo_id: str, repo: dict, branch: str | None, summary: str, added: dict, deleted: list) -> str:
        parent = repo["branches"].get(branch or "main")
        tree = dict(repo["commits"][parent]["tree"]) if parent else {}
        for path in deleted:
            tree = {p: e for p, e in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        tree.update(added)
        body = json.dumps([parent, summary, sorted((p, e["sha256"]) for p, e in tree.items()), time.time_ns()])
        sha = hashlib.sha1(body.encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "summary": summary, "tree": tree,
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        repo["branches"][branch or "main"] = sha
        self._save(repo_id, repo)
        return sha


def _is_lfs_path(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX_BYTES or b"\0" in sample


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    loaded = yaml.safe_load(match.group(1))
    if not isinstance(loaded, dict):
        raise ValueError("metadata must be a YAML mapping")
    return loaded


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_version = "fnsft-test-hub/1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default per-request stderr line
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- plumbing --------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._route = "unknown"
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        name, match = "unknown", None
        for route, route_method, pattern in ROUTES:
            wanted = "GET" if method == "HEAD" else method
            if route_method == wanted and (match := pattern.match(parts.path)):
                name = route
                break
        self._route = name
        body = self._read_body()
        hub = self.hub
        with hub._lock:
            faults = hub._faults.get(name) or hub._faults.get("*")
            injected = faults.pop(0) if faults else None
        if injected is not None:
            self._send(injected, {"error": f"injected failure {injected}"})
        elif match is None:
            self._send(404, {"error": f"no route for {method} {parts.path}"})
        else:
            try:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with hub._lock:
                    getattr(self, "_" + name.replace("-", "_"))(method, body, **args)
            except HubError as exc:
                headers = dict(exc.headers)
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                headers["X-Error-Message"] = exc.message
                self._send(exc.status, {"error": exc.message, **exc.extra}, headers)
            except Exception as exc:  # a server bug must show up as a 500 naming it, not as a dropped connection
                self._send(500, {"error": f"test hub server bug: {exc!r}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload, headers: dict | None = None, raw: bytes | None = None) -> None:
        # Recorded before the answer goes out: the client may act on it before this thread runs again.
        self.hub.requests.append((self.command, self._route, status))
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _account(self, required: bool = False) -> Account | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "Authorization header is required")
            return None
        account = self.hub.accounts.get(token)
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return account

    def _repo(self, repo_id: str, write: bool = False) -> dict:
        account = self._account(required=write)
        repo = self.hub.repo(repo_id)
        namespace = repo_id.split("/")[0]
        member = account is not None and (account.name == namespace or namespace in account.orgs)
        if repo is None or (repo["private"] and not member):
            # The Hub answers 401 for a private repo a client may not see, so that its existence does not leak.
            raise HubError(401 if account is None else 404, "Repository not found", "RepoNotFound")
        if write and not _can_write(account, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _rev(repo: dict, rev: str) -> str:
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # ---- endpoints -------------------------------------------------------------------------------------------------
    def _whoami(self, method, body):
        account = self._account(required=True)
        token_info = {"displayName": "test token", "role": account.role}
        if account.fine_grained is not None:
            token_info["fineGrained"] = account.fine_grained
        self._send(200, {"type": "user", "id": account.name, "name": account.name, "fullname": account.name.title(),
                         "orgs": [{"type": "org", "name": org, "roleInOrg": role}
                                  for org, role in account.orgs.items()],
                         "auth": {"type": "access_token", "accessToken": token_info}})

    def _create(self, method, body):
        account = self._account(required=True)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        repo_id = f"{payload.get('organization') or account.name}/{payload['name']}"
        if self.hub.repo(repo_id) is not None:
            # Like the Hub, the 409 carries the repo URL: create_repo(exist_ok=True) returns it.
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.hub.url}/{repo_id}"})
        if not _can_write(account, repo_id):
            raise HubError(403, f"You don't have the rights to create a model under the namespace "
                                f"{repo_id.split('/')[0]}")
        private = payload.get("visibility") == "private" if "visibility" in payload else bool(payload.get("private"))
        self.hub._new_repo(repo_id, private)
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, method, body):
        payload = json.loads(body or b"{}")
        try:
            _front_matter(payload.get("content", ""))
        except (yaml.YAMLError, ValueError) as exc:
            self._send(400, {"errors": [{"message": f"invalid YAML metadata: {exc}"}], "warnings": []})
            return
        self._send(200, {"errors": [], "warnings": []})

    def _info(self, method, body, repo, rev="main"):
        stored = self._repo(repo)
        sha = self._rev(stored, rev)
        tree = stored["commits"][sha]["tree"]
        card = {}
        if "README.md" in tree:
            try:
                card = _front_matter((self.hub.blobs_dir / tree["README.md"]["sha256"]).read_text())
            except (yaml.YAMLError, ValueError, UnicodeDecodeError):
                card = {}
        self._send(200, {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                         "private": stored["private"], "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                         "lastModified": stored["commits"][sha]["date"], "createdAt": stored["created"],
                         "tags": card.get("tags") or [], "library_name": card.get("library_name"),
                         "pipeline_tag": card.get("pipeline_tag"), "cardData": card or None,
                         "siblings": [{"rfilename": p} for p in sorted(tree)]})

    def _preupload(self, method, body, repo, rev):
        stored = self._repo(repo, write=True)
        tree = stored["commits"][self._rev(stored, rev)]["tree"] if rev in stored["branches"] else {}
        files = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item.get("sample", ""))
            lfs = _is_lfs_path(item["path"], item["size"], sample)
            entry = tree.get(item["path"])
            oid = None if entry is None else (entry["sha256"] if entry["lfs"] else entry["git_sha1"])
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": stored["branches"].get(rev)})

    def _commit(self, method, body, repo, rev):
        stored = self._repo(repo, write=True)
        if rev not in stored["branches"]:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        summary, added, deleted = "", {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                content = base64.b64decode(value["content"])
                added[value["path"]] = self.hub._store(content, lfs=False)
            elif key == "lfsFile":
                blob = self.hub.blobs_dir / value["oid"]
                if not blob.exists():
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                data = blob.read_bytes()
                added[value["path"]] = {"sha256": value["oid"], "git_sha1": git_sha1(data), "size": len(data),
                                        "lfs": True}
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"unknown commit operation {key}")
        if not summary:
            raise HubError(400, "commit summary is required")
        sha = self.hub._commit(repo, stored, rev, summary, added, deleted)
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
                         "pullRequestUrl": None})

    def _branch(self, method, body, repo, rev):
        stored = self._repo(repo, write=True)
        if rev in stored["branches"]:
            raise HubError(409, f"Reference refs/heads/{rev} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        stored["branches"][rev] = self._rev(stored, start)
        self.hub._save(repo, stored)
        self._send(200, {})

    def _refs(self, method, body, repo):
        stored = self._repo(repo)
        self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                                      for b, sha in stored["branches"].items()], "tags": [], "converts": []})

    def _tree(self, method, body, repo, rev, path=""):
        stored = self._repo(repo)
        tree = stored["commits"][self._rev(stored, rev)]["tree"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for file_path, entry in sorted(tree.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            item = {"type": "file", "oid": entry["git_sha1"], "size": entry["size"], "path": file_path}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
            entries.append(item)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send(200, entries)

    def _xet_token(self, method, body, repo):
        raise HubError(404, "Xet storage is not available on this server")

    def _lfs_batch(self, method, body, repo):
        self._repo(repo, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.hub.blobs_dir / obj["oid"]).exists():
                href = f"{self.hub.url}/__lfs__/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href, "header": {}}, "verify": {"href": href + "/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, method, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        (self.hub.blobs_dir / oid).write_bytes(body)
        self._send(200, {})

    def _lfs_verify(self, method, body, oid):
        payload = json.loads(body)
        blob = self.hub.blobs_dir / oid
        if not blob.exists() or blob.stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} not found")
        self._send(200, {})

    def _resolve(self, method, body, repo, rev, path):
        stored = self._repo(repo)
        sha = self._rev(stored, rev)
        entry = stored["commits"][sha]["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha}
        if entry["lfs"]:
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": str(entry["size"])})
        else:
            headers["ETag"] = f'"{entry["git_sha1"]}"'
        self._send(200, None, headers, raw=(self.hub.blobs_dir / entry["sha256"]).read_bytes())


def _can_write(account: Account | None, repo_id: str) -> bool:
    if account is None:
        return False
    namespace = repo_id.split("/")[0]
    if account.role == "fineGrained":
        for scoped in (account.fine_grained or {}).get("scoped", []):
            entity = scoped.get("entity", {})
            if entity.get("name") in (namespace, repo_id) and "repo.write" in scoped.get("permissions", []):
                return True
        return False
    if account.role != "write":
        return False
    return namespace == account.name or account.orgs.get(namespace) in ("admin", "write", "contributor")


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A running HubServer on 127.0.0.1 (random port) that this process's huggingface_hub talks to.

    Yields the HubServer: `.url`, `.token` (user alice, write), `.read_token`, `.repos_dir`, `.files(repo_id)`,
    `.fail(endpoint, times, status)`, `.stop()`, and `.env(token=...)` for subprocesses (sets HF_ENDPOINT, HF_HOME,
    HF_HUB_OFFLINE=0 and tiny upload-retry delays). No HF_TOKEN is set in this process: pass tokens explicitly or
    `monkeypatch.setenv("HF_TOKEN", hub_server.token)`.
    """
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    server.activate(monkeypatch)
    try:
        yield server
    finally:
        server.stop()
