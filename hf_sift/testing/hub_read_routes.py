"""The routes of the local Hub that read repos: repo info, listings, refs, history and downloads."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from ..errors import LocalHubHTTPError
from .hub_store import Commit, Repo, git_sha1


if TYPE_CHECKING:
    from .hub_server import HubServer


class HubReadRoutes:
    """Read-only routes (a mixin of `HubRequestHandler`)."""

    hub: HubServer
    query: dict[str, list[str]]
    path: str
    command: str
    headers: Any

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

    # --- listings -------------------------------------------------------------------------------------------------

    def _entries(self, commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{folder}/" if folder else ""
        files = {p: e for p, e in commit.tree.items() if p.startswith(prefix)}
        if folder and not files:
            raise LocalHubHTTPError(404, f"{folder} does not exist at {commit.id}", "EntryNotFound", commit=commit.id)
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
            heads = {n: c for n, c in repo.branches.items() if not n.startswith("refs/pr/")}
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in heads.items()]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()]
            include_prs = self.query.get("include_prs", ["0"])[0] not in ("0", "false", "")
            prs = [{"name": n, "ref": n, "targetCommit": c} for n, c in repo.branches.items() if n not in heads]
        answer = {"branches": branches, "converts": [], "tags": tags, "pullRequests": prs if include_prs else []}
        self._send(200, answer)

    def commits(self, key: tuple[str, str], revision: str) -> None:
        with self.hub.store.lock:
            history = self._repo(key).history(revision)
        items = [
            {"id": c.id, "authors": [{"user": "local"}], "date": c.date, "title": c.title, "message": c.message}
            for c in history
        ]
        self._paged(items)

    # --- downloads ------------------------------------------------------------------------------------------------

    def resolve(self, key: tuple[str, str], revision: str, path: str) -> None:
        with self.hub.store.lock:
            commit = self._repo(key).resolve(revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise LocalHubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.id)
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
            raise LocalHubHTTPError(500, f"blob of {path} is corrupted")
        self._send(200, data, {**headers, "ETag": f'"{entry.oid}"'})

    def lfs_download(self, sha256: str) -> None:
        if not self.hub.store.blobs.has(sha256):
            raise LocalHubHTTPError(404, "no such object")
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
