"""Ring buffers over guest memory, with the exact VMBus rules.

A ring is a control page followed by data pages.  Indices are byte offsets
into the data area, multiples of 8; each packet is followed by an 8-byte
trailer (its start offset in the upper 32 bits); the ring is never filled
completely (read == write means empty).  The producer signals only on an
empty→non-empty transition while the consumer's interrupt mask is clear;
the consumer signals a producer that published a pending send size once
enough space became free (vmbus_protocol.md §4).

The mechanics are one call each into the C core (ringcore.c): it validates
every value read from the control page and the descriptor (each read once,
so the value checked is the value used) before use, copies across the wrap
and the runs of scattered pages, publishes the index and fences before it
looks at the other side's mask or pending size.  A bad index raises
CorruptRing and never causes an access outside the ring.
"""

from __future__ import annotations

import struct
import threading
from typing import NoReturn, Protocol

from mshvstack.abi import ffi, lib
from mshvstack.vmbus.errors import CorruptRing, RingFull
from mshvstack.vmbus.ringcore import HostBuffer, RingCore, RingLayout, RingRun, RingStatus

PAGE = int(lib.VMBUS_PAGE_SIZE)
TRAILER = ffi.sizeof("struct vmbus_ring_trailer")
DESCRIPTOR = ffi.sizeof("struct vmpacket_descriptor")
_U32 = struct.Struct("<I")


class RingMem(Protocol):
    """The bytes of one ring: a control page and a data area of ``data_size`` bytes,
    lying in ``buffers`` where ``layout`` says."""

    @property
    def data_size(self) -> int: ...
    @property
    def layout(self) -> RingLayout: ...
    @property
    def buffers(self) -> tuple[HostBuffer, ...]: ...


class FlatRingMem:
    """A ring in a bytearray (tests, tools): control page at 0, data area after it."""

    def __init__(self, pages: int) -> None:
        if pages < 2:
            raise ValueError("a ring needs a control page and at least one data page")
        self.buffer = bytearray(pages * PAGE)
        self.layout = RingLayout(self.data_size, 0, 0, (RingRun(0, self.data_size, 0, PAGE),))
        self.buffers = (self.buffer,)

    @property
    def data_size(self) -> int:
        return len(self.buffer) - PAGE

    def read_control(self, offset: int) -> int:
        return int(_U32.unpack_from(self.buffer, offset)[0])

    def write_control(self, offset: int, value: int) -> None:
        _U32.pack_into(self.buffer, offset, value & 0xFFFFFFFF)

    def read_data(self, offset: int, length: int) -> bytes:
        return bytes(self.buffer[PAGE + offset : PAGE + offset + length])

    def write_data(self, offset: int, data: bytes | memoryview) -> None:
        self.buffer[PAGE + offset : PAGE + offset + len(data)] = data


class _Ring:
    def __init__(self, mem: RingMem) -> None:
        self.mem = mem
        self.size = mem.data_size
        if self.size < PAGE or self.size % 8:
            raise CorruptRing(f"ring data area of {self.size} bytes is not usable")
        self._core = RingCore(mem.layout, mem.buffers)
        # One operation on the ring at a time, so a ring is safe by itself (FlatRingMem in tests), and the
        # core's result is this operation's; in the server every use already runs under the server's lock,
        # which comes first.  A leaf: nothing is called with it held but the C core.
        self._lock = threading.Lock()

    def _failed(self, status: RingStatus) -> NoReturn:
        """The error for what the core found (the guest's doing, but for BAD_LAYOUT: memory gone)."""
        result, size = self._core.result, self.size
        match status:
            case RingStatus.BAD_INDICES:
                raise CorruptRing(f"indices write {result.write_index:#x}, read {result.read_index:#x} "
                                  f"invalid for a {size:#x}-byte ring")
            case RingStatus.BAD_WRITE_INDEX:
                raise CorruptRing(f"write index {result.write_index:#x} invalid for a {size:#x}-byte ring")
            case RingStatus.BAD_READ_INDEX:
                raise CorruptRing(f"read index {result.read_index:#x} invalid for a {size:#x}-byte ring")
            case RingStatus.SHORT:
                raise CorruptRing(f"{result.available} bytes available: less than a packet")
            case RingStatus.BAD_DESCRIPTOR:
                raise CorruptRing(f"packet at {result.read_index:#x}: offset8 {result.offset8}, len8 {result.len8}, "
                                  f"{result.available} bytes available")
            case RingStatus.FULL:
                raise RingFull(f"{result.needed} bytes needed, {result.free} free")
            case RingStatus.BAD_PACKET:
                raise ValueError("packets are a non-empty multiple of 8 bytes")
            case RingStatus.BAD_LAYOUT:
                raise ValueError(f"the ring's pages no longer fit its host memory ({len(self.mem.buffers)} mappings)")
            case RingStatus.OK | RingStatus.EMPTY | RingStatus.SMALL_OUTPUT:
                raise AssertionError(f"ring core status {status.name} is not a failure")

    def used(self) -> int:
        """Bytes between the indices (packets and trailers)."""
        with self._lock:
            status = self._core.used()
            if status is not RingStatus.OK:
                self._failed(status)
            return int(self._core.result.available)


class OutgoingRing(_Ring):
    """Host → guest: the host produces packets, the guest consumes them."""

    def start(self) -> None:
        """At open: advertise pending-send-size support, clear our pending size."""
        with self._lock:
            status = self._core.start_outgoing()
            if status is not RingStatus.OK:
                self._failed(status)

    def free(self) -> int:
        """Bytes free for packets and their trailers (the ring never fills completely)."""
        with self._lock:
            status = self._core.used()
            if status is not RingStatus.OK:
                self._failed(status)
            return int(self._core.result.free)

    def write(self, packet: bytes) -> bool:
        """Append one packet (length a multiple of 8); True if the guest must be signalled.

        Raises RingFull when there is no room; the caller may then wait for
        the guest's signal (see wait_for_space).
        """
        if len(packet) % 8 or not packet:
            raise ValueError("packets are a non-empty multiple of 8 bytes")
        with self._lock:
            status = self._core.write(packet)
            if status is not RingStatus.OK:
                self._failed(status)
            return bool(self._core.result.signal)

    def wait_for_space(self, needed: int) -> bool:
        """Publish pending_send_sz; True if the space is already there (no need to wait)."""
        with self._lock:
            status = self._core.wait_for_space(needed)
            if status is not RingStatus.OK:
                self._failed(status)
            return bool(self._core.result.ready)


class IncomingRing(_Ring):
    """Guest → host: the guest produces packets, the host consumes them."""

    def start(self) -> None:
        """At open: the host wants an interrupt for new data."""
        with self._lock:
            status = self._core.start_incoming()
            if status is not RingStatus.OK:
                self._failed(status)

    def read(self) -> tuple[bytes, bool] | None:
        """One packet (descriptor + data, trailer removed) and whether the guest
        must be signalled (it was waiting for the space this read freed).  The
        bytes are the caller's to keep; the descriptor in them is the one checked."""
        with self._lock:
            status, packet = self._core.read()
            if status is RingStatus.OK:
                return packet, bool(self._core.result.signal)
            if status is RingStatus.EMPTY:
                return None
            self._failed(status)
