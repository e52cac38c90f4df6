"""Ring buffers over guest memory, with the exact VMBus rules.

A ring is a control page followed by data pages.  Indices are byte offsets
into the data area, multiples of 8; each packet is followed by an 8-byte
trailer (its start offset in the upper 32 bits); the ring is never filled
completely (read == write means empty).  The producer signals only on an
empty→non-empty transition while the consumer's interrupt mask is clear;
the consumer signals a producer that published a pending send size once
enough space became free (vmbus_protocol.md §4).

Every value read from the control page is validated before use: a bad
index raises CorruptRing and never causes an access outside the ring.
"""

from __future__ import annotations

import struct
import threading
from typing import Protocol

from mshvstack.abi import ffi, lib
from mshvstack.vmbus.errors import CorruptRing, RingFull
from mshvstack.vmbus.packets import DESCRIPTOR as PACKET_DESCRIPTOR

PAGE = int(lib.VMBUS_PAGE_SIZE)
TRAILER = 8
_OFF_WRITE = ffi.offsetof("struct vmbus_ring_control", "write_index")
_OFF_READ = ffi.offsetof("struct vmbus_ring_control", "read_index")
_OFF_MASK = ffi.offsetof("struct vmbus_ring_control", "interrupt_mask")
_OFF_PENDING = ffi.offsetof("struct vmbus_ring_control", "pending_send_sz")
_OFF_FEATURES = ffi.offsetof("struct vmbus_ring_control", "feature_bits")
DESCRIPTOR = ffi.sizeof("struct vmpacket_descriptor")
_TRAILER = struct.Struct("<Q")
_BARRIER = threading.Lock()   # released at once: taking it is the barrier (a leaf, under any lock)


def full_barrier() -> None:
    """A full memory barrier between our store of one ring field and the load of
    another that the guest, on another CPU, stores the other way round (x86 lets a
    load pass an earlier store; the guest's side has its own barrier): acquiring a
    lock is a locked instruction.  Without it an index update and the check of the
    guest's mask or pending size could both miss the other side's change, and the
    wakeup is lost."""
    with _BARRIER:
        pass


class RingMem(Protocol):
    """The bytes of one ring: control page at 0, data area after it."""

    @property
    def data_size(self) -> int: ...
    def read_control(self, offset: int) -> int: ...            # u32
    def read_indices(self) -> tuple[int, int]: ...             # (write_index, read_index)
    def write_control(self, offset: int, value: int) -> None: ...
    def read_data(self, offset: int, length: int) -> bytes: ...  # no wrap; caller splits
    def write_data(self, offset: int, data: bytes | memoryview) -> None: ...


class FlatRingMem:
    """A ring in a bytearray (tests, tools)."""

    def __init__(self, pages: int) -> None:
        if pages < 2:
            raise ValueError("a ring needs a control page and at least one data page")
        self.buffer = bytearray(pages * PAGE)

    @property
    def data_size(self) -> int:
        return len(self.buffer) - PAGE

    def read_control(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self.buffer, offset)[0])

    def read_indices(self) -> tuple[int, int]:
        return self.read_control(_OFF_WRITE), self.read_control(_OFF_READ)

    def write_control(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.buffer, offset, value & 0xFFFFFFFF)

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
        # One operation on the ring at a time, so a ring is safe by itself (FlatRingMem in tests); in the
        # server every use already runs under the server's lock, which comes first.  A leaf: nothing is
        # called with it held but the ring memory and the barrier below.
        self._lock = threading.Lock()

    def _indices(self) -> tuple[int, int]:
        """(write, read), validated: one read of the control page's first eight bytes."""
        write, read = self.mem.read_indices()
        if write >= self.size or write % 8 or read >= self.size or read % 8:
            raise CorruptRing(f"indices write {write:#x}, read {read:#x} invalid for a {self.size:#x}-byte ring")
        return write, read

    def _index(self, offset: int, what: str) -> int:
        value = self.mem.read_control(offset)
        if value >= self.size or value % 8:
            raise CorruptRing(f"{what} index {value:#x} invalid for a {self.size:#x}-byte ring")
        return value

    def _read_wrapped(self, offset: int, length: int) -> bytes:
        first = min(length, self.size - offset)
        data = self.mem.read_data(offset, first)
        if first < length:
            data += self.mem.read_data(0, length - first)
        return data

    def _write_wrapped(self, offset: int, data: bytes) -> None:
        first = self.size - offset
        if len(data) <= first:
            self.mem.write_data(offset, data)
            return
        view = memoryview(data)
        self.mem.write_data(offset, view[:first])
        self.mem.write_data(0, view[first:])

    def used(self) -> int:
        return (self._index(_OFF_WRITE, "write") - self._index(_OFF_READ, "read")) % self.size


