"""A Hub-compatible HTTP server for tests, plus the tiny output folders the Hub tests push.

`FakeHub` answers the routes the real `huggingface_hub` client (2.x) calls to create a repo, validate a card, commit
files and download them again, so tests run the unmodified client end to end over HTTP on 127.0.0.1:

- `POST /api/repos/create`, `POST /api/models/{id}/branch/{branch}`, `GET /api/whoami-v2`
- `POST /api/validate-yaml` (YAML parses to a mapping; `model-index` has the shape the Hub requires)
- `POST /api/models/{id}/preupload/{rev}`: every file is `"regular"` (inline base64 in the commit), which keeps the
  client on the plain HTTP path: no LFS, no Xet.
- `POST /api/models/{id}/commit/{rev}`: the NDJSON body (a header line, then one line per file operation).
- `GET /api/models/{id}[/revision/{rev}]`, `GET /api/models/{id}/tree/{rev}[/{path}]`
- `HEAD|GET /{id}/resolve/{rev}/{path}` with the headers `get_hf_file_metadata` reads: `X-Repo-Commit`, `ETag` (the
  git blob id, as for regular files on the Hub), `Content-Length`; 404s carry `X-Error-Code` so the client raises
  the same errors as against the Hub.

Writes need `Authorization: Bearer <FakeHub.token>`; a wrong token is answered 401 everywhere, as the Hub does.
`FakeHub.fail_on` makes an endpoint answer an error status (e.g. `{"commit": 500}`: a failure mid-upload) and
`FakeHub.drop_from_next_commit` makes the server silently lose a file (a partial commit), to test failure handling.

The client reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and friends when `huggingface_hub` is imported, so a client in a
fresh process gets its configuration from `FakeHub.client_env`, and an in-process client from `FakeHub.patch_client`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_fake_write_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_INITIAL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
# Left out of a client's environment: the test session runs offline (conftest), and caches must not be shared.
_CLEARED_VARIABLES = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_TOKEN_PATH",
)


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob: what the Hub uses as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: HTTP status, message, and the `X-Error-Code` the client dispatches on."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the JSON error body


@dataclass
class _Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit id -> {path: blob id}
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    def resolve(self, revision: str) -> str:
        """The commit id of a branch name or a full commit id."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class FakeHub:
    """A threaded Hub-compatible server on 127.0.0.1, storing repos under `root`.

    Args:
        root (`Path`): where blobs are stored (a test's temporary directory).
        token (`str`, *optional*): the only token accepted for writes and private reads.
    """

    def __init__(self, root: Path, token: str = DEFAULT_TOKEN):
        self.root = Path(root)
        self.token = token
        self.fail_on: dict[str, int] = {}  # endpoint name ("create", "preupload", "commit", ...) -> status
        self.drop_from_next_commit: str | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for debugging failed tests
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- client configuration -------------------------------------------------------------------------------------

    def client_settings(self, hf_home: Path, token: str | None = None) -> dict[str, str]:
        """The environment variables that point a `huggingface_hub` client at this server, with its own cache."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": token if token is not None else self.token,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def client_env(self, hf_home: Path, token: str | None = None) -> dict[str, str]:
        """The whole environment of a fresh process whose `huggingface_hub` client talks to this server."""
        env = {name: value for name, value in os.environ.items() if name not in _CLEARED_VARIABLES}
        env.update(self.client_settings(hf_home, token))
        return env

    def patch_client(self, monkeypatch, hf_home: Path, token: str | None = None) -> None:
        """Points the already imported `huggingface_hub` of this process at the server (undone by `monkeypatch`).

        The client copied its environment into `huggingface_hub.constants` at import time, so the constants are
        patched as well as the environment.
        """
        from huggingface_hub import constants

        for name in _CLEARED_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.client_settings(hf_home, token).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))

    # -- inspection -----------------------------------------------------------------------------------------------

    def repo_exists(self, repo_id: str) -> bool:
        return repo_id in self._repos

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repo at a revision."""
        with self._lock:
            repo = self._get_repo(repo_id)
            tree = repo.commits[repo.resolve(revision)]
        return {path: self._read_blob(blob) for path, blob in tree.items()}

    def commit_count(self, repo_id: str) -> int:
        return len(self._repos[repo_id].commits)

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit a branch points to."""
        return self._repos[repo_id].branches[branch]

    def is_private(self, repo_id: str) -> bool:
        return self._repos[repo_id].private

    # -- storage --------------------------------------------------------------------------------------------------

    def _write_blob(self, content: bytes) -> str:
        blob = git_blob_id(content)
        path = self.root / "blobs" / blob
        if not path.exists():
            path.write_bytes(content)
        return blob

    def _read_blob(self, blob: str) -> bytes:
        return (self.root / "blobs" / blob).read_bytes()

    def _get_repo(self, repo_id: str, authorized: bool = True) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # The Hub hides private repos from strangers behind the same answer as missing ones.
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_commit(self, repo: _Repo, parent: str | None, tree: dict[str, str], summary: str) -> str:
        self._commit_counter += 1
        payload = json.dumps([parent, sorted(tree.items()), summary, self._commit_counter]).encode()
        commit = hashlib.sha1(payload).hexdigest()
        repo.commits[commit] = tree
        return commit

    # -- endpoints ------------------------------------------------------------------------------------------------

    def create_repo(self, request: _Request) -> tuple[int, Any]:
        request.require_write()
        body = request.json()
        if body.get("type", "model") != "model":
            raise HubError(400, "The fake hub only stores model repos")
        name, organization = body.get("name"), body.get("organization")
        if not name or not organization:
            raise HubError(400, "The fake hub needs repo ids of the form ORG/NAME")
        repo_id = f"{organization}/{name}"
        with self._lock:
            if repo_id in self._repos:
                # The client reads the url of the existing repo from the 409 answer when `exist_ok=True`.
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            repo = _Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            tree = {".gitattributes": self._write_blob(_INITIAL_GITATTRIBUTES)}
            repo.branches["main"] = self._new_commit(repo, None, tree, "initial commit")
            self._repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def create_branch(self, request: _Request, repo_id: str, branch: str) -> tuple[int, Any]:
        request.require_write()
        body = request.json() if request.body else {}
        with self._lock:
            repo = self._get_repo(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(body.get("startingPoint") or "main")
        return 200, {}

    def validate_yaml(self, request: _Request) -> tuple[int, Any]:
        errors, warnings = validate_card_metadata(request.json().get("content", ""))
        status = 400 if errors else 200
        return status, {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}

    def preupload(self, request: _Request, repo_id: str, revision: str) -> tuple[int, Any]:
        request.require_write()
        files = request.json().get("files", [])
        with self._lock:
            repo = self._get_repo(repo_id)
            tree = repo.commits[repo.resolve(revision)]
        # The oid of an unchanged file lets the client drop it from the commit, as against the Hub.
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in files
        ]
        return 200, {"files": answer, "commitOid": repo.resolve(revision)}

    def commit(self, request: _Request, repo_id: str, revision: str) -> tuple[int, Any]:
        request.require_write()
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        if "create_pr" in request.query:
            raise HubError(400, "The fake hub does not support pull requests")
        header = lines[0]["value"]
        with self._lock:
            repo = self._get_repo(repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo.branches[revision]
            if header.get("parentCommit") and not parent.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[parent])
            for line in lines[1:]:
                self._apply_operation(tree, line)
            if self.drop_from_next_commit is not None:
                tree.pop(self.drop_from_next_commit, None)
                self.drop_from_next_commit = None
            commit = self._new_commit(repo, parent, tree, header.get("summary", ""))
            repo.branches[revision] = commit
        return 200, {
            "success": True,
            "commitOid": commit,
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    def _apply_operation(self, tree: dict[str, str], line: dict) -> None:
        key, value = line.get("key"), line.get("value", {})
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
            tree[value["path"]] = self._write_blob(base64.b64decode(value["content"]))
        elif key == "deletedFile":
            if tree.pop(value["path"], None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in tree if p.startswith(prefix)]:
                del tree[path]
        else:
            # Every file was announced "regular" at preupload, so an LFS pointer here is a client we do not model.
            raise HubError(422, f"The fake hub does not support {key!r} operations")

    def model_info(self, request: _Request, repo_id: str, revision: str | None) -> tuple[int, Any]:
        with self._lock:
            repo = self._get_repo(repo_id, request.authorized)
            commit = repo.resolve(revision or "main")
            tree = repo.commits[commit]
        return 200, {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": repo.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": path} for path in sorted(tree)],
        }

    def tree(self, request: _Request, repo_id: str, revision: str, prefix: str) -> tuple[int, Any]:
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self._lock:
            repo = self._get_repo(repo_id, request.authorized)
            tree = repo.commits[repo.resolve(revision)]
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, blob in sorted(tree.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            if not recursive and "/" in relative:
                folders.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                continue
            entries.append({"type": "file", "oid": blob, "size": len(self._read_blob(blob)), "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d} for d in folders]
        return 200, entries

    def resolve(self, request: _Request, repo_id: str, revision: str, path: str) -> tuple[int, bytes, dict]:
        with self._lock:
            repo = self._get_repo(repo_id, request.authorized)
            commit = repo.resolve(revision)
            blob = repo.commits[commit].get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", {"X-Repo-Commit": commit})
        content = self._read_blob(blob)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{blob}"', "Accept-Ranges": "bytes"}
        status, content = _apply_range(request.headers.get("Range"), content, headers)
        return status, content, headers


def _apply_range(range_header: str | None, content: bytes, headers: dict) -> tuple[int, bytes]:
    """Serves `bytes=start-[end]` ranges, which the client sends to resume an interrupted download."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if match is None:
        return 200, content
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else len(content) - 1
    if start >= len(content):
        raise HubError(416, "Requested range not satisfiable")
    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
    return 206, content[start : end + 1]


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """The checks of `/api/validate-yaml` that matter for model cards: (errors, warnings)."""
    match = _YAML_BLOCK.search(content)
    if match is None:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        metadata = yaml.safe_load(match.group(2))
    except yaml.YAMLError as error:
        return [f"YAML does not parse: {error}"], []
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"], []
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "base_model"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, str) or _is_list_of(value, str)):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "model-index" in metadata:
        errors += _model_index_errors(metadata["model-index"])
    return errors, []


