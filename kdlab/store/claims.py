"""Claims on runs: who holds one, whether that holder is gone, and the heartbeat that keeps it.

Several `kdlab grid` processes share one runs directory: a run is claimed in a transaction by an
owner (host, process, random part), whose heartbeat refreshes the claim while it trains. A claim
whose heartbeat is older than STALE_AFTER_S, or whose process is known to be dead, is taken over.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdlab.store.protocol import RunsWriter

STALE_AFTER_S = 120.0  # a claim whose heartbeat is older than this is taken over
HEARTBEAT_S = 15.0


def owner_id() -> str:
    """Who holds a claim: host, process and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str | None) -> bool:
    """True when the claim's process is known to be gone (same host, pid not running)."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(rest.split(":")[0]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class Heartbeat:
    """Refreshes a claim from a background thread while a run trains (epochs can be long)."""

    def __init__(self, store: RunsWriter, run_ids: list[str], owner: str, every_s: float = HEARTBEAT_S):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(store, run_ids, owner, every_s), daemon=True)

    def _beat(self, store: RunsWriter, run_ids: list[str], owner: str, every_s: float) -> None:
        # Through the store's interface (RunsWriter.reopen), so that a store proxy beats through its writer.
        beating = store.reopen()
        try:
            while not self._stop.wait(every_s):
                for run_id in run_ids:
                    beating.heartbeat(run_id, owner)
        finally:
            beating.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
