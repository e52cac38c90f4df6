"""The ring's C core (ringcore.c) from Python: where a ring lies, one call per operation.

A ``RingLayout`` says where a ring's control page and the runs of its data
area lie in its host buffers (a ring whose pages are scattered over guest RAM
has several runs, perhaps in several buffers).  ``RingCore`` keeps it as the
core's tables and takes the buffers' addresses again for every operation with
``ffi.from_buffer``: while an operation copies (with the GIL released), the
memory cannot go away (an ``mmap.close()`` meanwhile fails with BufferError),
and once the VMM has unmapped it, the next operation raises ValueError
("mmap closed or invalid"), a protocol error for the channel.

The core validates every value it reads from the guest's pages and reports
what it found as a ``RingStatus`` with the values in ``RingCore.result``; the
rings (ring.py) turn those into their results and errors.
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mshvstack.abi import ffi as abi_ffi
from mshvstack.abi import lib as abi_lib
from mshvstack.vmbus._ringcore import ffi, lib

HostBuffer = mmap.mmap | bytearray
PAGE = int(abi_lib.VMBUS_PAGE_SIZE)
CONTROL_SIZE = abi_ffi.sizeof("struct vmbus_ring_control")
INDEX_LIMIT = 1 << 32            # indices are u32
FIRST_SCRATCH = PAGE             # a read's first output buffer; it grows to the largest packet seen


class RingStatus(enum.IntEnum):
    """What one operation of the core found (ringcore.c's RINGCORE_*)."""

    OK = lib.RINGCORE_OK
    EMPTY = lib.RINGCORE_EMPTY
    FULL = lib.RINGCORE_FULL
    BAD_INDICES = lib.RINGCORE_BAD_INDICES
    BAD_WRITE_INDEX = lib.RINGCORE_BAD_WRITE_INDEX
    BAD_READ_INDEX = lib.RINGCORE_BAD_READ_INDEX
    SHORT = lib.RINGCORE_SHORT
    BAD_DESCRIPTOR = lib.RINGCORE_BAD_DESCRIPTOR
    BAD_PACKET = lib.RINGCORE_BAD_PACKET
    BAD_LAYOUT = lib.RINGCORE_BAD_LAYOUT
    SMALL_OUTPUT = lib.RINGCORE_SMALL_OUTPUT


_STATUS = {status.value: status for status in RingStatus}   # a dict lookup: cheaper than RingStatus(code)

@dataclass(frozen=True)
class RingRun:
    """``length`` bytes of the data area from ``data_offset`` lie contiguously in
    buffer number ``buffer`` from ``host_offset``."""

    data_offset: int
    length: int
    buffer: int
    host_offset: int


@dataclass(frozen=True)
class RingLayout:
    """A ring's place in its host buffers: the control page, then the data area in runs."""

    data_size: int
    control_buffer: int
    control_offset: int
    runs: tuple[RingRun, ...]

    def check(self, buffers: Sequence[HostBuffer]) -> None:
        """ValueError unless the runs tile the data area in order and everything lies inside its buffer."""
        if not 0 < self.data_size < INDEX_LIMIT or self.data_size % 8:
            raise ValueError(f"a ring data area of {self.data_size:#x} bytes")
        if not 0 <= self.control_buffer < len(buffers) or self.control_offset < 0 or \
                self.control_offset + CONTROL_SIZE > len(buffers[self.control_buffer]):
            raise ValueError(f"ring control page at {self.control_offset:#x} of buffer {self.control_buffer} is outside it")
        if any(memoryview(buffer).readonly for buffer in buffers):
            raise ValueError("a ring's host buffers must be writable")
        position = 0
        for run in self.runs:
            if run.data_offset != position or run.length <= 0 or not 0 <= run.buffer < len(buffers) or \
                    run.host_offset < 0 or run.host_offset + run.length > len(buffers[run.buffer]):
                raise ValueError(f"ring run {run} does not continue the data area at {position:#x} inside its buffer")
            position += run.length
        if position != self.data_size:
            raise ValueError(f"ring runs cover {position:#x} of {self.data_size:#x} bytes")


class RingCore:
    """One ring's tables for the C core, and its operations.  Not thread-safe: the ring
    that owns it runs one operation at a time (``result`` is shared between them)."""

    def __init__(self, layout: RingLayout, buffers: Sequence[HostBuffer]) -> None:
        layout.check(buffers)
        self.layout = layout
        self._buffers = tuple(buffers)
        self._runs = ffi.new("struct ringcore_run[]", [(r.data_offset, r.length, r.buffer, r.host_offset) for r in layout.runs])
        self._ring = ffi.new("struct ringcore_ring *", (layout.data_size, len(layout.runs), self._runs,
                                                        layout.control_buffer, layout.control_offset))
        self._bases = ffi.new("char *[]", len(self._buffers))
        self._sizes = ffi.new("uint64_t[]", len(self._buffers))
        self._memory = ffi.new("struct ringcore_memory *", (self._bases, self._sizes, len(self._buffers)))
        self.result = ffi.new("struct ringcore_result *")
        self._scratch = ffi.new("char[]", min(FIRST_SCRATCH, layout.data_size))
        self._scratch_size = len(self._scratch)

    def _pin(self) -> list[Any]:
        """Hold every buffer for one operation and give the core its address and size
        (taken now: a buffer cannot be closed or resized while held).  ValueError once
        a mapping is closed (the VMM took the memory away)."""
        views = [ffi.from_buffer(buffer) for buffer in self._buffers]   # writable: checked with the layout
        for index, view in enumerate(views):
            self._bases[index] = view
            self._sizes[index] = len(view)
        return views

    def _unpin(self, views: list[Any]) -> None:
        for index, view in enumerate(views):
            self._bases[index] = ffi.NULL
            self._sizes[index] = 0
            ffi.release(view)

    def write(self, packet: bytes | bytearray | memoryview) -> RingStatus:
        """Append ``packet`` and its trailer, publish, decide the signal (``result.signal``)."""
        source = packet if type(packet) is bytes else ffi.from_buffer(packet)
        views = self._pin()
        try:
            return _STATUS[lib.ringcore_write(self._ring, self._memory, source, len(packet), self.result)]
        finally:
            self._unpin(views)

    def read(self) -> tuple[RingStatus, bytes]:
        """The next packet (descriptor onward, as validated), consumed and published;
        ``result.signal`` says whether the producer waits for the space."""
        views = self._pin()
        try:
            status = _STATUS[lib.ringcore_read(self._ring, self._memory, self._scratch, self._scratch_size, self.result)]
            while status is RingStatus.SMALL_OUTPUT:
                # Nothing was consumed: make room for this packet (at most the data area) and read again.
                self._scratch_size = min(max(self.result.length, 2 * self._scratch_size), self.layout.data_size)
                self._scratch = ffi.new("char[]", self._scratch_size)
                status = _STATUS[lib.ringcore_read(self._ring, self._memory, self._scratch, self._scratch_size, self.result)]
        finally:
            self._unpin(views)
        if status is not RingStatus.OK:
            return status, b""
        return status, ffi.unpack(self._scratch, self.result.length)

    def used(self) -> RingStatus:
        """The indices (``result.write_index``/``read_index``), bytes used (``available``) and ``free``."""
        views = self._pin()
        try:
            return _STATUS[lib.ringcore_used(self._ring, self._memory, self.result)]
        finally:
            self._unpin(views)

    def wait_for_space(self, needed: int) -> RingStatus:
        """Publish ``needed`` as pending send size; ``result.ready`` if the space is already there."""
        views = self._pin()
        try:
            return _STATUS[lib.ringcore_wait_for_space(self._ring, self._memory, needed, self.result)]
        finally:
            self._unpin(views)

    def start_outgoing(self) -> RingStatus:
        """At open, host -> guest: advertise pending-send-size support, clear our pending size."""
        views = self._pin()
        try:
            return _STATUS[lib.ringcore_start_outgoing(self._ring, self._memory)]
        finally:
            self._unpin(views)

    def start_incoming(self) -> RingStatus:
        """At open, guest -> host: interrupts for new data wanted."""
        views = self._pin()
        try:
            return _STATUS[lib.ringcore_start_incoming(self._ring, self._memory)]
        finally:
            self._unpin(views)
