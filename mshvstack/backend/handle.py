"""An fd that refuses to be used once closed.

The kernel reuses fd numbers: after ``a.close()`` the next partition may get
``a``'s number, and a stale ``a.ioeventfd(...)`` would install a doorbell on
it.  Every object of the object model (Mshv, Partition, Vp) reaches its fd
only through a FdHandle, so a closed object can never touch a number it no
longer owns: the guard is in the one place the fd comes from, not in each
method.
"""

from __future__ import annotations

import weakref

from mshvstack.backend.base import Backend
from mshvstack.errors import MshvError


class ClosedError(MshvError):
    """The object was closed; its fd is gone (and its number may belong to another)."""


class FdHandle:
    def __init__(self, backend: Backend, fd: int, what: str) -> None:
        self.backend, self.what = backend, what
        self._fd = fd
        self._closed = False
        self._finalizer = weakref.finalize(self, backend.close, fd)   # an owner dropped unclosed

    @property
    def fd(self) -> int:
        if self._closed:
            raise ClosedError(f"{self.what} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._finalizer()


class FdOwner:
    """What Mshv, Partition and Vp share: their fd, reached only through the handle."""

    _handle: FdHandle

    @property
    def fd(self) -> int:
        """The fd; ClosedError once closed (every ioctl and hypercall comes through here)."""
        return self._handle.fd

    @property
    def closed(self) -> bool:
        return self._handle.closed
