"""The I/O APIC: redirection entries become MSI routes, pins signal irqfds."""

from __future__ import annotations

import os
import select
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.partition.partition import MsiRoute
from mshvstack.vmm.devices.ioapic import PINS, Entry, IoApic, Register, msi_route


class RecordingPartition:
    """What the I/O APIC asks of the partition, recorded (the driver's side is tested elsewhere)."""

    def __init__(self) -> None:
        self.routes: list[MsiRoute] = []
        self.irqfds: dict[int, tuple[int, int | None]] = {}

    def set_msi_routing(self, routes: list[MsiRoute]) -> None:
        self.routes = list(routes)

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        assert gsi not in self.irqfds
        if resample_fd is not None:   # the driver's rule: resample needs a level-triggered route
            assert any(r.gsi == gsi and r.data & (1 << 15) for r in self.routes)
        self.irqfds[gsi] = (eventfd, resample_fd)

    def remove_irqfd(self, eventfd: int, gsi: int) -> None:
        assert self.irqfds.pop(gsi)[0] == eventfd


def _program(ioapic: IoApic, pin: int, entry: int) -> None:
    ioapic.write(Register.SELECT, 4, 0x10 + 2 * pin + 1)
    ioapic.write(Register.WINDOW, 4, entry >> 32)
    ioapic.write(Register.SELECT, 4, 0x10 + 2 * pin)
    ioapic.write(Register.WINDOW, 4, entry & 0xFFFFFFFF)


def _signals(partition: RecordingPartition, pin: int) -> int:
    fd = partition.irqfds[pin][0]
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


def _ioapic() -> tuple[IoApic, RecordingPartition]:
    partition = RecordingPartition()
    return IoApic(partition), partition


def test_identity_and_reset_state() -> None:
    ioapic, partition = _ioapic()
    try:
        ioapic.write(Register.SELECT, 4, 0x01)
        assert ioapic.read(Register.WINDOW, 4) == (PINS - 1) << 16 | 0x20
        ioapic.write(Register.SELECT, 4, 0x10)
        assert ioapic.read(Register.WINDOW, 4) & Entry.MASKED   # every pin starts masked
        assert sorted(partition.irqfds) == list(range(PINS)) and partition.routes == []
        ioapic.write(Register.SELECT, 4, 0x10 + 2 * PINS)
        assert ioapic.read(Register.WINDOW, 4) == 0xFFFFFFFF   # past the table
    finally:
        ioapic.close()


def test_edge_pin_routes_and_signals_its_irqfd() -> None:
    ioapic, partition = _ioapic()
    try:
        ioapic.pulse(4)
        assert _signals(partition, 4) == 0   # masked: nothing reaches the guest
        _program(ioapic, 4, 0x34 | (3 << 56) | Entry.LOGICAL)
        assert partition.routes == [MsiRoute(4, 0xFEE00000 | 3 << 12 | 1 << 2, 0x34)]
        ioapic.pulse(4)
        ioapic.pulse(4)
        assert _signals(partition, 4) == 2 and ioapic.delivered[4] == 2
        ioapic.set_line(4, True)
        ioapic.set_line(4, True)   # held high: one edge
        assert _signals(partition, 4) == 1
    finally:
        ioapic.close()


def test_level_pin_waits_for_eoi_and_refires_while_high() -> None:
    ioapic, partition = _ioapic()
    try:
        _program(ioapic, 9, 0x39 | Entry.LEVEL)
        assert partition.routes == [msi_route(9, 0x39 | Entry.LEVEL)] and partition.routes[0].data & (1 << 14)
        assert partition.irqfds[9][1] is not None   # rebound with a resample fd
        ioapic.set_line(9, True)
        ioapic.set_line(9, True)
        assert _signals(partition, 9) == 1
        ioapic.write(Register.SELECT, 4, 0x10 + 18)
        assert ioapic.read(Register.WINDOW, 4) & Entry.REMOTE_IRR
        ioapic.write(Register.EOI, 4, 0x39)   # still high: delivered again
        assert _signals(partition, 9) == 1
        ioapic.set_line(9, False)
        ioapic.write(Register.EOI, 4, 0x39)
        assert _signals(partition, 9) == 0
        _program(ioapic, 9, 0x39)   # back to edge: the resample fd goes
        assert partition.irqfds[9][1] is None
    finally:
        ioapic.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x00, 0x10, 0x40, 0x20, 0xFFC]), st.integers(0, 2**32 - 1)), max_size=40),
       st.lists(st.tuples(st.integers(0, PINS - 1), st.booleans()), max_size=20))
def test_any_register_traffic_keeps_the_table_consistent(writes: list[tuple[int, int]], lines: list[Any]) -> None:
    ioapic, partition = _ioapic()
    try:
        for offset, value in writes:
            ioapic.write(offset, 4, value)
            ioapic.read(Register.WINDOW, 4)
        for pin, high in lines:
            ioapic.set_line(pin, high)
        unmasked = [pin for pin, entry in enumerate(ioapic.entries) if not entry & Entry.MASKED]
        assert [r.gsi for r in partition.routes] == unmasked
        for pin, entry in enumerate(ioapic.entries):
            assert 0 <= entry < 2**64
            assert (partition.irqfds[pin][1] is not None) == (pin in unmasked and bool(entry & Entry.LEVEL))
    finally:
        ioapic.close()
