"""The request handler of the local Hub: reading requests, routing them to named routes, answering, faults.

Every route is named (`commit`, `lfs_upload`, `resolve`, ...): the request log records the name, and faults are
injected by name. See docs/hub_server.md for the list.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import LocalHubHTTPError
from .hub_read_routes import HubReadRoutes
from .hub_write_routes import HubWriteRoutes


if TYPE_CHECKING:
    from .hub_server import HubServer, RequestRecord

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_CHUNK = 1 << 20


class HubRequestHandler(HubReadRoutes, HubWriteRoutes, BaseHTTPRequestHandler):
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
        self._record: RequestRecord | None = None
        self._lose_answer = False
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        route, handler, args = self._route(segments)
        record = self._record = self.hub._log(self.command, unquote(url.path), route)
        fault = self.hub._take_fault(route, record.path)
        try:
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "drop":
                self._drop()
                return
            self._lose_answer = fault is not None and fault.kind == "lose_answer"
            if handler is None:
                raise LocalHubHTTPError(404, f"no route for {self.command} {url.path}")
            handler(*args)
        except LocalHubHTTPError as error:
            self._error(error)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as error:  # an unexpected failure answers 500 rather than hanging the client
            self._error(LocalHubHTTPError(500, f"{type(error).__name__}: {error}"))

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
                    raise LocalHubHTTPError(413, f"request body over {limit} bytes")
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        if remaining > limit:
            self.close_connection = True
            raise LocalHubHTTPError(413, f"request body over {limit} bytes")
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
            raise LocalHubHTTPError(400, f"invalid JSON body: {error}") from None

    def _drop(self) -> None:
        """Read part of the request (up to half its announced body), then close the connection without answering."""
        announced = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(min(announced // 2, _CHUNK)) if announced else self.rfile.read1(_CHUNK)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        if self._lose_answer:  # the request was handled; its answer is lost (logged with status None)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self._record is not None:  # logged before the answer leaves, so a client that got it sees it logged
            self._record.status = status
        self.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, error: LocalHubHTTPError) -> None:
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
