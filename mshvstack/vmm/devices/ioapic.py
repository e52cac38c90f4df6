"""A userspace I/O APIC whose pins reach the guest as MSIs through irqfds.

On /dev/mshv the hypervisor emulates only the local APICs; the VMM owns the
I/O APIC (as Cloud Hypervisor does).  Each pin is a GSI: its redirection
entry becomes an MSI route (MSHV_SET_MSI_ROUTING), and asserting the pin
signals that GSI's irqfd, so the interrupt is injected without a
hypercall from the device's thread.  Level-triggered pins have a resample
eventfd: the guest's EOI of the vector clears Remote IRR, and a line still
high fires again.
"""

from __future__ import annotations

import enum
import logging
import os
import selectors
import threading
from dataclasses import dataclass
from typing import ClassVar, Protocol

from mshvstack.errors import MshvError
from mshvstack.partition.partition import MsiRoute

log = logging.getLogger(__name__)

BASE, SIZE = 0xFEC00000, 0x1000
PINS = 24
VERSION = 0x20                 # an I/O APIC with the EOI register
MSI_BASE = 0xFEE00000


class Register(enum.IntEnum):
    """Offsets in the I/O APIC's MMIO window."""
    SELECT = 0x00
    WINDOW = 0x10
    EOI = 0x40


class Index(enum.IntEnum):
    """Indirect registers selected through SELECT."""
    ID = 0x00
    VERSION = 0x01
    ARBITRATION = 0x02
    REDIRECTION = 0x10         # two 32-bit halves per pin


class Entry(enum.IntFlag):
    """Redirection-entry bits (Intel 82093AA, 3.2.4)."""
    VECTOR = 0xFF
    DELIVERY_MODE = 0x700
    LOGICAL = 1 << 11
    DELIVERY_STATUS = 1 << 12
    ACTIVE_LOW = 1 << 13
    REMOTE_IRR = 1 << 14
    LEVEL = 1 << 15
    MASKED = 1 << 16


READ_ONLY = Entry.DELIVERY_STATUS | Entry.REMOTE_IRR
DESTINATION_SHIFT = 56
# MSI encoding (Intel SDM 11.11): destination in address[19:12], logical mode in
# address[2]; vector, delivery mode, level-assert and trigger mode in the data.
MSI_DESTINATION_SHIFT, MSI_LOGICAL = 12, 1 << 2
MSI_LEVEL_ASSERT, MSI_LEVEL = 1 << 14, 1 << 15


class IrqPartition(Protocol):
    def set_msi_routing(self, routes: list[MsiRoute]) -> None: ...
    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None: ...
    def remove_irqfd(self, eventfd: int, gsi: int) -> None: ...


def msi_route(pin: int, entry: int) -> MsiRoute:
    """The MSI a redirection entry describes."""
    destination = (entry >> DESTINATION_SHIFT) & 0xFF
    address = MSI_BASE | destination << MSI_DESTINATION_SHIFT | (MSI_LOGICAL if entry & Entry.LOGICAL else 0)
    data = entry & (Entry.VECTOR | Entry.DELIVERY_MODE)
    if entry & Entry.LEVEL:
        data |= MSI_LEVEL | MSI_LEVEL_ASSERT
    return MsiRoute(pin, address, data)


@dataclass(frozen=True)
class IoApicState:
    """The redirection table (remote IRR included), the lines' levels, the id and the selector."""

    VERSION: ClassVar[int] = 1
    apic_id: int
    select: int
    entries: tuple[int, ...]
    lines: tuple[bool, ...]


