"""The storage behind the local Hub: content-addressed blobs and per-repo git-like history.

Blobs are files named by their sha256 under `<root>/blobs/`. A repo is a set of commits (each with its parents and
its whole tree, `path -> file entry`), branches and tags pointing at commits. The repos' metadata is one JSON file,
`<root>/repos.json`, rewritten atomically after every change, so a server restarted on the same root finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import LocalHubHTTPError


REPO_TYPES = ("model", "dataset", "space")
# Files the Hub stores in LFS whatever their size (its default `.gitattributes` patterns), and the size above
# which any file goes to LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def git_sha1(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as the oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def should_use_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub stores this file in LFS: tracked suffixes, large files and binary content."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


@dataclass(frozen=True)
class FileEntry:
    """One file of a tree: its sha256 (the blob's name), size, whether it is in LFS, and its git oid."""

    sha256: str
    size: int
    lfs: bool
    oid: str

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


class BlobStore:
    """Content-addressed blobs on disk, written atomically (a partial upload never becomes a blob)."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "blobs"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise LocalHubHTTPError(400, f"invalid oid {sha256!r}")
        return self.folder / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self._commit_tmp(sha256, lambda handle: handle.write(data))
        return sha256

    def put_stream(self, expected_sha256: str, expected_size: int, chunks: Any) -> None:
        """Store the bytes of `chunks` as blob `expected_sha256`; refuse (and keep nothing) on any mismatch."""
        digest, size = hashlib.sha256(), 0

        def write(handle: BinaryIO) -> None:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if size > expected_size:
                    raise LocalHubHTTPError(400, "upload is larger than announced")
                handle.write(chunk)
            if size != expected_size or digest.hexdigest() != expected_sha256:
                raise LocalHubHTTPError(
                    400, f"uploaded content does not match oid {expected_sha256} and size {expected_size}"
                )

        self._commit_tmp(expected_sha256, write)

    def _commit_tmp(self, sha256: str, write: Any) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp, self.path(sha256))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


@dataclass
class Commit:
    id: str
    parents: list[str]
    tree: dict[str, FileEntry]
    title: str
    message: str
    date: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "tree": {path: [e.sha256, e.size, e.lfs, e.oid] for path, e in sorted(self.tree.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        tree = {path: FileEntry(*values) for path, values in data["tree"].items()}
        return cls(data["id"], data["parents"], tree, data["title"], data["message"], data["date"])


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit]
    branches: dict[str, str]
    tags: dict[str, str]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag or full commit id names; `RevisionNotFound` otherwise."""
        commit_id = self.branches.get(revision) or self.tags.get(revision)
        if commit_id is None and revision in self.commits:
            commit_id = revision
        if commit_id is None:
            raise LocalHubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[commit_id]

    def history(self, revision: str) -> list[Commit]:
        """Every commit reachable from `revision`, newest first."""
        seen: dict[str, Commit] = {}
        pending = [self.resolve(revision)]
        while pending:
            commit = pending.pop()
            if commit.id not in seen:
                seen[commit.id] = commit
                pending.extend(self.commits[parent] for parent in commit.parents)
        return sorted(seen.values(), key=lambda c: c.date, reverse=True)

    def new_commit(self, parents: list[str], tree: dict[str, FileEntry], title: str, message: str) -> Commit:
        # Dates keep microseconds and grow strictly, so that history order is the commit order.
        date = _now()
        for other in self.commits.values():
            date = max(date, _later(other.date))
        body = json.dumps([parents, sorted((p, e.sha256) for p, e in tree.items()), title, message, date])
        commit = Commit(hashlib.sha1(body.encode()).hexdigest(), parents, tree, title, message, date)
        self.commits[commit.id] = commit
        return commit

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "commits": [c.to_json() for c in self.commits.values()],
            "branches": self.branches,
            "tags": self.tags,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Repo:
        commits = {c["id"]: Commit.from_json(c) for c in data["commits"]}
        return cls(
            data["repo_type"],
            data["repo_id"],
            data["private"],
            data["created_at"],
            commits,
            data["branches"],
            data["tags"],
        )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _later(date: str) -> str:
    """The date one microsecond after `date`."""
    moment = datetime.strptime(date, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(microseconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HubStore:
    """All repos of one local Hub, with their blobs; every public method is atomic under one lock."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.lock = threading.RLock()
        self._index = self.root / "repos.json"
        self.repos: dict[tuple[str, str], Repo] = {}
        if self._index.exists():
            for data in json.loads(self._index.read_text(encoding="utf-8")):
                repo = Repo.from_json(data)
                self.repos[(repo.repo_type, repo.repo_id)] = repo

    def save(self) -> None:
        """Write the repos' metadata atomically (called under the lock after each change)."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".repos-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump([repo.to_json() for repo in self.repos.values()], handle)
        os.replace(tmp, self._index)

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise LocalHubHTTPError(404, f"Repository Not Found for {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        namespace, _, name = repo_id.partition("/")
        if repo_type not in REPO_TYPES or not (_NAME.match(namespace) and _NAME.match(name)):
            raise LocalHubHTTPError(400, f"invalid repo {repo_type} {repo_id!r}: expected namespace/name")
        if (repo_type, repo_id) in self.repos:
            raise LocalHubHTTPError(409, f"You already created this {repo_type} repo")
        repo = Repo(repo_type, repo_id, private, _now(), {}, {}, {})
        entry = self.file_entry(GITATTRIBUTES, lfs=False)
        repo.branches["main"] = repo.new_commit([], {".gitattributes": entry}, "initial commit", "").id
        self.repos[(repo_type, repo_id)] = repo
        self.save()
        return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        self.get(repo_type, repo_id)
        del self.repos[(repo_type, repo_id)]
        self.save()

    def file_entry(self, data: bytes, lfs: bool) -> FileEntry:
        sha256 = self.blobs.put_bytes(data)
        oid = git_sha1(lfs_pointer(sha256, len(data))) if lfs else git_sha1(data)
        return FileEntry(sha256, len(data), lfs, oid)

    def lfs_entry(self, sha256: str, size: int) -> FileEntry:
        if not self.blobs.has(sha256, size):
            raise LocalHubHTTPError(422, f"LFS object {sha256} (size {size}) was not uploaded")
        return FileEntry(sha256, size, True, git_sha1(lfs_pointer(sha256, size)))
