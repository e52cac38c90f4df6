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
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, assert_never

from mshvstack.abi import ffi
from mshvstack.abi import lib as abi_lib
from mshvstack.vmbus._ringcore import ffi as ffi_core
from mshvstack.vmbus._ringcore import lib
from mshvstack.vmbus.errors import CorruptRing, RingFull
from mshvstack.vmbus.ringcore import HostBuffer, RingCore, RingLayout, RingRun, RingStatus

PAGE = int(abi_lib.VMBUS_PAGE_SIZE)
TRAILER = int(ffi.sizeof("struct vmbus_ring_trailer"))
DESCRIPTOR = int(ffi.sizeof("struct vmpacket_descriptor"))
ALIGN = int(abi_lib.VMBUS_RING_INDEX_ALIGN)
_U32 = struct.Struct("<I")
# The hot paths' names, looked up once.
_write, _read = lib.ringcore_write, lib.ringcore_read
_from_buffer, _release_view = ffi_core.from_buffer, ffi_core.release
_OK, _EMPTY, _LARGE_PACKET = int(RingStatus.OK), int(RingStatus.EMPTY), int(RingStatus.LARGE_PACKET)


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
        if self.size < PAGE or self.size % ALIGN:
            raise CorruptRing(f"ring data area of {self.size} bytes is not usable")
        self._core = RingCore(mem.layout, mem.buffers)
        # One operation on the ring at a time, so a ring is safe by itself (FlatRingMem in tests), and the
        # core's tables are this operation's; in the server every use already runs under the server's lock,
        # which comes first.  A leaf: nothing is called with it held but the C core.  The write and the
        # read take it by hand: there a ``with`` costs as much as copying a small packet.
        self._lock = threading.Lock()
        self._acquire, self._release = self._lock.acquire, self._lock.release

    def _call(self, function: Callable[..., int], *args: Any) -> int:
        """``function`` of the core (see RingCore.call) under the ring's lock."""
        self._acquire()
        try:
            return self._core.call(function, *args)
        finally:
            self._release()

    def _failed(self, status: int, result: Any) -> NoReturn:
        """The error for what the core found and left in ``result`` (the guest's doing,
        but for BAD_LAYOUT: the ring's memory is no longer what it was)."""
        size = self.size
        match RingStatus(status):
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
                raise ValueError(f"the ring's pages do not fit its host memory ({len(self._core.buffers)} mappings)")
            case RingStatus.OK | RingStatus.EMPTY | RingStatus.LARGE_PACKET:
                raise AssertionError(f"ring core status {RingStatus(status).name} is not a failure")
            case unknown:
                assert_never(unknown)

    def _indices(self) -> Any:
        """The core's view of the indices (``available`` used, ``free``), validated."""
        result = ffi_core.new("struct ringcore_result *")   # its own: read after the lock
        status = self._call(lib.ringcore_used, result)
        if status:
            self._failed(status, result)
        return result

    def used(self) -> int:
        """Bytes between the indices (packets and trailers)."""
        return int(self._indices().available)


class OutgoingRing(_Ring):
    """Host → guest: the host produces packets, the guest consumes them."""

    def start(self) -> None:
        """At open: advertise pending-send-size support, clear our pending size."""
        status = self._call(lib.ringcore_start_outgoing)
        if status:
            self._failed(status, None)

    def free(self) -> int:
        """Bytes free for packets and their trailers (the ring never fills completely)."""
        return int(self._indices().free)

    def write(self, packet: bytes) -> bool:
        """Append one packet (length a multiple of 8); True if the guest must be signalled.

        Raises RingFull when there is no room; the caller may then wait for
        the guest's signal (see wait_for_space).
        """
        source = packet if type(packet) is bytes else ffi_core.from_buffer(packet)
        core = self._core
        single = core.single
        self._acquire()
        try:
            if single is not None:   # RingCore.call, spelled out for the usual ring
                view = _from_buffer(single)
                try:
                    status = _write(core.ring, view, len(view), source, len(packet), core.result)
                finally:
                    _release_view(view)
            else:
                status = core.call(_write, source, len(packet), core.result)
            if status:
                self._failed(status, core.result)
            return bool(core.result.signal)
        finally:
            self._release()

    def wait_for_space(self, needed: int) -> bool:
        """Publish pending_send_sz; True if the space is already there (no need to wait)."""
        result = ffi_core.new("struct ringcore_result *")
        status = self._call(lib.ringcore_wait_for_space, needed, result)
        if status:
            self._failed(status, result)
        return bool(result.ready)


class IncomingRing(_Ring):
    """Guest → host: the guest produces packets, the host consumes them."""

    def start(self) -> None:
        """At open: the host wants an interrupt for new data."""
        status = self._call(lib.ringcore_start_incoming)
        if status:
            self._failed(status, None)

    def read(self) -> tuple[memoryview, bool] | None:
        """One packet (descriptor + data, trailer removed) and whether the guest
        must be signalled (it was waiting for the space this read freed).

        The packet is a read-only view of the ring's own buffer, valid until the
        next read: copy what you keep (packets.parse does).  The descriptor in it
        is the one the core checked.  Not copying it again into a new object is
        half the cost of a large packet."""
        core = self._core
        single = core.single
        self._acquire()
        try:
            while True:
                if single is not None:   # RingCore.call, spelled out for the usual ring
                    view = _from_buffer(single)
                    try:
                        status = _read(core.ring, view, len(view), core.scratch, core.scratch_size, core.result)
                    finally:
                        _release_view(view)
                else:
                    status = core.call(_read, core.scratch, core.scratch_size, core.result)
                if status != _LARGE_PACKET:
                    break
                core.grow_scratch(core.result.length)   # nothing consumed: read it again with room for it
            if status == _OK:
                return core.scratch_view[: core.result.length], bool(core.result.signal)
            if status == _EMPTY:
                return None
            self._failed(status, core.result)
        finally:
            self._release()
