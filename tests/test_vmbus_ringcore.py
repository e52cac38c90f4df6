"""The ring's C core (ringcore.c through ring.py) against a reference model of the
VMBus ring rules written here in plain Python.

The ring's pages lie scattered over several host buffers, in any order, among
guard pages; the indices start at any offset, so packets wrap everywhere; the
guest side may write any value into the control page or the data area at any
step.  After every operation the outcome (result, or the exception and its
message) and every byte of the ring equal the model's, and no guard byte moved.
"""

from __future__ import annotations

import mmap
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi
from mshvstack.partition import Mshv
from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import CorruptRing, RingFull
from mshvstack.vmbus.gpadl import GpadlRingMem
from mshvstack.vmbus.ring import DESCRIPTOR, PAGE, TRAILER, FlatRingMem, IncomingRing, OutgoingRing
from mshvstack.vmbus.ringcore import HostBuffer, RingLayout, RingRun

CONTROL = "struct vmbus_ring_control"
WRITE = ffi.offsetof(CONTROL, "write_index")
READ = ffi.offsetof(CONTROL, "read_index")
MASK = ffi.offsetof(CONTROL, "interrupt_mask")
PENDING = ffi.offsetof(CONTROL, "pending_send_sz")
FEATURES = ffi.offsetof(CONTROL, "feature_bits")
U32 = struct.Struct("<I")
GUARD = 0xA5


