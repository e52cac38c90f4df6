"""The backend seam: a Backend is open/ioctl/mmap/close on /dev/mshv-like fds."""

from __future__ import annotations

from mshvstack.backend.base import Backend
from mshvstack.backend.host import HostBackend
from mshvstack.backend.ioctls import FdKind

__all__ = ["Backend", "HostBackend", "FdKind"]
