"""A local, in-process Hugging Face Hub look-alike for tests.

`HubServer` is a small HTTP server (standard library only) that speaks the subset of the Hub HTTP API
used by the real `huggingface_hub` client (checked against huggingface_hub 2.4.0):

* repos: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``POST /api/repos/move``,
  ``PUT /api/{type}s/{repo}/settings``, ``GET /api/whoami-v2``, ``POST /api/validate-yaml``;
* info: ``GET /api/{type}s/{repo}`` and ``GET /api/{type}s/{repo}/revision/{rev}`` (``?blobs=true``);
* listing: ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand``, ``cursor``
  paging through a ``Link: <...>; rel="next"`` header), ``POST /api/{type}s/{repo}/paths-info/{rev}``,
  ``GET /api/{type}s/{repo}/commits/{rev}``, ``GET /api/{type}s/{repo}/refs``;
* refs: ``POST|DELETE /api/{type}s/{repo}/branch/{branch}``, ``POST|DELETE /api/{type}s/{repo}/tag/{x}``;
* uploads: ``POST /api/{type}s/{repo}/preupload/{rev}`` (regular vs LFS), ``POST /api/{type}s/{repo}/commit/{rev}``
  (ndjson: header / file / lfsFile / deletedFile / deletedFolder lines, ``create_pr=1``),
  ``POST /[{type}s/]{repo}.git/info/lfs/objects/batch`` (LFS "basic" transfer), then the upload URLs it
  hands out: ``PUT /__lfs/upload/{sha256}?size=N`` (sha256 and size are verified) and ``POST /__lfs/verify``;
* downloads: ``HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` / ``X-Linked-Size`` (LFS files), ``Content-Length`` and ``Range`` support (the client
  resumes cut-off downloads with a Range request).

Errors carry the ``X-Error-Code`` header the client maps to exception classes: ``RepoNotFound`` ->
`RepositoryNotFoundError`, ``RevisionNotFound`` -> `RevisionNotFoundError`, ``EntryNotFound`` ->
`EntryNotFoundError` (`RemoteEntryNotFoundError`).

Xet is never advertised (no ``X-Xet-*`` headers, no ``xetHash`` in listings, the xet token routes answer 501).
The 2.4.0 client decides to upload through Xet purely from ``is_xet_available()`` (i.e. ``hf_xet`` installed and
``HF_HUB_DISABLE_XET`` unset), never from the server, so the `hub_server` fixture sets ``HF_HUB_DISABLE_XET=1``
(and patches ``huggingface_hub.constants.HF_HUB_DISABLE_XET``); uploads then go through preupload + LFS batch.

Storage: every commit gets a 40-hex sha and keeps a full snapshot of its file tree (path -> entry); branches
and tags point at commits, so old revisions stay readable. File contents live in a content-addressed store
(``<storage_dir>/blobs/<sha256>``). Any bearer token is accepted (and never logged).

Fault injection (plain int attributes, each decremented by one per affected request, thread-safe):

* ``fail_next_commits``: the next N ``/commit/`` requests answer HTTP 500 and leave the repo untouched.
  ``create_commit``/``upload_file``/``upload_folder`` do not retry commits, so 1 is enough to make one call fail.
* ``fail_next_lfs_uploads``: the next N LFS ``PUT`` uploads answer 500. The client retries those PUTs with
  backoff (up to 5 retries, sleeping 1+2+4+8+8 s), so use N >= 6 to make an upload fail (slow) or N = 1 to
  exercise one retry (~1 s).
* ``fail_next_downloads``: the next N file ``GET`` requests on ``/resolve/`` answer 500 (``HEAD`` metadata
  requests are not affected). The client does not retry these GETs: ``hf_hub_download`` raises at once.
* ``truncate_next_downloads``: the next N file ``GET`` requests on ``/resolve/`` announce the full
  ``Content-Length`` of the requested range, but the connection is closed once the byte at offset
  ``size // 2`` of the *file* is reached (a resumed ``Range: bytes=<half>-`` request thus gets no byte at all).
  The client resumes a cut download with Range requests, up to 5 times, 1 s apart: with N = 1 the download
  recovers (one resume); with N >= 6 ``hf_hub_download`` raises ``httpx2.RemoteProtocolError`` after ~5 s and
  leaves no complete file (nor partial temp file) in the cache.

``server.requests`` records ``(method, path, status)`` of every request (query string included, no headers).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

__all__ = ["HubServer", "RequestRecord", "hub_server"]

DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

_REPO_TYPES_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Path segments that follow a repo id in `/api/{type}s/{repo_id}/...` routes.
_API_SUBROUTES = {
    "revision", "tree", "preupload", "commit", "refs", "branch", "tag", "paths-info", "commits", "settings",
    "xet-write-token", "xet-read-token", "lfs-files", "discussions", "resolve", "treesize", "compare",
}
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_PREFIX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_CHUNK = 1 << 20


def _now_iso() -> str:
    """Current UTC time in the Hub's date format (``2024-01-31T12:00:00.000Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """Git blob sha1 of ``data`` (what the Hub uses as the oid / ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the git-lfs pointer file of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class RequestRecord(NamedTuple):
    """One handled request: method, raw path (with query string) and response status."""

    method: str
    path: str
    status: int