class OutgoingRing(_Ring):
    """Host → guest: the host produces packets, the guest consumes them."""

    def start(self) -> None:
        """At open: advertise pending-send-size support, clear our pending size."""
        self.mem.write_control(_OFF_FEATURES, int(lib.VMBUS_RING_FEAT_PENDING_SEND_SZ))
        self.mem.write_control(_OFF_PENDING, 0)

    def free(self) -> int:
        return self.size - self.used() - TRAILER

    def write(self, packet: bytes) -> bool:
        """Append one packet (length a multiple of 8); True if the guest must be signalled.

        Raises RingFull when there is no room; the caller may then wait for
        the guest's signal (see wait_for_space).
        """
        if len(packet) % 8 or not packet:
            raise ValueError("packets are a non-empty multiple of 8 bytes")
        with self._lock:
            write, read = self._indices()
            free = self.size - (write - read) % self.size - TRAILER
            if len(packet) + TRAILER > free:
                raise RingFull(f"{len(packet) + TRAILER} bytes needed, {free} free")
            self._write_wrapped(write, packet)   # then its trailer: no copy of a large packet to join them
            self._write_wrapped((write + len(packet)) % self.size, _TRAILER.pack(write << 32))
            new_write = (write + len(packet) + TRAILER) % self.size
            self.mem.write_control(_OFF_WRITE, new_write)
            full_barrier()
            # Signal only on empty -> non-empty, and only if the reader wants interrupts.
            if self.mem.read_control(_OFF_MASK):
                return False
            return self._index(_OFF_READ, "read") == write

    def wait_for_space(self, needed: int) -> bool:
        """Publish pending_send_sz; True if the space is already there (no need to wait)."""
        with self._lock:
            self.mem.write_control(_OFF_PENDING, (needed + 7) & ~7)
            full_barrier()
            if self.free() >= needed:
                self.mem.write_control(_OFF_PENDING, 0)
                return True
            return False


class IncomingRing(_Ring):
    """Guest → host: the guest produces packets, the host consumes them."""

    def start(self) -> None:
        self.mem.write_control(_OFF_MASK, 0)

    def read(self) -> tuple[bytes, bool] | None:
        """One packet (descriptor + data, trailer removed) and whether the guest
        must be signalled (it was waiting for the space this read freed)."""
        with self._lock:
            write, read = self._indices()
            available = (write - read) % self.size
            if available == 0:
                return None
            if available < DESCRIPTOR + TRAILER:
                raise CorruptRing(f"{available} bytes available: less than a packet")
            head = self._read_wrapped(read, DESCRIPTOR)
            _type, offset8, len8, _flags, _transaction = PACKET_DESCRIPTOR.unpack(head)
            length = len8 * 8
            if length < DESCRIPTOR or offset8 < 2 or offset8 > len8 or length + TRAILER > available:
                raise CorruptRing(f"packet at {read:#x}: offset8 {offset8}, len8 {len8}, {available} bytes available")
            packet = self._read_wrapped(read, length)
            old_free = self.size - available - TRAILER
            new_read = (read + length + TRAILER) % self.size
            self.mem.write_control(_OFF_READ, new_read)
            full_barrier()
            pending = self.mem.read_control(_OFF_PENDING) & ~7
            new_free = old_free + length + TRAILER
            signal = bool(pending) and old_free < pending <= new_free
            return packet, signal
