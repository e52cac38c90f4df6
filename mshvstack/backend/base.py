"""The Backend protocol: the one seam between mshvstack and a /dev/mshv."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """A /dev/mshv-like device: the real one or the simulator.

    ``arg`` of :meth:`ioctl` is a cffi pointer to the request's argument
    struct, or an int for requests that take none.  Errors raise
    :class:`mshvstack.errors.ErrnoError` with the request's name.
    """

    name: str

    def open(self) -> int:
        """Open the device; returns its fd."""
        ...

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        """Issue ``request`` on ``fd``; returns the ioctl's non-negative result."""
        ...

    def mmap(self, fd: int, length: int, offset: int) -> memoryview:
        """Map ``length`` bytes of ``fd`` at ``offset`` (VP pages), shared, read/write."""
        ...

    def close(self, fd: int) -> None:
        """Close an fd this backend returned."""
        ...

    def kick(self, vp_fd: int, thread_id: int) -> None:
        """Make MSHV_RUN_VP on ``vp_fd``, blocked in thread ``thread_id``, return EINTR."""
        ...

    def host_wrote(self, partition_fd: int, ranges: Sequence[tuple[int, int]]) -> None:
        """This process wrote the partition's RAM at these (host address, length) ranges
        (device DMA, a loader; a scattered DMA is one call).  The real device needs nothing (x86 keeps such stores
        coherent with the guest's instruction fetch); a simulator that translates
        guest code drops what it translated from those bytes."""
        ...
