"""pytest fixtures serving a local Hub (`hf_sift.testing.hub_server`) to the unmodified `huggingface_hub` client.

`huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_DISABLE_XET` when it is imported, so set them at the very top of
your `conftest.py`, before anything imports it (hf_sift, transformers, ...), then load this plugin:

```python
import os

os.environ["HF_ENDPOINT"] = "http://127.0.0.1:8765"  # or any free loopback port
os.environ["HF_HUB_DISABLE_XET"] = "1"
pytest_plugins = ["hf_sift.testing.pytest_plugin"]
```

`local_hub` (session) serves at that address; `hub` (per test) is the same server with its request log and
faults cleared.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from .hub_server import HubServer


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A local Hub at `huggingface_hub.constants.ENDPOINT`, for the whole session."""
    from huggingface_hub import constants

    address = urlsplit(constants.ENDPOINT)
    if address.hostname not in ("127.0.0.1", "localhost") or not address.port or not constants.HF_HUB_DISABLE_XET:
        pytest.fail(
            f"huggingface_hub was imported with HF_ENDPOINT={constants.ENDPOINT!r} and HF_HUB_DISABLE_XET="
            f"{constants.HF_HUB_DISABLE_XET}: set HF_ENDPOINT=http://127.0.0.1:PORT and HF_HUB_DISABLE_XET=1 at the "
            "top of conftest.py, before anything imports huggingface_hub"
        )
    with HubServer(root=tmp_path_factory.mktemp("local-hub"), host=address.hostname, port=address.port) as server:
        yield server


@pytest.fixture
def hub(local_hub: HubServer) -> Iterator[HubServer]:
    """The session's local Hub with an empty request log and no faults; faults left over are cleared after."""
    local_hub.clear_faults()
    local_hub.clear_requests()
    yield local_hub
    local_hub.clear_faults()
