"""The one small interface between a NIC and the host's network.

A backend takes Ethernet frames from the guest (``send``, called with the
VMBus server's lock held, so it never blocks: a frame it cannot take now is
dropped and counted, as a NIC drops on a full queue) and hands frames for
the guest to ``deliver`` on a thread of its own, with no lock held, in
batches (one VMBus packet carries many).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from mshvstack.errors import MshvError

Deliver = Callable[[list[bytes]], None]


class NetBackendError(MshvError):
    """A backend cannot be set up (no libslirp, no TAP device, a bad option)."""


class NetBackend(Protocol):
    name: str

    def start(self, deliver: Deliver) -> None: ...
    def send(self, frame: bytes) -> bool: ...
    def close(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class LoopbackBackend:
    """Reflects every frame back to the guest (tests), or keeps them (``keep``)."""

    name = "loopback"

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.sent: list[bytes] = []
        self._deliver: Deliver | None = None
        self._lock = threading.Lock()   # guards ``sent`` (the test's thread reads it): a leaf

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def send(self, frame: bytes) -> bool:
        with self._lock:
            self.sent.append(frame)
        return True

    def inject(self, frames: list[bytes]) -> None:
        """Frames for the guest, as a backend thread would deliver them."""
        if self._deliver is not None:
            self._deliver(frames)

    def take(self) -> list[bytes]:
        with self._lock:
            sent, self.sent = self.sent, []
        return sent

    def close(self) -> None:
        self._deliver = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}
