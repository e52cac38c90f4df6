"""Ring buffers: a hypothesis state machine of one producer and one consumer
over the same ring memory, against a queue model; plus corrupt-index cases."""

from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import CorruptRing, RingFull
from mshvstack.vmbus.ring import PAGE, FlatRingMem, IncomingRing, OutgoingRing

_OFF_WRITE, _OFF_READ, _OFF_MASK, _OFF_PENDING = 0, 4, 8, 12


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = FlatRingMem(2)  # one data page: wraps often
        self.writer = OutgoingRing(self.mem)
        self.reader = IncomingRing(self.mem)
        self.writer.start()
        self.model: deque[bytes] = deque()
        self.counter = 0

    @rule(size=st.integers(0, 1200), mask=st.booleans())
    def write(self, size: int, mask: bool) -> None:
        self.mem.write_control(_OFF_MASK, int(mask))
        self.counter += 1
        packet = packets.inband(bytes([self.counter & 0xFF]) * size, transaction_id=self.counter)
        was_empty = not self.model
        used = sum(len(p) + 8 for p in self.model)
        try:
            signal = self.writer.write(packet)
        except RingFull:
            assert used + len(packet) + 8 > PAGE - 8  # refused only when it really does not fit
            return
        assert used + len(packet) + 8 <= PAGE - 8  # never completely full
        self.model.append(packet)
        assert signal == (was_empty and not mask)

    @precondition(lambda self: self.model)
    @rule()
    def read(self) -> None:
        item = self.reader.read()
        assert item is not None
        raw, _signal = item
        assert raw == self.model.popleft()
        parsed = packets.parse(raw)
        assert parsed.transaction_id & 0xFF == raw[8]

    @rule(needed=st.integers(8, PAGE - 16))
    def producer_waits(self, needed: int) -> None:
        ready = self.writer.wait_for_space(needed)
        free = PAGE - 8 - sum(len(p) + 8 for p in self.model)
        assert ready == (free >= needed)
        if not ready:
            # Drain until the consumer reports the space: it must signal exactly once.
            signals = 0
            while self.model:
                raw, signal = self.reader.read()  # type: ignore[misc]
                self.model.popleft()
                signals += signal
                if PAGE - 8 - sum(len(p) + 8 for p in self.model) >= needed:
                    break
            assert signals == 1
            self.mem.write_control(_OFF_PENDING, 0)

    @invariant()
    def indices_are_consistent(self) -> None:
        used = (self.mem.read_control(_OFF_WRITE) - self.mem.read_control(_OFF_READ)) % PAGE
        assert used == sum(len(p) + 8 for p in self.model)
        assert self.mem.read_control(_OFF_WRITE) % 8 == 0


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("write, read", [(3, 0), (0, PAGE), (PAGE + 8, 0), (0, 4)])
def test_corrupt_indices_are_rejected(write: int, read: int) -> None:
    mem = FlatRingMem(2)
    mem.write_control(_OFF_WRITE, write)
    mem.write_control(_OFF_READ, read)
    with pytest.raises(CorruptRing):
        IncomingRing(mem).read()
    with pytest.raises(CorruptRing):
        OutgoingRing(mem).write(packets.inband(b"x"))


@settings(max_examples=200, deadline=None)
@given(header=st.binary(min_size=16, max_size=16), write=st.integers(0, PAGE // 8 - 1))
def test_garbage_descriptors_never_escape(header: bytes, write: int) -> None:
    mem = FlatRingMem(2)
    mem.write_data(0, header + bytes(64))
    mem.write_control(_OFF_WRITE, write * 8)
    try:
        item = IncomingRing(mem).read()
        if item is not None:
            packets.parse(item[0])
    except CorruptRing:
        pass


def test_packet_parsing_validates_gpa_direct() -> None:
    payload = b"p" * 16
    ranges = struct.pack("<IIQQ", 5000, 100, 0x10, 0x11)
    header = struct.pack("<HHHHQII", 9, (24 + len(ranges)) // 8, (24 + len(ranges) + len(payload)) // 8, 1, 7, 0, 1)
    parsed = packets.parse(header + ranges + payload)
    assert parsed.ranges[0].pfns == (0x10, 0x11) and parsed.payload == payload and parsed.completion_requested
    bad = struct.pack("<HHHHQII", 9, (24 + len(ranges)) // 8, (24 + len(ranges) + len(payload)) // 8, 1, 7, 0, 5)
    with pytest.raises(CorruptRing):
        packets.parse(bad + ranges + payload)
    with pytest.raises(CorruptRing):
        packets.parse(struct.pack("<HHHHQ", 0x4, 2, 2, 0, 0))  # type not accepted


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * PAGE - 1), st.binary(min_size=1, max_size=PAGE)), min_size=1, max_size=12))
def test_gpadl_ring_memory_reads_and_writes_alike_in_one_run_or_scattered(
        accesses: list[tuple[int, bytes]]) -> None:
    """A ring whose pages are contiguous in guest RAM is accessed with single slices,
    one scattered over RAM piece by piece: both see and write the same bytes."""
    from mshvstack.partition import Mshv
    from mshvstack.vmbus.gpadl import GpadlRingMem

    with Mshv.open("sim") as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(0, 64 * PAGE)
        contiguous = GpadlRingMem(part.memory, (1, 2, 3, 4))
        scattered = GpadlRingMem(part.memory, (10, 20, 15, 30))
        for offset, data in accesses:
            data = data[: 3 * PAGE - offset]
            contiguous.write_data(offset, data)
            scattered.write_data(offset, data)
            assert contiguous.read_data(offset, len(data)) == scattered.read_data(offset, len(data)) == data
        assert contiguous.read_data(0, 3 * PAGE) == scattered.read_data(0, 3 * PAGE)
        with pytest.raises(ValueError):
            contiguous.read_data(3 * PAGE - 8, 16)
