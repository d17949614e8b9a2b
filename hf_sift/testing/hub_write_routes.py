"""The routes of the local Hub that change repos: create and delete, uploads, commits, tags, branches, squash."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from ..errors import LocalHubHTTPError
from .hub_store import FileEntry, Repo, should_use_lfs


if TYPE_CHECKING:
    from .hub_server import HubServer

URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubWriteRoutes:
    """Repo, upload, commit and ref routes (a mixin of `HubRequestHandler`)."""

    hub: HubServer
    query: dict[str, list[str]]
    path: str
    command: str
    headers: Any

    def _repo(self, key: tuple[str, str]) -> Repo:
        return self.hub.store.get(*key)

    # --- repos ----------------------------------------------------------------------------------------------------

    def create_repo(self) -> None:
        body = self._json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization')}/{body.get('name')}"
        url = self._url(f"/{URL_PREFIXES.get(repo_type, '')}{repo_id}")
        with self.hub.store.lock:
            if (repo_type, repo_id) in self.hub.store.repos:  # the Hub names the existing repo in its 409
                raise LocalHubHTTPError(409, f"You already created this {repo_type} repo", url=url)
            self.hub.store.create(repo_type, repo_id, bool(body.get("private")))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        body = self._json()
        with self.hub.store.lock:
            self.hub.store.delete(body.get("type") or "model", f"{body.get('organization')}/{body.get('name')}")
        self._send(200, {})

    def validate_yaml(self) -> None:
        import yaml

        content = self._json().get("content", "")
        if content.startswith("---"):
            front, sep, _ = content[3:].partition("\n---")
            problem = None if sep else "metadata must end with a '---' line"
            if problem is None:
                try:
                    if not isinstance(yaml.safe_load(front) or {}, dict):
                        problem = "metadata must be a YAML mapping"
                except yaml.YAMLError as error:
                    problem = f"invalid YAML: {error}"
            if problem is not None:
                self._send(400, {"errors": [{"message": problem}], "warnings": []})
                return
        self._send(200, {"errors": [], "warnings": []})

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
            raise LocalHubHTTPError(400, "the local Hub's LFS batch API serves uploads only")
        prefix = URL_PREFIXES[key[0]]
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
            raise LocalHubHTTPError(413, f"LFS object over {self.hub.max_upload_bytes} bytes")
        self.hub.store.blobs.put_stream(oid, size, self._body_chunks(self.hub.max_upload_bytes))
        self._send(200, b"")

    def lfs_verify(self, key: tuple[str, str]) -> None:
        body = self._json()
        if not self.hub.store.blobs.has(str(body.get("oid")), int(body.get("size", -1))):
            raise LocalHubHTTPError(404, f"LFS object {body.get('oid')} not found")
        self._send(200, {})

    def commit(self, key: tuple[str, str], branch: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise LocalHubHTTPError(400, "the commit payload must start with a header line")
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
                raise LocalHubHTTPError(400, f"unknown commit operation {line['key']!r}")
        with store.lock:
            repo = self._repo(key)
            if branch not in repo.branches:
                raise LocalHubHTTPError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            pr_number = None
            if self.query.get("create_pr"):  # a pull request is a `refs/pr/N` ref, from `parentCommit` or the head
                head = repo.commits.get(parent, head)
                pr_number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
                branch, parent = f"refs/pr/{pr_number}", None
            if parent is not None and parent != head.id:
                raise LocalHubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.tree)
            for kind, path, entry in changes:
                if kind == "add":
                    tree[path] = entry  # type: ignore[assignment]
                elif kind == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise LocalHubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    inside = [p for p in tree if p.startswith(path + "/")]
                    if not inside:
                        raise LocalHubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del tree[p]
            commit = repo.new_commit([head.id], tree, header.get("summary", ""), header.get("description", ""))
            repo.branches[branch] = commit.id
            store.save()
        url = self._url(f"/{URL_PREFIXES[key[0]]}{key[1]}/commit/{commit.id}")
        pr_url = None if pr_number is None else self._url(f"/{URL_PREFIXES[key[0]]}{key[1]}/discussions/{pr_number}")
        self._send(200, {"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": pr_url})

    # --- refs -----------------------------------------------------------------------------------------------------

    def super_squash(self, key: tuple[str, str], branch: str) -> None:
        message = self._json().get("message") or f"Super-squash branch '{branch}'"
        with self.hub.store.lock:
            repo = self._repo(key)
            if branch not in repo.branches:
                if branch in repo.tags:
                    raise LocalHubHTTPError(400, f"{branch} is a tag: only branches can be squashed")
                raise LocalHubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
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
                raise LocalHubHTTPError(
                    409 if tag else 400, f"Tag {tag!r} already exists" if tag else "missing tag name"
                )
            repo.tags[tag] = commit.id
            self.hub.store.save()
        self._send(200, {})

    def create_branch(self, key: tuple[str, str], branch: str) -> None:
        start = self._json().get("startingPoint") or "main"
        with self.hub.store.lock:
            repo = self._repo(key)
            commit = repo.resolve(start)
            if branch in repo.branches:
                raise LocalHubHTTPError(409, f"Branch {branch!r} already exists")
            repo.branches[branch] = commit.id
            self.hub.store.save()
        self._send(200, {})

    def delete_ref(self, key: tuple[str, str], kind: str, name: str) -> None:
        self._body()
        with self.hub.store.lock:
            repo = self._repo(key)
            refs = getattr(repo, kind)
            if name not in refs:
                raise LocalHubHTTPError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if kind == "branches" and name == "main":
                raise LocalHubHTTPError(403, "the main branch cannot be deleted")
            del refs[name]
            _drop_unreachable(repo)
            self.hub.store.save()
        self._send(200, {})


def _drop_unreachable(repo: Repo) -> None:
    """Forget commits no branch or tag reaches any more (as the Hub's garbage collection would)."""
    reachable: set[str] = set()
    for commit_id in {*repo.branches.values(), *repo.tags.values()}:
        reachable.update(c.id for c in repo.history(commit_id))
    for commit_id in [c for c in repo.commits if c not in reachable]:
        del repo.commits[commit_id]