@dataclass(frozen=True)
class _FileEntry:
    """A file in a commit's tree."""

    sha256: str  # content hash; names the blob in the content store
    size: int
    git_oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (LFS)
    lfs: bool
    pointer_size: int | None = None


@dataclass
class _Commit:
    """A commit: a full snapshot of the repo tree."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _FileEntry]


@dataclass
class _Repo:
    """A repository with its commits and refs."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid ("refs/pr/N" for PRs)
    tags: dict[str, str] = field(default_factory=dict)
    next_pr: int = 1


class _HttpError(Exception):
    """Raised by route handlers to answer with an error status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra_body = dict(extra_body or {})


def _header_safe(value: str) -> str:
    """Make a header value latin-1 encodable and single-line (paths may be non-ASCII)."""
    return value.replace("\r", " ").replace("\n", " ").encode("ascii", "backslashreplace").decode("ascii")


def _repo_not_found(repo_id: str) -> _HttpError:
    return _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")


@contextmanager
def _as_lookup_error() -> Iterator[None]:
    """Turn HTTP-level errors of the direct (non-HTTP) helpers into `LookupError`."""
    try:
        yield
    except _HttpError as err:
        raise LookupError(err.message) from None


class HubServer:
    """In-process Hub-protocol server storing repos under ``storage_dir``.

    Use as ``server = HubServer(tmp_dir).start()`` ... ``server.stop()`` or as a context manager. Attributes:
    ``endpoint`` (``http://127.0.0.1:<port>``), ``token`` (a token to pass to the client; any token is
    accepted), ``username`` (namespace for repo ids given without one), the fault-injection counters
    ``fail_next_commits``, ``fail_next_lfs_uploads``, ``fail_next_downloads``, ``truncate_next_downloads``,
    the knobs ``lfs_threshold`` (bytes; files this large or larger go through LFS), ``tree_page_size``,
    ``initial_gitattributes`` (new repos start with the Hub's default ``.gitattributes`` commit), and the
    request log ``requests``.
    """

    def __init__(self, storage_dir: str | Path | None = None, *, username: str = "test-user", token: str | None = None):
        self._own_dir = storage_dir is None
        self.storage_dir = Path(storage_dir) if storage_dir is not None else Path(tempfile.mkdtemp(prefix="hub-server-"))
        self.username = username
        self.token = token or "hf_test_" + secrets.token_hex(12)
        self.lfs_threshold = 10 * 1024 * 1024
        self.tree_page_size = 1000
        self.initial_gitattributes = True
        self.fail_next_commits = 0
        self.fail_next_lfs_uploads = 0
        self.fail_next_downloads = 0
        self.truncate_next_downloads = 0
        self.requests: list[RequestRecord] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        (self.storage_dir / "blobs").mkdir(parents=True, exist_ok=True)
        (self.storage_dir / "tmp").mkdir(parents=True, exist_ok=True)
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        self.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and remove a self-created storage dir."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_dir:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo directly (no HTTP); returns its full id. Raises ValueError if it exists."""
        namespace, _, name = repo_id.rpartition("/")
        try:
            return self._create_repo(name, namespace or None, repo_type, private).repo_id
        except _HttpError as err:
            raise ValueError(err.message) from None

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        delete: Iterable[str] = (),
        message: str = "Seed commit",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (path -> bytes) directly (no HTTP), LFS-or-not as preupload would decide; returns the oid."""
        with self._lock, _as_lookup_error():
            repo = self._get_repo(repo_type, repo_id)
            head = repo.branches.get(branch)
            if head is None:
                raise ValueError(f"No branch {branch!r} in {repo_id}")
            tree = dict(repo.commits[head].files)
            gitattributes = self._gitattributes(tree)
            for path in delete:
                tree.pop(path, None)
            for path, data in files.items():
                lfs = self._should_use_lfs(path, len(data), data[:512], gitattributes)
                tree[path] = self._store_bytes(data, lfs=lfs)
            return self._new_commit(repo, branch, head, tree, message, "").oid

    def head(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit oid a revision (branch, tag or sha) of a repo points to."""
        with self._lock, _as_lookup_error():
            return self._resolve_rev(self._get_repo(repo_type, repo_id), revision)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        """Content of a file at a revision, read from the store."""
        with self._lock, _as_lookup_error():
            repo = self._get_repo(repo_type, repo_id)
            entry = repo.commits[self._resolve_rev(repo, revision)].files[path]
        return self._blob_path(entry.sha256).read_bytes()

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Sorted file paths at a revision."""
        with self._lock, _as_lookup_error():
            repo = self._get_repo(repo_type, repo_id)
            return sorted(repo.commits[self._resolve_rev(repo, revision)].files)

    def repo_ids(self) -> list[str]:
        """All stored repo ids."""
        with self._lock:
            return sorted(repo_id for (_, repo_id) in self._repos)

    def reset_faults(self) -> None:
        """Set every fault-injection counter back to 0."""
        self.fail_next_commits = self.fail_next_lfs_uploads = 0
        self.fail_next_downloads = self.truncate_next_downloads = 0

    # ------------------------------------------------------------------ internals: faults / storage

    def _take_fault(self, name: str) -> bool:
        """Consume one unit of the fault counter ``name``; True if the fault must be injected."""
        with self._lock:
            count = int(getattr(self, name))
            if count > 0:
                setattr(self, name, count - 1)
                return True
            return False

    def _blob_path(self, sha256: str) -> Path:
        return self.storage_dir / "blobs" / sha256

    def _has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self._blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _store_bytes(self, data: bytes, *, lfs: bool) -> _FileEntry:
        """Put ``data`` in the content store and build its tree entry."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self._has_blob(sha256, len(data)):
            tmp = self.storage_dir / "tmp" / f"{sha256}.{secrets.token_hex(4)}"
            tmp.write_bytes(data)
            os.replace(tmp, self._blob_path(sha256))
        return self._entry_for(sha256, len(data), lfs=lfs, data=None if lfs else data)

    def _entry_for(self, sha256: str, size: int, *, lfs: bool, data: bytes | None = None) -> _FileEntry:
        if lfs:
            pointer = _lfs_pointer(sha256, size)
            return _FileEntry(sha256, size, _git_blob_oid(pointer), True, len(pointer))
        if data is None:
            data = self._blob_path(sha256).read_bytes()
        return _FileEntry(sha256, size, _git_blob_oid(data), False, None)

    def _gitattributes(self, tree: Mapping[str, _FileEntry]) -> str:
        entry = tree.get(".gitattributes")
        if entry is None:
            return ""
        return self._blob_path(entry.sha256).read_bytes().decode("utf-8", errors="replace")

    def _should_use_lfs(self, path: str, size: int, sample: bytes, gitattributes: str) -> bool:
        """Hub rule: big files, binary files and files matched by an LFS rule of ``.gitattributes`` go to LFS."""
        if size == 0:
            return False
        if size >= self.lfs_threshold or b"\0" in sample:
            return True
        basename = path.rsplit("/", 1)[-1]
        for line in gitattributes.splitlines():
            parts = line.split()
            if len(parts) < 2 or line.lstrip().startswith("#") or "filter=lfs" not in parts[1:]:
                continue
            pattern = parts[0]
            target = path if "/" in pattern else basename
            if fnmatch.fnmatchcase(target, pattern.replace("**/", "*")):
                return True
        return False

    # ------------------------------------------------------------------ internals: repos / revisions

    def _url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str, *, authorized: bool = True) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise _repo_not_found(repo_id)
        return repo

    def _create_repo(self, name: str, organization: str | None, repo_type: str, private: bool) -> _Repo:
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        namespace = organization or self.username
        if not _REPO_NAME_RE.match(name or "") or not _REPO_NAME_RE.match(namespace) or "--" in name or ".." in name:
            raise _HttpError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                existing = self._repos[(repo_type, repo_id)]
                raise _HttpError(409, f"You already created this {repo_type} repo", extra_body={"url": self._url(existing)})
            now = _now_iso()
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now)
            self._repos[(repo_type, repo_id)] = repo
            tree: dict[str, _FileEntry] = {}
            if self.initial_gitattributes:
                tree[".gitattributes"] = self._store_bytes(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
            self._new_commit(repo, "main", None, tree, "initial commit", "")
            return repo

    def _new_commit(
        self, repo: _Repo, branch: str, parent: str | None, tree: dict[str, _FileEntry], title: str, message: str
    ) -> _Commit:
        """Record a commit on ``branch`` (caller holds the lock)."""
        self._commit_counter += 1
        seed = json.dumps(
            [repo.repo_id, parent, sorted((p, e.git_oid) for p, e in tree.items()), title, time.time_ns(),
             self._commit_counter]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(oid=oid, parent=parent, title=title, message=message, date=_now_iso(), files=tree)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _resolve_rev(self, repo: _Repo, revision: str) -> str:
        """Commit oid of a branch / tag / full or abbreviated (>= 7 hex) commit sha."""
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in repo.branches:
            return repo.branches[rev]
        tag = rev[len("refs/tags/"):] if rev.startswith("refs/tags/") else rev
        if tag in repo.tags:
            return repo.tags[tag]
        if rev in repo.commits:
            return rev
        if _COMMIT_PREFIX_RE.match(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history(self, repo: _Repo, oid: str) -> list[_Commit]:
        """First-parent history, newest first."""
        out: list[_Commit] = []
        cur: str | None = oid
        while cur is not None:
            commit = repo.commits[cur]
            out.append(commit)
            cur = commit.parent
        return out

    # ------------------------------------------------------------------ internals: JSON shapes

    def _repo_info_json(self, repo: _Repo, oid: str, *, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling["size"] = entry.size
                sibling["blobId"] = entry.git_oid
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
        return info

    def _last_commit(self, repo: _Repo, history: list[_Commit], path: str, is_dir: bool) -> dict[str, str]:
        """``lastCommit`` of a path: newest commit in ``history`` that changed it."""

        def state(commit: _Commit) -> Any:
            if not is_dir:
                entry = commit.files.get(path)
                return entry.git_oid if entry else None
            prefix = path + "/"
            return sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(prefix))

        chosen = history[-1]
        for i, commit in enumerate(history):
            if i + 1 == len(history) or state(commit) != state(history[i + 1]):
                chosen = commit
                break
        return {"id": chosen.oid, "title": chosen.title, "date": chosen.date}

    def _file_json(self, path: str, entry: _FileEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return out

    def _dir_json(self, files: Mapping[str, _FileEntry], path: str) -> dict[str, Any]:
        prefix = path + "/"
        listing = sorted((p, e.git_oid) for p, e in files.items() if p.startswith(prefix))
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(), "size": 0,
                "path": path}

    def _expand(self, repo: _Repo, history: list[_Commit], item: dict[str, Any]) -> dict[str, Any]:
        item["lastCommit"] = self._last_commit(repo, history, item["path"], item["type"] == "directory")
        if item["type"] == "file":
            item["securityFileStatus"] = {
                "status": "safe", "avScan": {"virusFound": False, "virusNames": None}, "pickleImportScan": None
            }
        return item

    def _tree_items(self, files: Mapping[str, _FileEntry], base: str, recursive: bool) -> list[dict[str, Any]]:
        """Entries of a tree listing under ``base`` ('' = root); raises EntryNotFound for an unknown path."""
        base = base.strip("/")
        if base and base in files:
            return [self._file_json(base, files[base])]
        prefix = base + "/" if base else ""
        file_items: dict[str, dict[str, Any]] = {}
        dirs: set[str] = set()
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            if recursive:
                file_items[path] = self._file_json(path, entry)
                for i in range(1, len(parts)):
                    dirs.add(prefix + "/".join(parts[:i]))
            elif len(parts) == 1:
                file_items[path] = self._file_json(path, entry)
            else:
                dirs.add(prefix + parts[0])
        if base and not file_items and not dirs:
            raise _HttpError(404, f"Entry not found: {base}", "EntryNotFound")
        items = [self._dir_json(files, d) for d in dirs] + list(file_items.values())
        return sorted(items, key=lambda item: item["path"])


class _HTTPServer(ThreadingHTTPServer):
    """Threading HTTP server that remembers its open connections (to close them on stop)."""

    daemon_threads = True
    block_on_close = False
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the hub logic."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "hub-server-test/1.0"

    # -------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence the default stderr access log (and never log headers / tokens)."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        self._method = method
        self._status = 0
        self._body_done = False
        try:
            try:
                self._route(method)
            except _HttpError as err:
                self._drain_body()
                self._send_error(err)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as err:  # pragma: no cover - surfaced to the client as a 500
                self._drain_body()
                self._send_error(_HttpError(500, f"hub test server error: {type(err).__name__}: {err}"))
        finally:
            with self.hub._lock:
                self.hub.requests.append(RequestRecord(method, self.path, self._status))

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    @property
    def _authorized(self) -> bool:
        return bool(self.headers.get("Authorization"))

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked), once."""
        if self._body_done:
            return
        self._body_done = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionResetError("client closed during chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise ConnectionResetError("client closed during chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    raise ConnectionResetError("client closed during body")
                remaining -= len(chunk)
                yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain_body(self) -> None:
        try:
            for _ in self._iter_body():
                pass
        except (OSError, ValueError):
            self.close_connection = True

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise _HttpError(400, f"Invalid JSON body: {err}") from None

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, _header_safe(value))
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        self._send_bytes(status, json.dumps(obj).encode(), content_type, headers)

    def _send_error(self, err: _HttpError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.code:
            headers["X-Error-Code"] = err.code
        body = {"error": err.message, **err.extra_body}
        self._send_json(body, err.status, headers)

    # -------------------------------------------------------------- routing

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        raw = [s for s in parts.path.split("/")[1:]]
        while raw and raw[-1] == "":
            raw.pop()
        segs = [unquote(s) for s in raw]
        self._query = parse_qs(parts.query, keep_blank_values=True)
        self._raw_path = parts.path

        if segs[:1] == ["api"]:
            return self._route_api(method, segs[1:])
        if segs[:2] == ["__lfs", "upload"] and len(segs) == 3 and method == "PUT":
            return self._lfs_upload(segs[2])
        if segs == ["__lfs", "verify"] and method == "POST":
            return self._lfs_verify()

        repo_type, rest = "model", segs
        if segs and segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type, rest = _REPO_TYPES_PLURAL[segs[0]], segs[1:]
        if len(rest) >= 5 and rest[-4:] == ["info", "lfs", "objects", "batch"] and rest[-5].endswith(".git"):
            if method != "POST":
                raise _HttpError(405, "Method not allowed")
            repo_id = "/".join(rest[:-5] + [rest[-5][: -len(".git")]])
            return self._lfs_batch(repo_type, repo_id)
        for idx in (1, 2):
            if len(rest) > idx + 1 and rest[idx] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, repo_type, "/".join(rest[:idx]), rest[idx + 1], "/".join(rest[idx + 2:]))
        raise _HttpError(501, f"Route not implemented by the hub test server: {method} {parts.path}")

    def _route_api(self, method: str, segs: list[str]) -> None:
        hub = self.hub
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["validate-yaml"] and method == "POST":
            self._drain_body()
            return self._send_json({"errors": [], "warnings": []})
        if segs == ["agent-harnesses"] and method == "GET":
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["repos", "create"] and method == "POST":
            body = self._json_body()
            private = bool(body.get("private")) or body.get("visibility") == "private"
            repo = hub._create_repo(body.get("name", ""), body.get("organization"), body.get("type") or "model", private)
            return self._send_json({"url": hub._url(repo), "name": repo.repo_id, "id": repo.repo_id})
        if segs == ["repos", "delete"] and method == "DELETE":
            body = self._json_body()
            repo_id = f"{body.get('organization') or hub.username}/{body.get('name', '')}"
            with hub._lock:
                if hub._repos.pop((body.get("type") or "model", repo_id), None) is None:
                    raise _repo_not_found(repo_id)
            return self._send_json({})
        if segs == ["repos", "move"] and method == "POST":
            body = self._json_body()
            repo_type = body.get("type") or "model"
            with hub._lock:
                repo = hub._get_repo(repo_type, body.get("fromRepo", ""))
                to_id = body.get("toRepo", "")
                if (repo_type, to_id) in hub._repos:
                    raise _HttpError(409, f"Repository {to_id} already exists")
                del hub._repos[(repo_type, repo.repo_id)]
                repo.repo_id = to_id
                hub._repos[(repo_type, to_id)] = repo
            return self._send_json({})
        if len(segs) >= 2 and segs[0] in _REPO_TYPES_PLURAL:
            repo_type, rest = _REPO_TYPES_PLURAL[segs[0]], segs[1:]
            if len(rest) >= 2 and rest[1] not in _API_SUBROUTES:
                repo_id, sub = f"{rest[0]}/{rest[1]}", rest[2:]
            else:
                repo_id, sub = rest[0], rest[1:]
            return self._route_repo(method, repo_type, repo_id, sub)
        raise _HttpError(501, f"Route not implemented by the hub test server: {method} /api/{'/'.join(segs)}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, sub: list[str]) -> None:
        hub = self.hub
        action = sub[0] if sub else ""
        if action in ("xet-write-token", "xet-read-token"):
            self._drain_body()
            raise _HttpError(501, "Xet is not supported by the hub test server; set HF_HUB_DISABLE_XET=1")
        if method == "GET" and not sub:
            return self._info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and len(sub) >= 2:
            return self._info(repo_type, repo_id, "/".join(sub[1:]))
        if method == "GET" and action == "tree" and len(sub) >= 2:
            return self._tree(repo_type, repo_id, sub[1], "/".join(sub[2:]))
        if method == "POST" and action == "paths-info" and len(sub) == 2:
            return self._paths_info(repo_type, repo_id, sub[1])
        if method == "GET" and action == "commits" and len(sub) >= 2:
            return self._commits(repo_type, repo_id, "/".join(sub[1:]))
        if method == "GET" and action == "refs" and len(sub) == 1:
            return self._refs(repo_type, repo_id)
        if method == "POST" and action == "preupload" and len(sub) == 2:
            return self._preupload(repo_type, repo_id, sub[1])
        if method == "POST" and action == "commit" and len(sub) == 2:
            return self._commit(repo_type, repo_id, sub[1])
        if action == "branch" and len(sub) == 2 and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, sub[1])
        if action == "tag" and len(sub) == 2 and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, sub[1])
        if method == "PUT" and action == "settings" and len(sub) == 1:
            body = self._json_body()
            with hub._lock:
                repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
                if "private" in body and body["private"] is not None:
                    repo.private = bool(body["private"])
                if body.get("visibility") in ("private", "public"):
                    repo.private = body["visibility"] == "private"
            return self._send_json({})
        raise _HttpError(501, f"Route not implemented by the hub test server: {method} {self._raw_path}")

    # -------------------------------------------------------------- read routes

    def _whoami(self) -> None:
        if not self._authorized:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        hub = self.hub
        self._send_json({
            "type": "user",
            "id": hashlib.md5(hub.username.encode()).hexdigest()[:24],
            "name": hub.username,
            "fullname": "Hub Test User",
            "email": f"{hub.username}@example.invalid",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub-test", "role": "write",
                                                             "createdAt": _now_iso()}},
        })

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        blobs = self._query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            oid = hub._resolve_rev(repo, revision)
            info = hub._repo_info_json(repo, oid, blobs=blobs)
        self._send_json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        recursive = self._query.get("recursive", ["false"])[-1].lower() in ("1", "true")
        expand = self._query.get("expand", ["false"])[-1].lower() in ("1", "true")
        cursor = int(self._query.get("cursor", ["0"])[-1] or 0)
        default_limit = min(hub.tree_page_size, 50) if expand else hub.tree_page_size
        limit = max(1, min(int(self._query.get("limit", [default_limit])[-1]), default_limit))
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            oid = hub._resolve_rev(repo, revision)
            files = repo.commits[oid].files
            items = hub._tree_items(files, path, recursive)
            page = items[cursor: cursor + limit]
            if expand:
                history = hub._history(repo, oid)
                page = [hub._expand(repo, history, dict(item)) for item in page]
        headers = {}
        if cursor + limit < len(items):
            query = {k: v[-1] for k, v in self._query.items()}
            query["cursor"] = str(cursor + limit)
            headers["Link"] = f'<{hub.endpoint}{self._raw_path}?{urlencode(query)}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        raw = self._read_body().decode()
        if "json" in self.headers.get("Content-Type", ""):
            body = json.loads(raw or "{}")
            paths, expand = list(body.get("paths", [])), bool(body.get("expand"))
        else:
            form = parse_qs(raw, keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            oid = hub._resolve_rev(repo, revision)
            files = repo.commits[oid].files
            history = hub._history(repo, oid) if expand else []
            out = []
            for path in paths:
                path = path.strip("/")
                if path in files:
                    item = hub._file_json(path, files[path])
                elif any(p.startswith(path + "/") for p in files):
                    item = hub._dir_json(files, path)
                else:
                    continue
                out.append(hub._expand(repo, history, item) if expand else item)
        self._send_json(out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            history = hub._history(repo, hub._resolve_rev(repo, revision))
            out = [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": hub.username, "avatar": ""}]}
                for c in history
            ]
        self._send_json(out)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items()) if not name.startswith("refs/pr/")
            ]
            prs = [
                {"name": name, "ref": name, "targetCommit": oid}
                for name, oid in sorted(repo.branches.items()) if name.startswith("refs/pr/")
            ]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": oid} for n, oid in sorted(repo.tags.items())]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if self._query.get("include_prs"):
            body["pullRequests"] = prs
        self._send_json(body)

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """HEAD/GET a file: metadata headers, full body or a byte range, with fault injection on GET."""
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            oid = hub._resolve_rev(repo, revision)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}";',
        }
        if entry.lfs:
            headers["ETag"] = f'"{entry.sha256}"'
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        size = entry.size
        if method == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return

        if hub._take_fault("fail_next_downloads"):
            raise _HttpError(500, "Injected download failure (fail_next_downloads)")
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and size > 0:
            match = _RANGE_RE.match(range_header)
            if match is None or (not match.group(1) and not match.group(2)):
                raise _HttpError(416, f"Invalid range: {range_header}", headers={"Content-Range": f"bytes */{size}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start, end = max(size - int(last), 0), size - 1
            if start >= size or start > end:
                raise _HttpError(416, f"Range not satisfiable: {range_header}",
                                 headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        send_until = end + 1
        truncated = size > 0 and hub._take_fault("truncate_next_downloads")
        if truncated:
            send_until = min(end + 1, max(start, size // 2))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        with open(hub._blob_path(entry.sha256), "rb") as f:
            f.seek(start)
            remaining = send_until - start
            while remaining > 0:
                chunk = f.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
        if truncated:
            self.wfile.flush()
            self.close_connection = True

    # -------------------------------------------------------------- write routes

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        body = self._json_body()
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            oid = hub._resolve_rev(repo, revision)
            files = repo.commits[oid].files
            gitattributes = hub._gitattributes(files)
        out = []
        for item in body.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            lfs = hub._should_use_lfs(path, int(item.get("size", 0)), sample, gitattributes)
            existing = files.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing.sha256 if existing.lfs else existing.git_oid
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote_oid})
        self._send_json({"files": out, "commitOid": oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        raw = self._read_body()
        if hub._take_fault("fail_next_commits"):
            raise _HttpError(500, "Injected commit failure (fail_next_commits)")
        header: dict[str, Any] = {}
        ops: list[tuple[str, dict[str, Any]]] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise _HttpError(400, f"Invalid ndjson line: {err}") from None
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                ops.append((key, value))
            else:
                raise _HttpError(400, f"Unknown commit operation: {key!r}")
        if not header.get("summary"):
            raise _HttpError(400, "Commit summary is required")
        create_pr = self._query.get("create_pr", ["0"])[-1] in ("1", "true", "True")

        # Materialize regular file contents before taking the lock (the blob store is content-addressed).
        staged: list[tuple[str, str, _FileEntry | None]] = []
        for key, value in ops:
            path = str(value.get("path", "")).strip("/")
            if not path or path.startswith(".git/") or ".." in path.split("/"):
                raise _HttpError(400, f"Invalid path: {value.get('path')!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding: {value.get('encoding')}")
                data = base64.b64decode(value.get("content", ""))
                if len(data) >= hub.lfs_threshold or b"\0" in data[:8000]:
                    raise _HttpError(400, f"{path}: binary or large files must be uploaded with LFS")
                staged.append((key, path, hub._store_bytes(data, lfs=False)))
            elif key == "lfsFile":
                sha256 = str(value.get("oid", ""))
                size = value.get("size")
                if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(sha256):
                    raise _HttpError(400, f"{path}: invalid LFS oid {sha256!r}")
                if not hub._has_blob(sha256, size):
                    raise _HttpError(422, f"{path}: LFS object {sha256} was not uploaded (or has another size)")
                size = hub._blob_path(sha256).stat().st_size
                staged.append((key, path, hub._entry_for(sha256, size, lfs=True)))
            else:
                staged.append((key, path, None))

        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            if revision not in repo.branches and not revision.startswith("refs/heads/"):
                hub._resolve_rev(repo, revision)  # RevisionNotFound for unknown revisions
                raise _HttpError(400, f"Invalid rev id: {revision} is not a branch")
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            if branch not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.startswith(parent_commit):
                raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].files)
            for key, path, entry in staged:
                if key in ("file", "lfsFile"):
                    assert entry is not None
                    tree[path] = entry
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    doomed = [p for p in tree if p.startswith(path + "/")]
                    if not doomed:
                        raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
            pr_url = None
            if create_pr:
                num = repo.next_pr
                repo.next_pr += 1
                branch = f"refs/pr/{num}"
                pr_url = f"{hub._url(repo)}/discussions/{num}"
            commit = hub._new_commit(repo, branch, head, tree, header["summary"], header.get("description") or "")
            commit_url = f"{hub._url(repo)}/commit/{commit.oid}"
        self._send_json({"success": True, "commitOid": commit.oid, "commitUrl": commit_url,
                         "pullRequestUrl": pr_url, "hookOutput": ""})

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.hub
        body = self._json_body() if method == "POST" else (self._drain_body() or {})
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            if method == "DELETE":
                if branch not in repo.branches:
                    raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise _HttpError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json({})
            if branch.startswith("refs/") or not branch or " " in branch:
                raise _HttpError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            if body.get("emptyBranch"):
                hub._new_commit(repo, branch, None, {}, "initial commit", "")
            else:
                repo.branches[branch] = hub._resolve_rev(repo, body.get("startingPoint") or "main")
        self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, name: str) -> None:
        hub = self.hub
        body = self._json_body() if method == "POST" else (self._drain_body() or {})
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authorized=self._authorized)
            if method == "DELETE":
                if repo.tags.pop(name, None) is None:
                    raise _HttpError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                return self._send_json({})
            tag = str(body.get("tag", ""))
            if not tag:
                raise _HttpError(400, "Missing tag name")
            if tag in repo.tags:
                raise _HttpError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = hub._resolve_rev(repo, name)
        self._send_json({})

    # -------------------------------------------------------------- LFS

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        body = self._json_body()
        with hub._lock:
            hub._get_repo(repo_type, repo_id, authorized=self._authorized)
        if body.get("operation") != "upload":
            raise _HttpError(400, "The hub test server only supports the LFS 'upload' operation")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else -1,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif hub._has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions => client skips the upload
            else:
                objects.append({
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{hub.endpoint}/__lfs/upload/{oid}?size={size}"},
                        "verify": {"href": f"{hub.endpoint}/__lfs/verify"},
                    },
                })
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str) -> None:
        """PUT target of the basic transfer: stream to disk, check sha256 and size, then store."""
        hub = self.hub
        if not _SHA256_RE.match(oid):
            raise _HttpError(400, f"Invalid oid: {oid}")
        if hub._take_fault("fail_next_lfs_uploads"):
            self._drain_body()
            raise _HttpError(500, "Injected LFS upload failure (fail_next_lfs_uploads)")
        expected_size = self._query.get("size", [None])[-1]
        digest = hashlib.sha256()
        size = 0
        tmp = hub.storage_dir / "tmp" / f"{oid}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if digest.hexdigest() != oid:
                raise _HttpError(400, f"sha256 mismatch: expected {oid}, got {digest.hexdigest()}")
            if expected_size is not None and int(expected_size) != size:
                raise _HttpError(400, f"size mismatch: expected {expected_size}, got {size}")
            os.replace(tmp, hub._blob_path(oid))
        finally:
            tmp.unlink(missing_ok=True)
        self._send_bytes(200, b"", "text/plain", {"ETag": f'"{oid}"'})

    def _lfs_verify(self) -> None:
        body = self._json_body()
        if not self.hub._has_blob(str(body.get("oid", "")), body.get("size")):
            raise _HttpError(404, f"LFS object not found: {body.get('oid')}")
        self._send_json({"success": True})


def _patch_client(monkeypatch: pytest.MonkeyPatch, server: HubServer, home: Path) -> None:
    """Point the already-imported `huggingface_hub` (and env vars, for subprocesses) at ``server``."""
    import sys

    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http, close_session

    hub_cache = home / "hub"
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE",
                "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)

    url_template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": url_template,
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Module-level `HfApi()` behind `huggingface_hub.create_repo` & co. captured the endpoint at import time.
    monkeypatch.setattr(hf_api_module.api, "endpoint", server.endpoint)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(server.endpoint)})
    for module_name, attrs in {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(hub_cache)},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": str(home / "assets")},
        "datasets.config": {
            "HF_ENDPOINT": server.endpoint,
            "HUB_DATASETS_URL": server.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        },
    }.items():
        module = sys.modules.get(module_name)
        if module is not None:
            for attr, value in attrs.items():
                if hasattr(module, attr):
                    monkeypatch.setattr(module, attr, value)
    # Drop pooled connections from a previous server (the port may be reused) and again on teardown.
    close_session()


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """Start a `HubServer` and point the real `huggingface_hub` client at it.

    Sets (and monkeypatches the import-time copies of) ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` (under
    ``tmp_path``), ``HF_TOKEN`` (= ``server.token``) and ``HF_HUB_DISABLE_XET=1``; env vars are inherited by
    subprocesses. Yields the server (``.endpoint``, ``.token``, fault counters; see module docstring).
    """
    server = HubServer(tmp_path / "hub_server_storage").start()
    try:
        _patch_client(monkeypatch, server, tmp_path / "hf_home")
        yield server
    finally:
        server.stop()
        from huggingface_hub.utils import close_session

        close_session()