class IoApic:
    def __init__(self, partition: IrqPartition, apic_id: int = 0) -> None:
        self.partition = partition
        self.apic_id = apic_id
        self.select = 0
        self.entries = [int(Entry.MASKED)] * PINS
        self.lines = [False] * PINS
        self.delivered = [0] * PINS
        # Guards the registers and lines above: the VPs' MMIO exits, the devices (the UART's
        # interrupt, called outside its own lock) and the resampler thread.  The public methods take
        # it, the private ones run with it held; under it only the partition's irqfd/MSI-routing
        # ioctls (the simulator's irqfd lock) and eventfd writes.  Nothing calls back into the
        # I/O APIC from there, so it is not reentrant.
        self._lock = threading.Lock()
        self._trigger = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(PINS)]
        self._resample = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(PINS)]
        self._selector = selectors.DefaultSelector()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._closed = False
        self._resampled = [False] * PINS   # which irqfds carry a resample fd (level pins only)
        for pin in range(PINS):
            partition.irqfd(self._trigger[pin], pin)
            self._selector.register(self._resample[pin], selectors.EVENT_READ, pin)
        self._thread = threading.Thread(target=self._resampler, name="ioapic-resample", daemon=True)
        self._thread.start()

    # ---- the guest's MMIO window
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == Register.SELECT:
                return self.select
            if offset == Register.WINDOW:
                return self._read_indirect(self.select)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == Register.SELECT:
                self.select = value & 0xFF
            elif offset == Register.WINDOW:
                self._write_indirect(self.select, value & 0xFFFFFFFF)
            elif offset == Register.EOI:
                self._eoi(value & 0xFF)

    def _read_indirect(self, index: int) -> int:
        if index == Index.ID:
            return self.apic_id << 24
        if index == Index.VERSION:
            return (PINS - 1) << 16 | VERSION
        if index == Index.ARBITRATION:
            return self.apic_id << 24
        pin, high = divmod(index - Index.REDIRECTION, 2)
        if index < Index.REDIRECTION or pin >= PINS:
            return 0xFFFFFFFF   # no such register: the bus floats
        return (self.entries[pin] >> 32 if high else self.entries[pin]) & 0xFFFFFFFF

    def _write_indirect(self, index: int, value: int) -> None:
        if index == Index.ID:
            self.apic_id = (value >> 24) & 0x0F
            return
        pin, high = divmod(index - Index.REDIRECTION, 2)
        if index < Index.REDIRECTION or pin >= PINS:
            return
        old = self.entries[pin]
        if high:
            new = (value << 32) | (old & 0xFFFFFFFF)
        else:
            new = (old & ~0xFFFFFFFF) | (value & ~int(READ_ONLY)) | (old & READ_ONLY)
        if not new & Entry.LEVEL:
            new &= ~int(Entry.REMOTE_IRR)
        self.entries[pin] = new
        if new != old:
            self._route()
            self._bind(pin)
            if self.lines[pin] and new & Entry.LEVEL:
                self._fire(pin)   # unmasking a high level-triggered line delivers it

    def _route(self) -> None:
        routes = [msi_route(pin, entry) for pin, entry in enumerate(self.entries) if not entry & Entry.MASKED]
        try:
            self.partition.set_msi_routing(routes)
        except MshvError as exc:
            log.warning("I/O APIC: the partition refused the MSI routes: %s", exc)

    def _bind(self, pin: int) -> None:
        """A level-triggered route needs the irqfd with a resample fd; the driver
        accepts one only once the route is level-triggered, so rebind on a change."""
        level = bool(self.entries[pin] & Entry.LEVEL) and not self.entries[pin] & Entry.MASKED
        if level == self._resampled[pin]:
            return
        try:
            self.partition.remove_irqfd(self._trigger[pin], pin)
            self.partition.irqfd(self._trigger[pin], pin, self._resample[pin] if level else None)
            self._resampled[pin] = level
        except MshvError as exc:
            # Some drivers refuse resample irqfds (6.15 refuses all): keep the pin as an edge.
            log.warning("I/O APIC: pin %d bound without resampling: %s", pin, exc)
            try:
                self.partition.irqfd(self._trigger[pin], pin)
            except MshvError as again:
                log.warning("I/O APIC: cannot bind pin %d: %s", pin, again)

    def save(self) -> IoApicState:
        with self._lock:
            return IoApicState(self.apic_id, self.select, tuple(self.entries), tuple(self.lines))

    def restore(self, state: IoApicState) -> None:
        """Take a saved state: the routes and irqfd bindings follow the entries."""
        if len(state.entries) != PINS or len(state.lines) != PINS:
            raise ValueError(f"an I/O APIC state has {PINS} pins, not {len(state.entries)}")
        with self._lock:
            self.apic_id, self.select = state.apic_id & 0x0F, state.select & 0xFF
            self.entries, self.lines = list(state.entries), list(state.lines)
            self._route()
            for pin in range(PINS):
                self._bind(pin)

    # ---- device side
    def set_line(self, pin: int, high: bool) -> None:
        """A device drives pin ``pin``: a rising edge (edge pins) or a high level delivers."""
        with self._lock:
            rising = high and not self.lines[pin]
            self.lines[pin] = high
            entry = self.entries[pin]
            if entry & Entry.LEVEL:
                if high:
                    self._fire(pin)
            elif rising:
                self._fire(pin)

    def pulse(self, pin: int) -> None:
        """One edge on ``pin``, from a device that signals events rather than holding a line."""
        with self._lock:
            self._fire(pin)

    def _fire(self, pin: int) -> None:
        entry = self.entries[pin]
        if entry & Entry.MASKED or (entry & Entry.LEVEL and entry & Entry.REMOTE_IRR):
            return
        if entry & Entry.LEVEL:
            self.entries[pin] = entry | Entry.REMOTE_IRR
        self.delivered[pin] += 1
        os.eventfd_write(self._trigger[pin], 1)

    def _eoi(self, vector: int) -> None:
        for pin, entry in enumerate(self.entries):
            if entry & Entry.LEVEL and entry & Entry.REMOTE_IRR and entry & Entry.VECTOR == vector:
                self.entries[pin] = entry & ~int(Entry.REMOTE_IRR)
                if self.lines[pin]:
                    self._fire(pin)

    def _resampler(self) -> None:
        """The guest EOIed a level-triggered vector (the resample eventfd fired)."""
        while not self._closed:
            for key, _events in self._selector.select():
                try:
                    os.eventfd_read(key.fd)
                except (BlockingIOError, OSError):
                    continue
                if key.data is None:
                    continue   # close() woke us
                with self._lock:
                    self._eoi(self.entries[key.data] & Entry.VECTOR)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._wakeup, 1)
        self._thread.join(timeout=2)
        self._selector.close()
        os.close(self._wakeup)
        for pin in range(PINS):
            try:
                self.partition.remove_irqfd(self._trigger[pin], pin)
            except MshvError:
                pass   # the partition is already gone
            os.close(self._trigger[pin])
            os.close(self._resample[pin])
