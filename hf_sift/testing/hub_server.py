"""A local Hugging Face Hub for tests: a real HTTP server the unmodified `huggingface_hub` client talks to.

Point the client at it with `HF_ENDPOINT` and disable Xet, both before `huggingface_hub` is imported:

```python
import os

os.environ["HF_ENDPOINT"] = "http://127.0.0.1:8765"
os.environ["HF_HUB_DISABLE_XET"] = "1"

from hf_sift.testing.hub_server import HubServer

with HubServer(port=8765) as hub:  # in-process, in background threads
    ...  # HfApi().create_repo(...), hf_hub_download(...), ...
    print(hub.requests)  # (method, path, route, status) of every request
```

or from a shell: `python -m hf_sift.testing.hub_server --port 8765 --root DIR`. LFS objects are served by a
second listener (another port), as the Hub's redirects go to a storage host. See docs/hub_server.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import HubServerError
from .hub_handler import HubRequestHandler
from .hub_store import HubStore


ROUTES = (
    "create_repo",
    "delete_repo",
    "validate_yaml",
    "repo_info",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "lfs_verify",
    "commit",
    "tree",
    "paths_info",
    "refs",
    "commits",
    "super_squash",
    "tag",
    "branch",
    "resolve",
    "lfs_download",
)


@dataclass
class RequestRecord:
    """One request the server received: `route` names the endpoint; `status` is `None` for a dropped request."""

    method: str
    path: str
    route: str
    status: int | None = None


@dataclass
class Fault:
    """A fault injected into the next `times` requests to `route` (whose path contains `path_contains`, when set):
    `"drop"` the connection half-way through the request body, `"delay"` the answer by `seconds`, or
    `"lose_answer"`: handle the request (a commit lands), then close the connection without answering."""

    route: str
    kind: str
    times: int = 1
    seconds: float = 0.0
    path_contains: str | None = None


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hub: HubServer, is_storage: bool) -> None:
        self.hub, self.is_storage = hub, is_storage
        # At most `max_connections` connections are served at once; the next ones wait to be accepted.
        self._slots = threading.BoundedSemaphore(hub.max_connections)
        super().__init__(address, HubRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def get_request(self) -> Any:
        connection, address = super().get_request()
        connection.settimeout(self.hub.socket_timeout)  # a stalled client cannot hold a thread for ever
        return connection, address


class HubServer:
    """A local Hub on the loopback interface, backed by real per-repo history under `root`.

    Args:
        root (`str` or `os.PathLike`, *optional*): Folder holding the blobs and repos; a temporary folder (removed
            on `stop`) when omitted. A server started again on the same root finds its repos.
        port (`int`, *optional*, defaults to 0): Port of the API; 0 picks a free one.
        host (`str`, *optional*, defaults to `"127.0.0.1"`): A loopback address; any other is refused.
        page_size (`int`, *optional*, defaults to 1000): Entries per page of tree and commit listings.
        max_request_bytes (`int`, *optional*, defaults to 256 MiB): Largest JSON or commit request body.
        max_upload_bytes (`int`, *optional*, defaults to 8 GiB): Largest LFS object.
        socket_timeout (`float`, *optional*, defaults to 60): Seconds a connection may stay silent.
        max_connections (`int`, *optional*, defaults to 64): Connections served at once (per listener).
        max_logged_requests (`int`, *optional*, defaults to 100000): Requests kept in the log (the oldest go first).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        page_size: int = 1000,
        max_request_bytes: int = 256 << 20,
        max_upload_bytes: int = 8 << 30,
        socket_timeout: float = 60.0,
        max_connections: int = 64,
        max_logged_requests: int = 100_000,
    ) -> None:
        if not _is_loopback(host):
            raise HubServerError(f"the local Hub listens on a loopback address only, not {host!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="hf-sift-hub-") if root is None else None
        self.store = HubStore(root if root is not None else self._tmp.name)  # type: ignore[union-attr]
        self.host, self.port = host, port
        self.page_size, self.socket_timeout = page_size, socket_timeout
        self.max_request_bytes, self.max_upload_bytes = max_request_bytes, max_upload_bytes
        self._lock = threading.Lock()
        self.max_connections = max_connections
        self._requests: deque[RequestRecord] = deque(maxlen=max_logged_requests)
        self._faults: list[Fault] = []
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        """The address to set as `HF_ENDPOINT`."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def storage_endpoint(self) -> str:
        """The address LFS downloads are redirected to (a different origin, like the Hub's storage host)."""
        return f"http://{_url_host(self.host)}:{self._listeners[1].server_address[1]}"

    def start(self) -> HubServer:
        """Start listening (API and LFS storage) in background threads; returns `self`."""
        api = _Listener((self.host, self.port), self, is_storage=False)
        self.port = api.server_address[1]
        self._listeners = [api, _Listener((self.host, 0), self, is_storage=True)]
        for listener in self._listeners:
            thread = threading.Thread(target=listener.serve_forever, name="hf-sift-hub", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening; a temporary root is removed."""
        for listener in self._listeners:
            listener.shutdown()
            listener.server_close()
        for thread in self._threads:
            thread.join()
        self._listeners, self._threads = [], []
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- request log ----------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received since the start (or the last `clear_requests`), oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _log(self, method: str, path: str, route: str) -> RequestRecord:
        record = RequestRecord(method, path, route)
        with self._lock:
            self._requests.append(record)
        return record

    # --- fault injection ------------------------------------------------------------------------------------------

    def drop(self, route: str, times: int = 1, path_contains: str | None = None) -> None:
        """Close the connection of the next `times` requests to `route` (whose path contains `path_contains`, when
        given: e.g. one LFS object's sha256) half-way through their body, without answering."""
        self._add_fault(Fault(route, "drop", times, path_contains=path_contains))

    def delay(self, route: str, seconds: float, times: int = 1, path_contains: str | None = None) -> None:
        """Answer the next `times` requests to `route` (whose path contains `path_contains`) after `seconds`."""
        self._add_fault(Fault(route, "delay", times, seconds, path_contains))

    def lose_answer(self, route: str, times: int = 1, path_contains: str | None = None) -> None:
        """Handle the next `times` requests to `route` (whose path contains `path_contains`) in full, then close the
        connection instead of answering: the client fails although the change was made (e.g. a commit landed)."""
        self._add_fault(Fault(route, "lose_answer", times, path_contains=path_contains))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: Fault) -> None:
        if fault.route not in ROUTES:
            raise HubServerError(f"unknown route {fault.route!r}; routes are {', '.join(ROUTES)}")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, route: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route == route and fault.times > 0 and (fault.path_contains or "") in path:
                    fault.times -= 1
                    return fault
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_sift.testing.hub_server",
        description="Serve a local Hugging Face Hub for tests. Clients need HF_ENDPOINT=http://HOST:PORT and "
        "HF_HUB_DISABLE_XET=1 in their environment.",
    )
    parser.add_argument("--port", type=int, default=0, help="port of the API (default: a free one)")
    parser.add_argument("--root", required=True, help="folder holding the repos and blobs (kept between runs)")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        server = HubServer(root=args.root, port=args.port, host=args.host).start()
    except (ValueError, OSError) as error:
        print(f"hub_server: error: {error}", file=sys.stderr)
        return 2
    print(f"local Hub at {server.endpoint} (root {Path(args.root).absolute()}); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