def _model_index_errors(model_index: Any) -> list[str]:
    if not _is_list_of(model_index, dict) or not model_index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, entry in enumerate(model_index):
        if not isinstance(entry.get("name"), str):
            errors.append(f'"model-index[{i}].name" must be a string')
        results = entry.get("results")
        if not _is_list_of(results, dict):
            errors.append(f'"model-index[{i}].results" must be a list')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'"{where}.task.type" must be a string')
            dataset = result.get("dataset") or {}
            if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append(f'"{where}.dataset" needs "type" and "name" strings')
            metrics = result.get("metrics")
            if not _is_list_of(metrics, dict) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for metric in metrics:
                value = metric.get("value")
                if not isinstance(metric.get("type"), str) or isinstance(value, bool) or value is None:
                    errors.append(f'"{where}.metrics" entries need a "type" string and a "value"')
    return errors


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)


# -- HTTP plumbing ----------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: str

    @property
    def _bearer(self) -> str | None:
        authorization = self.headers.get("Authorization") or ""
        return authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None

    @property
    def authorized(self) -> bool:
        return self._bearer == self.token

    def check_token(self) -> None:
        """A token that is sent must be valid, whatever the route (the Hub answers 401 to a revoked token)."""
        if self._bearer is not None and not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    def require_write(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Body is not JSON: {error}") from error


_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate-yaml"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)"), "branch"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer below sets Content-Length

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args) -> None:  # the request log lives in FakeHub.requests instead
        pass

    def _dispatch(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""  # read fully, even to fail: the connection is reused
        request = _Request(self.command, split.path, parse_qs(split.query), self.headers, body, hub.token)
        try:
            name, params = self._route(request)
            if name in hub.fail_on:
                raise HubError(hub.fail_on[name], f"Internal Error - the fake hub was told to fail on {name}")
            request.check_token()
            self._answer(hub, name, params, request)
        except HubError as error:
            headers = dict(error.headers)
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            headers["X-Error-Message"] = error.message
            self._send(hub, error.status, json.dumps({"error": error.message, **error.extra}).encode(), headers)

    def _route(self, request: _Request) -> tuple[str, dict[str, str]]:
        method = "GET" if request.method == "HEAD" else request.method
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(request.path)
            if match and route_method == method:
                return name, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        raise HubError(404, f"The fake hub has no route {request.method} {request.path}")

    def _answer(self, hub: FakeHub, name: str, params: dict[str, str], request: _Request) -> None:
        repo_id, revision = params.get("repo"), params.get("rev")
        if name == "resolve":
            status, content, headers = hub.resolve(request, repo_id, revision, params["path"])
            self._send(hub, status, content, {"Content-Type": "application/octet-stream", **headers})
            return
        if name == "create":
            status, answer = hub.create_repo(request)
        elif name == "validate-yaml":
            status, answer = hub.validate_yaml(request)
        elif name == "whoami":
            request.require_write()
            status, answer = 200, {"type": "user", "name": "fake-user", "orgs": [], "auth": {"type": "access_token"}}
        elif name == "preupload":
            status, answer = hub.preupload(request, repo_id, revision)
        elif name == "commit":
            status, answer = hub.commit(request, repo_id, revision)
        elif name == "branch":
            status, answer = hub.create_branch(request, repo_id, revision)
        elif name == "tree":
            status, answer = hub.tree(request, repo_id, revision, params.get("path", ""))
        else:
            status, answer = hub.model_info(request, repo_id, revision)
        self._send(hub, status, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def _send(self, hub: FakeHub, status: int, content: bytes, headers: dict[str, str]) -> None:
        hub.requests.append((self.command, self.path, status))
        self.send_response(status, HTTPStatus(status).phrase)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)


# -- what a distillation run leaves on disk ---------------------------------------------------------------------------

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(94)]