class ScatteredRingMem:
    """A ring whose control page and data pages sit at the given (buffer, page slot)
    places among guard pages; pages that follow each other in one buffer form one run."""

    def __init__(self, buffer_pages: list[int], places: list[tuple[int, int]]) -> None:
        self.buffers: tuple[HostBuffer, ...] = tuple(mmap.mmap(-1, pages * PAGE) for pages in buffer_pages)
        for buffer in self.buffers:
            buffer[:] = bytes([GUARD]) * len(buffer)
        self.places = places
        self.data_size = (len(places) - 1) * PAGE
        for number, slot in places:
            self.buffers[number][slot * PAGE : (slot + 1) * PAGE] = bytes(PAGE)
        runs: list[RingRun] = []
        for index, (number, slot) in enumerate(places[1:]):
            last = runs[-1] if runs else None
            if last is not None and last.buffer == number and last.host_offset + last.length == slot * PAGE:
                runs[-1] = RingRun(last.data_offset, last.length + PAGE, number, last.host_offset)
            else:
                runs.append(RingRun(index * PAGE, PAGE, number, slot * PAGE))
        control_buffer, control_slot = places[0]
        self.layout = RingLayout(self.data_size, control_buffer, control_slot * PAGE, tuple(runs))

    def _page(self, index: int) -> tuple[HostBuffer, int]:
        buffer, slot = self.places[index]
        return self.buffers[buffer], slot * PAGE

    def control(self) -> bytes:
        buffer, base = self._page(0)
        return bytes(buffer[base : base + PAGE])

    def set_control(self, offset: int, value: int) -> None:
        buffer, base = self._page(0)
        U32.pack_into(buffer, base + offset, value)

    def data(self) -> bytes:
        out = bytearray()
        for page in range(1, len(self.places)):
            buffer, base = self._page(page)
            out += buffer[base : base + PAGE]
        return bytes(out)

    def set_data(self, offset: int, chunk: bytes) -> None:
        for index, byte in enumerate(chunk):
            position = (offset + index) % self.data_size
            buffer, base = self._page(1 + position // PAGE)
            buffer[base + position % PAGE] = byte

    def guards_intact(self) -> bool:
        used = {place for place in self.places}
        for index, buffer in enumerate(self.buffers):
            for slot in range(len(buffer) // PAGE):
                if (index, slot) not in used and buffer[slot * PAGE : (slot + 1) * PAGE] != bytes([GUARD]) * PAGE:
                    return False
        return True

    def close(self) -> None:
        for buffer in self.buffers:
            assert isinstance(buffer, mmap.mmap)
            buffer.close()   # fails (BufferError) if an operation left a buffer held


@dataclass
class RingModel:
    """The ring rules (vmbus_protocol.md §4), on a plain copy of the control words and data."""

    size: int
    write: int
    read: int
    mask: int
    pending: int
    features: int
    data: bytearray

    @classmethod
    def of(cls, mem: ScatteredRingMem) -> RingModel:
        control = mem.control()
        write, read, mask, pending, features = (int(U32.unpack_from(control, offset)[0])
                                                for offset in (WRITE, READ, MASK, PENDING, FEATURES))
        return cls(mem.data_size, write, read, mask, pending, features, bytearray(mem.data()))

    def control_words(self) -> tuple[int, ...]:
        return self.write, self.read, self.mask, self.pending, self.features

    def _valid(self, index: int) -> bool:
        return index < self.size and index % 8 == 0

    def _indices(self) -> tuple[int, int]:
        if not self._valid(self.write) or not self._valid(self.read):
            raise CorruptRing(f"indices write {self.write:#x}, read {self.read:#x} invalid for a {self.size:#x}-byte ring")
        return self.write, self.read

    def _get(self, offset: int, length: int) -> bytes:
        return bytes(self.data[(offset + i) % self.size] for i in range(length))

    def _put(self, offset: int, chunk: bytes) -> None:
        for i, byte in enumerate(chunk):
            self.data[(offset + i) % self.size] = byte

    def used(self) -> int:
        if not self._valid(self.write):
            raise CorruptRing(f"write index {self.write:#x} invalid for a {self.size:#x}-byte ring")
        if not self._valid(self.read):
            raise CorruptRing(f"read index {self.read:#x} invalid for a {self.size:#x}-byte ring")
        return (self.write - self.read) % self.size

    def free(self) -> int:
        return self.size - self.used() - TRAILER

    def do_write(self, packet: bytes) -> bool:
        if not packet or len(packet) % 8:
            raise ValueError("packets are a non-empty multiple of 8 bytes")
        write, read = self._indices()
        free = self.size - (write - read) % self.size - TRAILER
        if len(packet) + TRAILER > free:
            raise RingFull(f"{len(packet) + TRAILER} bytes needed, {free} free")
        self._put(write, packet)
        self._put(write + len(packet), struct.pack("<II", 0, write))   # the trailer: the start in the upper half
        self.write = (write + len(packet) + TRAILER) % self.size
        return not self.mask and read == write   # empty before, and the reader wants interrupts

    def do_read(self) -> tuple[bytes, bool] | None:
        write, read = self._indices()
        available = (write - read) % self.size
        if available == 0:
            return None
        if available < DESCRIPTOR + TRAILER:
            raise CorruptRing(f"{available} bytes available: less than a packet")
        _kind, offset8, len8, _flags, _transaction = struct.unpack("<HHHHQ", self._get(read, DESCRIPTOR))
        length = len8 * 8
        if length < DESCRIPTOR or offset8 < DESCRIPTOR // 8 or offset8 > len8 or length + TRAILER > available:
            raise CorruptRing(f"packet at {read:#x}: offset8 {offset8}, len8 {len8}, {available} bytes available")
        packet = self._get(read, length)
        old_free = self.size - available - TRAILER
        self.read = (read + length + TRAILER) % self.size
        pending = self.pending & ~7
        return packet, bool(pending) and old_free < pending <= old_free + length + TRAILER

    def wait_for_space(self, needed: int) -> bool:
        self.pending = (needed + 7) & ~7 & 0xFFFFFFFF
        if self.free() >= needed:
            self.pending = 0
            return True
        return False


def outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What ``call(*args)`` did: its value (a view read out as bytes), or its exception and message."""
    try:
        value = call(*args)
    except (CorruptRing, RingFull, ValueError) as exc:
        return type(exc).__name__, str(exc)
    if isinstance(value, tuple) and value and isinstance(value[0], memoryview):
        value = (bytes(value[0]), *value[1:])
    return ("ok", value)


U32S = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 8, 16, 24, PAGE - 8, PAGE, PAGE + 8, 3 * PAGE - 8,
                                                              0x7FFFFFF8, 0xFFFFFFF8, 0xFFFFFFFF, 4, 7]))


@st.composite
def scattered_rings(draw: st.DrawFn) -> ScatteredRingMem:
    """Control page + 1..3 data pages, spread over 1..3 buffers among guard pages, in any order."""
    pages = 1 + draw(st.integers(1, 3))
    buffer_pages = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    slots = [(buffer, slot) for buffer, count in enumerate(buffer_pages) for slot in range(count)]
    while len(slots) < pages:   # room for every page: grow the last buffer
        buffer_pages[-1] += 1
        slots.append((len(buffer_pages) - 1, buffer_pages[-1] - 1))
    contiguous = draw(st.booleans())
    places = slots[:pages] if contiguous else draw(st.permutations(slots))[:pages]
    return ScatteredRingMem(buffer_pages, places)


OPERATIONS = ["write", "write", "write", "read", "read", "read", "used", "free", "wait", "mask", "pending",
              "guest_index", "guest_data", "guest_descriptor", "read_at_the_edge"]
NEAR = st.sampled_from([-16, -8, 0, 8, 16])


@settings(max_examples=250, deadline=None)
@given(mem=scattered_rings(), data=st.data())
def test_the_core_follows_the_model_on_scattered_rings_and_hostile_guests(mem: ScatteredRingMem, data: st.DataObject) -> None:
    try:
        size = mem.data_size
        if data.draw(st.booleans(), label="hostile start"):
            for offset in (WRITE, READ, MASK, PENDING):
                mem.set_control(offset, data.draw(U32S))
            mem.set_data(0, random.Random(data.draw(st.integers(0, 1 << 30))).randbytes(size))
        else:   # a clean ring whose indices start anywhere: packets wrap at every offset
            start = data.draw(st.integers(0, size // 8 - 1), label="start") * 8
            mem.set_control(WRITE, start)
            mem.set_control(READ, start)
        model = RingModel.of(mem)
        writer, reader = OutgoingRing(mem), IncomingRing(mem)
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            operation = data.draw(st.sampled_from(OPERATIONS))
            if operation == "write":
                length = data.draw(st.one_of(st.integers(0, 300), st.integers(size - 64, size)), label="payload")
                packet = packets.inband(bytes([length & 0xFF]) * length, transaction_id=length)
                assert outcome(writer.write, packet) == outcome(model.do_write, packet)
            elif operation == "read":
                assert outcome(reader.read) == outcome(model.do_read)
            elif operation == "read_at_the_edge":   # the writer waits for about the space free now, then a read
                free_now = size - (model.write - model.read) % size - TRAILER
                model.pending = max(0, free_now + data.draw(NEAR)) & 0xFFFFFFFF
                mem.set_control(PENDING, model.pending)
                assert outcome(reader.read) == outcome(model.do_read)
            elif operation == "used":
                assert outcome(writer.used) == outcome(model.used)
            elif operation == "free":
                assert outcome(writer.free) == outcome(model.free)
            elif operation == "wait":
                needed = data.draw(st.integers(0, size + 16), label="needed")
                assert outcome(writer.wait_for_space, needed) == outcome(model.wait_for_space, needed)
            elif operation == "mask":
                model.mask = data.draw(st.sampled_from([0, 1, 0xFFFFFFFF]))
                mem.set_control(MASK, model.mask)
            elif operation == "pending":   # anything, or about the space free now (the signal's edges)
                free_now = size - (model.write - model.read) % size - TRAILER
                near = max(0, free_now + data.draw(NEAR)) & 0xFFFFFFFF
                model.pending = data.draw(st.one_of(st.integers(0, size + 16), U32S, st.just(near)))
                mem.set_control(PENDING, model.pending)
            elif operation == "guest_index":   # the guest writes any value into an index
                offset = data.draw(st.sampled_from([WRITE, READ]))
                value = data.draw(U32S)
                mem.set_control(offset, value)
                setattr(model, "write" if offset == WRITE else "read", value)
            elif operation == "guest_descriptor":   # a descriptor at the read index, its fields about their limits
                available = (model.write - model.read) % size
                len8 = max(0, available // 8 - 1 + data.draw(NEAR) // 8)
                offset8 = max(0, data.draw(st.sampled_from([0, 1, 2, 3, len8 - 1, len8, len8 + 1])))
                descriptor = struct.pack("<HHHHQ", packets.INBAND, offset8 & 0xFFFF, len8 & 0xFFFF, 0, 0)
                mem.set_data(model.read % size, descriptor)
                model._put(model.read % size, descriptor)
            else:   # the guest scribbles over the data area (a descriptor, perhaps)
                offset = data.draw(st.integers(0, size - 1))
                chunk = data.draw(st.binary(min_size=1, max_size=24))
                mem.set_data(offset, chunk)
                model._put(offset, chunk)
            control = mem.control()
            assert tuple(U32.unpack_from(control, offset)[0] for offset in (WRITE, READ, MASK, PENDING, FEATURES)) == \
                model.control_words()
            assert mem.data() == bytes(model.data)
            assert mem.guards_intact()
    finally:
        mem.close()


@settings(max_examples=60, deadline=None)
@given(mem=scattered_rings())
def test_start_writes_only_the_fields_it_owns(mem: ScatteredRingMem) -> None:
    try:
        mem.set_control(MASK, 1)
        mem.set_control(PENDING, 0x40)
        before = mem.control()
        OutgoingRing(mem).start()
        IncomingRing(mem).start()
        after = mem.control()
        assert U32.unpack_from(after, FEATURES)[0] == 1 and U32.unpack_from(after, PENDING)[0] == 0
        assert U32.unpack_from(after, MASK)[0] == 0
        changed = {offset for offset in range(0, PAGE, 4) if before[offset : offset + 4] != after[offset : offset + 4]}
        assert changed <= {FEATURES, PENDING, MASK}
        assert mem.guards_intact()
    finally:
        mem.close()


def test_a_read_view_lasts_until_the_next_read_and_parsed_packets_own_their_bytes() -> None:
    mem = FlatRingMem(3)
    writer, reader = OutgoingRing(mem), IncomingRing(mem)
    writer.write(packets.inband(b"first packet", transaction_id=1))
    writer.write(packets.inband(b"second", transaction_id=2))
    item = reader.read()
    assert item is not None
    view, _signal = item
    assert view.readonly
    parsed = packets.parse(view)
    assert isinstance(parsed.payload, bytes) and parsed.payload.rstrip(b"\0") == b"first packet"
    reader.read()
    assert parsed.payload.rstrip(b"\0") == b"first packet"   # the view was reused; the packet was not


def test_a_large_packet_grows_the_scratch_buffer_and_reads_whole() -> None:
    mem = FlatRingMem(1 + 64)
    writer, reader = OutgoingRing(mem), IncomingRing(mem)
    for length in (100, 40000, 200, 250000, 8):
        payload = random.Random(length).randbytes(length)
        writer.write(packets.inband(payload, transaction_id=length))
        item = reader.read()
        assert item is not None
        parsed = packets.parse(item[0])
        assert parsed.transaction_id == length and parsed.payload[:length] == payload


def test_a_buffer_that_shrank_is_an_error_not_an_access_outside() -> None:
    """The core takes each buffer's size per operation: a run past the end is refused."""
    buffer = bytearray(3 * PAGE)
    layout = RingLayout(2 * PAGE, 0, 0, (RingRun(0, 2 * PAGE, 0, PAGE),))

    class Mem:
        data_size = 2 * PAGE

        def __init__(self) -> None:
            self.layout = layout
            self.buffers: tuple[HostBuffer, ...] = (buffer,)

    ring = OutgoingRing(Mem())
    ring.write(packets.inband(b"fits"))
    del buffer[2 * PAGE :]
    with pytest.raises(ValueError, match="do not fit its host memory"):
        ring.write(packets.inband(b"x" * 100))


@pytest.mark.parametrize("layout, why", [
    (RingLayout(2 * PAGE, 0, 0, (RingRun(0, PAGE, 0, PAGE),)), "cover"),
    (RingLayout(2 * PAGE, 0, 0, (RingRun(0, PAGE, 0, PAGE), RingRun(PAGE + 8, PAGE - 8, 0, 2 * PAGE))), "continue"),
    (RingLayout(2 * PAGE, 0, 0, (RingRun(0, 2 * PAGE, 0, 2 * PAGE),)), "continue"),
    (RingLayout(2 * PAGE, 1, 0, (RingRun(0, 2 * PAGE, 0, PAGE),)), "control page"),
    (RingLayout(2 * PAGE, 0, 3 * PAGE, (RingRun(0, 2 * PAGE, 0, PAGE),)), "control page"),
    (RingLayout(2 * PAGE + 4, 0, 0, (RingRun(0, 2 * PAGE + 4, 0, PAGE),)), "data area"),
])
def test_layouts_that_do_not_fit_their_buffers_are_refused(layout: RingLayout, why: str) -> None:
    class Mem:
        data_size = layout.data_size

        def __init__(self) -> None:
            self.layout = layout
            self.buffers: tuple[HostBuffer, ...] = (bytearray(3 * PAGE),)

    with pytest.raises((ValueError, CorruptRing), match=why):
        OutgoingRing(Mem())


def test_read_only_buffers_are_refused() -> None:
    class Mem:
        data_size = PAGE
        layout = RingLayout(PAGE, 0, 0, (RingRun(0, PAGE, 0, PAGE),))
        buffers = (mmap.mmap(-1, 2 * PAGE, prot=mmap.PROT_READ),)

    with pytest.raises(ValueError, match="writable"):
        OutgoingRing(Mem())


def test_a_ring_over_two_memory_regions_and_memory_taken_away() -> None:
    """GpadlRingMem over pages from two regions (two mappings); between operations no
    mapping stays held (unmap succeeds, even after a corrupt ring), and once the
    memory is gone an operation raises ValueError."""
    with Mshv.open("sim") as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(0, 16 * PAGE)
        high = part.map_memory(32 * PAGE, 16 * PAGE)
        pfns = (33, 2, 34, 3, 4, 40)   # control in the second region; data alternating between them
        writer = OutgoingRing(GpadlRingMem(part.memory, pfns))
        reader_mem = GpadlRingMem(part.memory, pfns)
        reader = IncomingRing(reader_mem)
        assert len(reader_mem.buffers) == 2 and len(reader_mem.layout.runs) == 4
        for length in range(0, 5 * PAGE, 997):
            payload = bytes([length & 0xFF]) * length
            writer.write(packets.inband(payload, transaction_id=length))
            item = reader.read()
            assert item is not None and packets.parse(item[0]).payload[:length] == payload
        reader_mem.write_control(WRITE, 3)   # corrupt: the read fails, holding nothing
        with pytest.raises(CorruptRing):
            reader.read()
        part.unmap_memory(high)
        with pytest.raises(ValueError):
            reader.read()
        with pytest.raises(ValueError):
            writer.write(packets.inband(b"gone"))
