"""Published weights on a machine that may have no network: one quick look at the host first.

timm fetches most weights from the Hugging Face hub, whose client retries a host it cannot reach
for about 50 s before failing; torchvision's download (torch.hub) waits as long as the system lets
a connection hang. So before weights that are not in the local cache are fetched, kdlab checks once
per process whether their host can be reached (a TCP connection within `PROBE_S` seconds, through
the proxy when one is set). When it cannot, the hub is put in its offline mode for the call, so
weights in its cache still load and missing ones fail at once, and a torch.hub download not in its
cache is not started; the message names the host and the way out (`--set weights=PATH`).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from kdlab.errors import UserError

PROBE_S = 3.0
_REACHABLE: dict[tuple[str, int], bool] = {}


def _address(url: str) -> tuple[str, int]:
    """The host and port a request for `url` connects to: its proxy's when one is set for it."""
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def reachable(url: str) -> bool:
    """Whether a connection to `url`'s host (or its proxy) opens within PROBE_S seconds; asked once per
    process and address (name resolution, which has no timeout of its own, included)."""
    address = _address(url)
    if address not in _REACHABLE:
        opened: list[bool] = []

        def attempt() -> None:
            try:
                socket.create_connection(address, timeout=PROBE_S).close()
                opened.append(True)
            except OSError:
                opened.append(False)

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(PROBE_S + 1.0)
        _REACHABLE[address] = bool(opened and opened[0])
    return _REACHABLE[address]


def host_of(url: str) -> str:
    return urlparse(url).netloc or url


@contextmanager
def hub_offline_unless_reachable() -> Iterator[str | None]:
    """Around a call that may fetch from the Hugging Face hub: when the hub cannot be reached, its
    offline mode (cache only, no retries) for the call; yields the hub's host then, else None."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield None
        return
    if constants.HF_HUB_OFFLINE or reachable(constants.ENDPOINT):
        yield None
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield host_of(constants.ENDPOINT)
    finally:
        constants.HF_HUB_OFFLINE = False


def check_download(url: str, what: str) -> None:
    """Before torch.hub fetches `url`: fine when the file is in its cache or the host can be reached;
    otherwise one line naming both and the way out."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file() or reachable(url):
        return
    raise UserError(f"{what}: its published weights are not in the cache ({cached}) and {host_of(url)} cannot be "
                    "reached from here: give a local file with --set weights=PATH (a state dict)")