def tiny_bert(seed: int = 0):
    """A tiny randomly initialised BERT classifier (99-token vocab), in eval mode; never loaded by Hub name."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def save_tiny_tokenizer(output_dir: Path) -> None:
    from transformers import BertTokenizer

    vocab_file = Path(output_dir) / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(vocab_file)).save_pretrained(output_dir)


def fabricated_had_config(layer_names: list[str]) -> dict[str, Any]:
    """A HADConfig as stored in `config.json` (`quantization_config`), without needing the core package."""
    return {
        "quant_method": "had",
        "top_n": 4,
        "top_n_ratio": None,
        "sigma_q": {name: round(0.8 + 0.25 * i, 4) for i, name in enumerate(layer_names)},
        "sigma_k": {name: round(1.1 + 0.5 * i, 4) for i, name in enumerate(layer_names)},
        "stage": "binary",
        "c": 1.0,
        "ste_clip": 1.0,
        "binarize_self_attention": True,
        "binarize_cross_attention": True,
    }


def make_results(had_config: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """A `results.json` in the schema written by the distillation recipe, for a short four-stage run."""
    timeline = [
        {"stage": "tanh", "start_step": 0, "end_step": 40},
        {"stage": "sign", "start_step": 40, "end_step": 100},
        {"stage": "ste", "start_step": 100, "end_step": 140},
        {"stage": "binary", "start_step": 140, "end_step": 180},
    ]
    log_history: list[dict[str, Any]] = []
    c = 5.0
    for step in range(10, 181, 10):
        stage = next(s["stage"] for s in timeline if s["start_step"] < step <= s["end_step"])
        loss_attn = 0.0 if stage == "binary" else round(0.9 / (1 + step / 50), 4)
        loss_out = round(0.6 / (1 + step / 80), 4)
        c = max(c * 0.9, 0.05)
        log_history.append(
            {
                "step": step,
                "loss": round(loss_attn + loss_out, 4),
                "loss_attn": loss_attn,
                "loss_out": loss_out,
                "c": round(c, 4),
                "stage": stage,
                "learning_rate": 2e-6 if stage == "binary" else 2e-5,
            }
        )
        if step % 40 == 0 or step == 180:
            log_history.append({"step": step, "eval_accuracy": round(0.80 + step / 3000, 4), "eval_loss": 0.4})
    return {
        "task": "sst2",
        "main_metric": "accuracy",
        "teacher": {
            "model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
            "finetune_steps": 120,
            "metrics": {"accuracy": 0.8956, "f1": 0.9012},
        },
        "student": {"metrics": {"accuracy": 0.8784, "f1": 0.8837}},
        "metrics_per_stage": [
            {"stage": "tanh", "step": 40, "metrics": {"accuracy": 0.8813}},
            {"stage": "sign", "step": 100, "metrics": {"accuracy": 0.8747}},
            {"stage": "ste", "step": 140, "metrics": {"accuracy": 0.8761}},
            {"stage": "binary", "step": 180, "metrics": {"accuracy": 0.8784}},
        ],
        "had_config": had_config,
        "stage_timeline": timeline,
        "schedule": {"c_start": 5.0, "c_switch": 1.0, "c_end": 0.05, "gamma": 0.9, "skip_tanh": False},
        "log_history": log_history,
        "dataset": {"name": "glue", "config": "sst2", "source": "nyu-mll/glue", "split": "validation"},
        "max_seq_length": 128,
        "seed": 42,
        "wall_time_s": 812.4,
        "peak_memory_mb": 1234.0,
        "command": command
        or "accelerate launch recipes/distill_glue.py --task_name sst2 --top_n 4 --output_dir outputs/sst2-had",
        "training_args": {"learning_rate": 2e-5, "per_device_train_batch_size": 16, "max_grad_norm": 0.5},
        "had_hf_version": "0.1.0",
        "transformers_version": "5.24.0",
    }


def save_output_dir(output_dir: Path, model=None, had_config: dict[str, Any] | None = None) -> Path:
    """Writes a complete distillation output folder: safetensors weights, config with HADConfig, tokenizer, results.

    Args:
        model: a HAD model (converted with `had_hf.convert`), saved as is; by default a tiny BERT whose
            `config.json` gets a fabricated HADConfig, enough for the push mechanics.
        had_config: the HADConfig dict for `results.json`; by default the one in the saved `config.json`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fabricate = model is None
    model = tiny_bert() if fabricate else model
    model.save_pretrained(output_dir)
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    if fabricate:
        names = [name for name, _ in model.named_modules() if name.endswith("attention.self")]
        config["quantization_config"] = fabricated_had_config(names)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tiny_tokenizer(output_dir)
    results = make_results(had_config or config["quantization_config"])
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return output_dir


def hash_tree(folder: Path) -> dict[str, tuple[str | None, int]]:
    """(sha256, mode) of every file and (None, mode) of every folder under `folder`: equal iff nothing changed."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
            path.stat().st_mode,
        )
        for path in sorted(folder.rglob("*"))
    }
