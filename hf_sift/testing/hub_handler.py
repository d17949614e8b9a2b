"""The HTTP routes of the local Hub, answering as the Hub does for the calls `huggingface_hub` makes.

Every route is named (`commit`, `lfs_upload`, `resolve`, ...): the request log records the name, and faults are
injected by name. See docs/hub_server.md for the list.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .hub_store import Commit, FileEntry, HubError, Repo, git_sha1, should_use_lfs


if TYPE_CHECKING:
    from .hub_server import HubServer

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_CHUNK = 1 << 20


class HubRequestHandler(BaseHTTPRequestHandler):
    """One request to the local Hub (or to its LFS storage host, when `self.server.is_storage`)."""

    protocol_version = "HTTP/1.1"
    server_version = "hf_sift-local-hub"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # the request log replaces stderr lines
        pass

    # --- plumbing -------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.hub = self.server.hub  # type: ignore[attr-defined]
        # One handler serves every request of a kept-alive connection: reset the per-request state.
        self._cached_body: bytes | None = None
        self._status: int | None = None
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        route, handler, args = self._route(segments)
        record = self.hub._log(self.command, unquote(url.path), route)
        fault = self.hub._take_fault(route, record.path)
        try:
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "drop":
                self._drop()
                return
            if handler is None:
                raise HubError(404, f"no route for {self.command} {url.path}")
            handler(*args)
        except HubError as error:
            self._error(error)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as error:  # an unexpected failure answers 500 rather than hanging the client
            self._error(HubError(500, f"{type(error).__name__}: {error}"))
        record.status = self._status

    def _route(self, s: list[str]) -> tuple[str, Any, tuple]:
        method = self.command
        if getattr(self.server, "is_storage", False):
            return "lfs_download", self.lfs_download if method in ("GET", "HEAD") else None, tuple(s[:1])
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return "create_repo", self.create_repo, ()
        if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return "delete_repo", self.delete_repo, ()
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate_yaml", self.validate_yaml, ()
        if s[:1] == ["lfs-upload"] and len(s) == 2 and method == "PUT":
            return "lfs_upload", self.lfs_upload, (s[1],)
        if len(s) >= 4 and s[0] == "api" and s[1] in _API_TYPES:
            repo_key = (_API_TYPES[s[1]], f"{s[2]}/{s[3]}")
            rest = s[4:]
            action = rest[0] if rest else ""
            routes = {
                ("GET", ""): ("repo_info", self.repo_info, (repo_key, None)),
                ("GET", "revision"): ("repo_info", self.repo_info, (repo_key, "/".join(rest[1:]))),
                ("POST", "preupload"): ("preupload", self.preupload, (repo_key, "/".join(rest[1:]))),
                ("POST", "commit"): ("commit", self.commit, (repo_key, "/".join(rest[1:]))),
                ("GET", "tree"): ("tree", self.tree, (repo_key, rest[1] if len(rest) > 1 else "", "/".join(rest[2:]))),
                ("POST", "paths-info"): ("paths_info", self.paths_info, (repo_key, "/".join(rest[1:]))),
                ("GET", "refs"): ("refs", self.refs, (repo_key,)),
                ("GET", "commits"): ("commits", self.commits, (repo_key, "/".join(rest[1:]) or "main")),
                ("POST", "super-squash"): ("super_squash", self.super_squash, (repo_key, "/".join(rest[1:]))),
                ("POST", "tag"): ("tag", self.create_tag, (repo_key, "/".join(rest[1:]))),
                ("DELETE", "tag"): ("tag", self.delete_ref, (repo_key, "tags", "/".join(rest[1:]))),
                ("POST", "branch"): ("branch", self.create_branch, (repo_key, "/".join(rest[1:]))),
                ("DELETE", "branch"): ("branch", self.delete_ref, (repo_key, "branches", "/".join(rest[1:]))),
            }
            return routes.get((method, action), ("unknown", None, ()))
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(s[0] if s else "", "model")
        s = s[1:] if repo_type != "model" else s
        if len(s) >= 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_key = (repo_type, f"{s[0]}/{s[1][: -len('.git')]}")
            if s[5] == "batch":
                return "lfs_batch", self.lfs_batch, (repo_key,)
            if s[5] == "verify":
                return "lfs_verify", self.lfs_verify, (repo_key,)
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", self.resolve, ((repo_type, f"{s[0]}/{s[1]}"), s[3], "/".join(s[4:]))
        return "unknown", None, ()

    def _body_chunks(self, limit: int) -> Iterator[bytes]:
        """The request body, chunk by chunk (Content-Length or chunked transfer), refused above `limit` bytes."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, f"request body over {limit} bytes")
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        if remaining > limit:
            self.close_connection = True
            raise HubError(413, f"request body over {limit} bytes")
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed the connection")
            remaining -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        if self._cached_body is None:
            self._cached_body = b"".join(self._body_chunks(self.hub.max_request_bytes))
        return self._cached_body

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"invalid JSON body: {error}") from None

    def _drop(self) -> None:
        """Read part of the request (up to half its announced body), then close the connection without answering."""
        announced = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(min(announced // 2, _CHUNK)) if announced else self.rfile.read1(_CHUNK)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        self._status = status
        self.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.splitlines()[0][:200]}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        if error.status == 413:
            headers["Connection"] = "close"
        self._send(error.status, {"error": error.message, **error.extra}, headers)

    def _url(self, path: str) -> str:
        return f"{self.hub.endpoint}{path}"

    # --- repos ----------------------------------------------------------------------------------------------------

    def create_repo(self) -> None:
        body = self._json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization')}/{body.get('name')}"
        url = self._url(f"/{_URL_PREFIXES.get(repo_type, '')}{repo_id}")
        with self.hub.store.lock:
            if (repo_type, repo_id) in self.hub.store.repos:  # the Hub names the existing repo in its 409
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            self.hub.store.create(repo_type, repo_id, bool(body.get("private")))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        body = self._json()
        with self.hub.store.lock:
            self.hub.store.delete(body.get("type") or "model", f"{body.get('organization')}/{body.get('name')}")
        self._send(200, {})

    def validate_yaml(self) -> None:
        content = self._json().get("content", "")
        if content.startswith("---"):
            front, sep, _ = content[3:].partition("\n---")
            try:
                import yaml

                if not sep or not isinstance(yaml.safe_load(front) or {}, dict):
                    raise ValueError("metadata must be a YAML mapping between two '---' lines")
            except (ValueError, yaml.YAMLError) as error:
                self._send(400, {"errors": [{"message": str(error)}], "warnings": []})
                return
        self._send(200, {"errors": [], "warnings": []})

    def _repo(self, key: tuple[str, str]) -> Repo:
        return self.hub.store.get(*key)

    def repo_info(self, key: tuple[str, str], revision: str | None) -> None:
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        with self.hub.store.lock:
            repo = self._repo(key)
            commit = repo.resolve(revision or "main")
            siblings = []
            for path, entry in sorted(commit.tree.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry.size, blobId=entry.oid)
                    if entry.lfs:
                        sibling["lfs"] = {
                            "size": entry.size,
                            "sha256": entry.sha256,
                            "pointerSize": entry.pointer_size,
                        }
                siblings.append(sibling)
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.id,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "tags": [],
            "siblings": siblings,
        }
        self._send(200, info)

    # --- uploads --------------------------------------------------------------------------------------------------

    def preupload(self, key: tuple[str, str], revision: str) -> None:
        files = self._json().get("files", [])
        with self.hub.store.lock:
            tree = self._repo(key).resolve(revision).tree
        answer = []
        for item in files:
            path, size = item["path"], int(item["size"])
            lfs = should_use_lfs(path, size, base64.b64decode(item.get("sample", "")))
            entry = tree.get(path)
            oid = None if entry is None else entry.sha256 if lfs else entry.oid
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer})

    def lfs_batch(self, key: tuple[str, str]) -> None:
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "the local Hub's LFS batch API serves uploads only")
        prefix = _URL_PREFIXES[key[0]]
        with self.hub.store.lock:
            self._repo(key)
        objects = []
        for item in body.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not self.hub.store.blobs.has(oid, size):
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": self._url(f"/lfs-upload/{oid}?size={size}")},
                    "verify": {"href": self._url(f"/{prefix}{key[1]}.git/info/lfs/objects/verify")},
                }
            objects.append(answer)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, oid: str) -> None:
        size = int(self.query.get("size", ["-1"])[0])
        if size > self.hub.max_upload_bytes:
            self.close_connection = True
            raise HubError(413, f"LFS object over {self.hub.max_upload_bytes} bytes")
        self.hub.store.blobs.put_stream(oid, size, self._body_chunks(self.hub.max_upload_bytes))
        self._send(200, b"")

    def lfs_verify(self, key: tuple[str, str]) -> None:
        body = self._json()
        if not self.hub.store.blobs.has(str(body.get("oid")), int(body.get("size", -1))):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        self._send(200, {})

    def commit(self, key: tuple[str, str], branch: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "the local Hub does not support pull requests")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        store = self.hub.store
        # Blobs are stored before taking the lock: a commit only swaps the branch head under it.
        changes: list[tuple[str, str, FileEntry | None]] = []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                changes.append(("add", value["path"], store.file_entry(base64.b64decode(value["content"]), lfs=False)))
            elif line["key"] == "lfsFile":
                changes.append(("add", value["path"], store.lfs_entry(value["oid"], int(value["size"]))))
            elif line["key"] in ("deletedFile", "deletedFolder"):
                changes.append((line["key"], value["path"].rstrip("/"), None))
            else:
                raise HubError(400, f"unknown commit operation {line['key']!r}")
        with store.lock:
            repo = self._repo(key)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.tree)
            for kind, path, entry in changes:
                if kind == "add":
                    tree[path] = entry  # type: ignore[assignment]
                elif kind == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    inside = [p for p in tree if p.startswith(path + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del tree[p]
            commit = repo.new_commit([head.id], tree, header.get("summary", ""), header.get("description", ""))
            repo.branches[branch] = commit.id
            store.save()
        url = self._url(f"/{_URL_PREFIXES[key[0]]}{key[1]}/commit/{commit.id}")
        self._send(200, {"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": None})

    # --- listings -------------------------------------------------------------------------------------------------

    def _entries(self, commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{folder}/" if folder else ""
        files = {p: e for p, e in commit.tree.items() if p.startswith(prefix)}
        if folder and not files:
            raise HubError(404, f"{folder} does not exist at {commit.id}", "EntryNotFound", commit=commit.id)
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in files.items():
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                directory = prefix + "/".join(parts[:i])
                entries[directory] = {"type": "directory", "path": directory, "oid": _tree_oid(commit, directory)}
            if recursive or len(parts) == 1:
                entries[path] = entry.to_json(path)
        return [entries[p] for p in sorted(entries)]

    def _paged(self, items: list[Any]) -> None:
        start = int(self.query.get("cursor", ["0"])[0])
        size = self.hub.page_size
        headers = {}
        if start + size < len(items):
            query = {k: v[0] for k, v in self.query.items() if k != "cursor"}
            query["cursor"] = str(start + size)
            path = urlsplit(self.path).path
            link = self._url(path + "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items()))
            headers["Link"] = f'<{link}>; rel="next"'
        self._send(200, items[start : start + size], headers)

    def tree(self, key: tuple[str, str], revision: str, folder: str) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        with self.hub.store.lock:
            commit = self._repo(key).resolve(revision)
        self._paged(self._entries(commit, folder, recursive))

    def paths_info(self, key: tuple[str, str], revision: str) -> None:
        form = parse_qs(self._body().decode())
        with self.hub.store.lock:
            commit = self._repo(key).resolve(revision)
        answer = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.tree:
                answer.append(commit.tree[path].to_json(path))
            elif any(p.startswith(path + "/") for p in commit.tree):
                answer.append({"type": "directory", "path": path, "oid": _tree_oid(commit, path)})
        self._send(200, answer)

    def refs(self, key: tuple[str, str]) -> None:
        with self.hub.store.lock:
            repo = self._repo(key)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()]
        self._send(200, {"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def commits(self, key: tuple[str, str], revision: str) -> None:
        with self.hub.store.lock:
            history = self._repo(key).history(revision)
        items = [
            {"id": c.id, "authors": [{"user": "local"}], "date": c.date, "title": c.title, "message": c.message}
            for c in history
        ]
        self._paged(items)

    # --- refs -----------------------------------------------------------------------------------------------------

    def super_squash(self, key: tuple[str, str], branch: str) -> None:
        message = self._json().get("message") or f"Super-squash branch '{branch}'"
        with self.hub.store.lock:
            repo = self._repo(key)
            if branch not in repo.branches:
                if branch in repo.tags:
                    raise HubError(400, f"{branch} is a tag: only branches can be squashed")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            repo.branches[branch] = repo.new_commit([], dict(head.tree), message, "").id
            _drop_unreachable(repo)
            self.hub.store.save()
        self._send(200, {"success": True, "commitId": repo.branches[branch]})

    def create_tag(self, key: tuple[str, str], revision: str) -> None:
        tag = str(self._json().get("tag", ""))
        with self.hub.store.lock:
            repo = self._repo(key)
            commit = repo.resolve(revision)
            if not tag or tag in repo.tags:
                raise HubError(409 if tag else 400, f"Tag {tag!r} already exists" if tag else "missing tag name")
            repo.tags[tag] = commit.id
            self.hub.store.save()
        self._send(200, {})

    def create_branch(self, key: tuple[str, str], branch: str) -> None:
        start = self._json().get("startingPoint") or "main"
        with self.hub.store.lock:
            repo = self._repo(key)
            commit = repo.resolve(start)
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch!r} already exists")
            repo.branches[branch] = commit.id
            self.hub.store.save()
        self._send(200, {})

    def delete_ref(self, key: tuple[str, str], kind: str, name: str) -> None:
        self._body()
        with self.hub.store.lock:
            repo = self._repo(key)
            refs = getattr(repo, kind)
            if name not in refs:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if kind == "branches" and name == "main":
                raise HubError(403, "the main branch cannot be deleted")
            del refs[name]
            _drop_unreachable(repo)
            self.hub.store.save()
        self._send(200, {})

    # --- downloads ------------------------------------------------------------------------------------------------

    def resolve(self, key: tuple[str, str], revision: str, path: str) -> None:
        with self.hub.store.lock:
            commit = self._repo(key).resolve(revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.id)
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
        if entry.lfs:
            location = f"{self.hub.storage_endpoint}/{entry.sha256}?filename={quote(path.split('/')[-1])}"
            headers.update(
                {"Location": location, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
            )
            headers["ETag"] = f'"{entry.oid}"'
            self._send(302, None, headers)
            return
        data = self.hub.store.blobs.read(entry.sha256)
        if git_sha1(data) != entry.oid:
            raise HubError(500, f"blob of {path} is corrupted")
        self._send(200, data, {**headers, "ETag": f'"{entry.oid}"'})

    def lfs_download(self, sha256: str) -> None:
        if not self.hub.store.blobs.has(sha256):
            raise HubError(404, "no such object")
        data = self.hub.store.blobs.read(sha256)
        status, headers = 200, {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
        ranges = self.headers.get("Range", "")
        if ranges.startswith("bytes="):
            first, _, last = ranges[len("bytes=") :].partition("-")
            start, end = int(first or 0), int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


def _tree_oid(commit: Commit, folder: str) -> str:
    listing = sorted((p, e.oid) for p, e in commit.tree.items() if p.startswith(folder + "/"))
    return git_sha1(json.dumps(listing).encode())


def _drop_unreachable(repo: Repo) -> None:
    """Forget commits no branch or tag reaches any more (as the Hub's garbage collection would)."""
    reachable: set[str] = set()
    for ref in [*repo.branches, *repo.tags]:
        reachable.update(c.id for c in repo.history(ref))
    for commit_id in [c for c in repo.commits if c not in reachable]:
        del repo.commits[commit_id]
