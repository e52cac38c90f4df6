"""The ring's C core (ringcore.c) from Python: where a ring lies, one call per operation.

A ``RingLayout`` says where a ring's control page and the runs of its data
area lie in its host buffers (a ring whose pages are scattered over guest RAM
has several runs, perhaps in several buffers).  ``RingCore`` keeps it as the
core's tables; the buffers' addresses are taken again for every operation with
``ffi.from_buffer``, which holds them: while the core copies (cffi releases the
GIL around every call), the memory cannot go away (an ``mmap.close()``
meanwhile fails with BufferError instead of unmapping it under the copy), and
once the VMM has unmapped it, the next operation raises ValueError ("mmap
closed or invalid"), a protocol error for the channel.

The core validates every value it reads from the guest's pages and reports
what it found as a ``RingStatus`` with the values in ``RingCore.result``; the
rings (ring.py) turn those into their results and errors.
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mshvstack.abi import ffi as abi_ffi
from mshvstack.abi import lib as abi_lib
from mshvstack.vmbus._ringcore import ffi, lib

HostBuffer = mmap.mmap | bytearray
PAGE = int(abi_lib.VMBUS_PAGE_SIZE)
CONTROL_SIZE = abi_ffi.sizeof("struct vmbus_ring_control")
INDEX_LIMIT = 1 << 32            # indices are u32
ALIGN = int(abi_lib.VMBUS_RING_INDEX_ALIGN)
FIRST_SCRATCH = PAGE             # a read's first scratch buffer; it grows to the largest packet read


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
    LARGE_PACKET = lib.RINGCORE_LARGE_PACKET



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
        if not 0 < self.data_size < INDEX_LIMIT or self.data_size % ALIGN:
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
    """One ring's tables for the C core (its layout, the memory of an operation, the
    result, a scratch buffer).  Not thread-safe: the ring that owns it runs one
    operation at a time, and calls the core's functions (``lib``) with these tables.

    Each function of the core takes buffer 0 (address and size) as arguments, after
    the ring (the others go through the ring's table): the usual ring lies in one
    mapping (``single``), and its hot operations pass ``ffi.from_buffer(single)``
    themselves; ``call`` does it for any number of buffers."""

    def __init__(self, layout: RingLayout, buffers: Sequence[HostBuffer]) -> None:
        layout.check(buffers)
        self.layout = layout
        self.buffers = tuple(buffers)
        self.single = self.buffers[0] if len(self.buffers) == 1 else None
        self._runs = ffi.new("struct ringcore_run[]", [(r.data_offset, r.length, r.buffer, r.host_offset) for r in layout.runs])
        # Filled for each operation and read by the core only within it (stale between operations).
        self._bases = ffi.new("char *[]", len(self.buffers))
        self._sizes = ffi.new("uint64_t[]", len(self.buffers))
        self.ring = ffi.new("struct ringcore_ring *", (layout.data_size, len(layout.runs), self._runs, layout.control_buffer,
                                                       layout.control_offset, (self._bases, self._sizes, len(self.buffers))))
        self.result = ffi.new("struct ringcore_result *")
        self.scratch: Any = None
        self.scratch_size = 0
        self.scratch_view = memoryview(b"")
        self.grow_scratch(FIRST_SCRATCH)

    def call(self, function: Callable[..., int], *args: Any) -> int:
        """``function(ring, buffer 0, its size, *args)`` with every buffer held for the call
        (``ffi.from_buffer``: a held buffer can be neither closed nor resized), its address
        and size taken now.  ValueError once a mapping is closed: the VMM took the memory
        away.  (The ring's write and read spell this out for a ring in one mapping.)"""
        views = [ffi.from_buffer(buffer) for buffer in self.buffers]   # writable: checked with the layout
        try:
            for index in range(1, len(views)):
                self._bases[index] = views[index]
                self._sizes[index] = len(views[index])
            return function(self.ring, views[0], len(views[0]), *args)
        finally:
            for view in views:
                ffi.release(view)

    def grow_scratch(self, needed: int) -> None:
        """A scratch buffer (where reads copy packets to) of at least ``needed`` bytes: the
        next power of two, at most the data area (no packet is larger).  Views of the
        old buffer stay valid: each keeps its buffer alive."""
        size = min(max(FIRST_SCRATCH, 1 << (needed - 1).bit_length()), self.layout.data_size)
        self.scratch = ffi.new("char[]", size)
        self.scratch_size = size
        self.scratch_view = memoryview(ffi.buffer(self.scratch)).toreadonly()
