"""The local APIC the hypervisor emulates for each VP (partition flag LAPIC).

On Hyper-V the hypervisor, not the VMM, owns the LAPIC: interrupt request
and in-service registers with priorities, EOI, the timer, and IPIs between
VPs.  Reached through x2APIC MSRs (0x800-0x8FF), the xAPIC MMIO page and the
Hyper-V EOI/ICR/TPR MSRs.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

XAPIC_BASE = 0xFEE00000
X2APIC_MSR_BASE = 0x800

# Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset/16).
VERSION_VALUE = 0x50014  # version 0x14 (integrated APIC), max LVT entry 5
ID, VERSION, TPR, PPR, EOI, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0
ISR0, TMR0, IRR0, ESR, ICR_LOW, ICR_HIGH = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE, SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0

LVT_MASKED = 1 << 16
TIMER_PERIODIC = 1 << 17
SVR_ENABLED = 1 << 8
# The timer counts at this rate before the divider (a 1 GHz bus, as Hyper-V reports).
TIMER_HZ = 1_000_000_000
# Divide configuration: bits 0, 1 and 3 form a 3-bit code.
_DIVIDERS = {0b000: 2, 0b001: 4, 0b010: 8, 0b011: 16, 0b100: 32, 0b101: 64, 0b110: 128, 0b111: 1}

# The interrupt command register (SDM vol. 3A, 10.6.1).
ICR_VECTOR = 0xFF
ICR_MODE_SHIFT = 8
ICR_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
XAPIC_DESTINATION_SHIFT = 56     # xAPIC: an 8-bit destination in ICR bits 56-63
X2APIC_DESTINATION_SHIFT = 32    # x2APIC: a 32-bit destination in ICR bits 32-63
XAPIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF
# DFR bits 28-31: the logical destination model of an xAPIC.
DFR_MODEL_SHIFT = 28
DFR_RESERVED_ONES = 0x0FFFFFFF
# x2APIC logical ids: cluster (id / 16) in bits 16-31, one bit of 16 within the cluster.
X2APIC_CLUSTER_MEMBERS = 16


class DeliveryMode(enum.IntEnum):
    """ICR / MSI delivery modes (the same numbers as HV_X64_INTERRUPT_TYPE_*)."""

    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    REMOTE_READ = 3
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class Shorthand(enum.IntEnum):
    """ICR bits 18-19."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


class DestinationModel(enum.IntEnum):
    """xAPIC DFR bits 28-31."""

    CLUSTER = 0x0
    FLAT = 0xF


class IpiSender(Protocol):
    """The partition's interrupt router, as a LAPIC sends through it."""

    def __call__(self, destination: int, vector: int, mode: int, logical: bool = False, *,
                 wide: bool | None = None, shorthand: Shorthand = Shorthand.NONE,
                 source: int | None = None) -> object: ...


def x2apic_logical_id(apic_id: int) -> int:
    """The x2APIC LDR, derived from the APIC id (SDM vol. 3A, 10.12.10.2)."""
    cluster, member = divmod(apic_id, X2APIC_CLUSTER_MEMBERS)
    return (cluster << 16) | (1 << member)


LVT_ORDER = (LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)


@dataclass(frozen=True)
class LapicState:
    """Everything a LAPIC holds but its id and mode, as saved and restored (the
    timer as its current count: a deadline means nothing on another host)."""

    VERSION: ClassVar[int] = 1
    irr: int = 0
    isr: int = 0
    tpr: int = 0
    svr: int = 0xFF
    ldr: int = 0
    dfr: int = 0xFFFFFFFF
    esr: int = 0
    icr: int = 0
    lvt: tuple[int, ...] = (LVT_MASKED,) * len(LVT_ORDER)   # in LVT_ORDER
    timer_initial: int = 0
    timer_divide: int = 0
    timer_current: int = 0
    nmi_pending: bool = False


class Lapic:
    def __init__(self, apic_id: int, send_ipi: IpiSender, wake: Callable[[], None],
                 arrived: Callable[[], None] | None = None) -> None:
        self.apic_id = apic_id
        self._send_ipi = send_ipi
        self._wake = wake                        # the VP must look at its LAPIC again (timers too)
        self._arrived = arrived or wake          # an interrupt arrived in IRR: only what to deliver changed
        # IRR and ISR, which other threads change (an interrupt accepted from another VP, the
        # irqfd worker, the VMM); the rest is the VP's own thread's.  A leaf: _wake() is called
        # after it is released.
        self._lock = threading.Lock()
        self.x2apic = False   # the mode APIC_BASE selects (set by the VP)
        self.auto_eoi = 0     # vectors of SINTs with auto-EOI: taken without entering service (no EOI follows)
        self.reset()

    def reset(self) -> None:
        """Power-up and INIT state: everything but the APIC id, the mode and the
        auto-EOI vectors (SynIC state) returns to its reset value (SDM vol. 3A, 10.4.7.1)."""
        with self._lock:
            self.irr = 0  # 256-bit sets as ints
            self.isr = 0
        self.tpr = 0
        self.svr = 0xFF
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.esr = 0
        self.icr = 0
        self.lvt = {LVT_TIMER: LVT_MASKED, LVT_THERMAL: LVT_MASKED, LVT_PERF: LVT_MASKED,
                    LVT_LINT0: LVT_MASKED, LVT_LINT1: LVT_MASKED, LVT_ERROR: LVT_MASKED}
        self.timer_initial = 0
        self.timer_divide = 0
        self._timer_start = 0
        self._timer_deadline: int | None = None
        self.nmi_pending = False

    def save(self) -> LapicState:
        with self._lock:
            irr, isr = self.irr, self.isr
        return LapicState(irr=irr, isr=isr, tpr=self.tpr, svr=self.svr, ldr=self.ldr, dfr=self.dfr, esr=self.esr,
                          icr=self.icr, lvt=tuple(self.lvt[n] for n in LVT_ORDER), timer_initial=self.timer_initial,
                          timer_divide=self.timer_divide, timer_current=self._current_count(),
                          nmi_pending=self.nmi_pending)

    def restore(self, state: LapicState) -> None:
        with self._lock:
            self.irr, self.isr = state.irr, state.isr
        self.tpr, self.svr, self.ldr, self.dfr, self.esr, self.icr = (state.tpr, state.svr, state.ldr, state.dfr,
                                                                      state.esr, state.icr)
        self.lvt = dict(zip(LVT_ORDER, state.lvt))
        self.timer_initial, self.timer_divide = state.timer_initial, state.timer_divide
        self.nmi_pending = state.nmi_pending
        current = min(state.timer_current, state.timer_initial)
        now = time.monotonic_ns()
        if current and self.timer_initial:
            to_ns = self._divider() * 1_000_000_000 // TIMER_HZ   # the counter's period
            self._timer_start = now - (self.timer_initial - current) * to_ns
            self._timer_deadline = now + current * to_ns
        else:
            self._timer_start, self._timer_deadline = now, None
        self._wake()

    # ---- addressing
    @property
    def logical_id(self) -> int:
        """The LDR as the guest reads it (x2APIC: derived from the APIC id, read-only)."""
        return x2apic_logical_id(self.apic_id) if self.x2apic else self.ldr

    def accepts(self, destination: int, logical: bool, wide: bool) -> bool:
        """Whether an interrupt addressed to ``destination`` is for this APIC.

        ``wide``: a 32-bit x2APIC destination (x2APIC ICR), else an 8-bit
        xAPIC one (xAPIC ICR, MSI address).  Physical: the APIC id, or the
        broadcast id.  Logical: xAPIC flat (a bit of the LDR's top byte) or
        cluster (the top nibble names the cluster, the low nibble members),
        x2APIC cluster (bits 16-31 the cluster, 0-15 members)."""
        if destination == (X2APIC_BROADCAST if wide else XAPIC_BROADCAST):
            return True
        if not logical:
            return destination == self.apic_id
        if self.x2apic:
            ldr = self.logical_id
            return destination >> 16 == ldr >> 16 and bool(destination & ldr & 0xFFFF)
        destination &= 0xFF
        mine = self.ldr >> 24
        if self.dfr >> DFR_MODEL_SHIFT == DestinationModel.FLAT:
            return bool(destination & mine)
        if self.dfr >> DFR_MODEL_SHIFT == DestinationModel.CLUSTER:
            return destination >> 4 == mine >> 4 and bool(destination & mine & 0xF)
        return False   # a reserved model matches nothing

    def processor_priority(self) -> int:
        with self._lock:
            return max(self.tpr & 0xF0, self._highest(self.isr) & 0xF0 if self.isr else 0)

    # ---- interrupt flow
    def accept(self, vector: int) -> None:
        """An interrupt arrives for this VP (IRR)."""
        with self._lock:
            self.irr |= 1 << (vector & 0xFF)
        self._arrived()

    @staticmethod
    def _highest(bits: int) -> int:
        return bits.bit_length() - 1

    def deliverable(self) -> int | None:
        """The vector the CPU would take now (IRR above the processor priority)."""
        self.poll_timer()
        if not self.irr:   # an int read is atomic; a concurrent accept() also notifies the VP
            return None
        with self._lock:
            if not self.irr:
                return None
            vector = self._highest(self.irr)
            ppr = max(self.tpr & 0xF0, self._highest(self.isr) & 0xF0 if self.isr else 0)
            if (vector & 0xF0) <= ppr:
                return None
            return vector

    def acknowledge(self, vector: int) -> None:
        """The CPU takes ``vector``: IRR → ISR (unless the vector is auto-EOI)."""
        with self._lock:
            self.irr &= ~(1 << vector)
            if not self.auto_eoi & (1 << vector):
                self.isr |= 1 << vector

    def eoi(self) -> int | None:
        with self._lock:
            if not self.isr:
                return None
            vector = self._highest(self.isr)
            self.isr &= ~(1 << vector)
            return vector

    # ---- timer
    def _divider(self) -> int:
        return _DIVIDERS[((self.timer_divide >> 1) & 0b100) | (self.timer_divide & 0b11)]

    def _period_ns(self) -> int:
        return self.timer_initial * self._divider() * 1_000_000_000 // TIMER_HZ

    def _arm(self) -> None:
        self._timer_start = time.monotonic_ns()
        self._timer_deadline = self._timer_start + self._period_ns() if self.timer_initial else None

    def timer_deadline(self) -> int | None:
        """The next expiry; an expired timer fires first, so this is never in the past
        (a stale deadline would give the CPU zero-length time slices forever)."""
        return self.poll_timer()

    def poll_timer(self) -> int | None:
        """Fire the timer if it is due; its next deadline (monotonic ns), never in the past."""
        deadline = self._timer_deadline
        if deadline is None or time.monotonic_ns() < deadline:
            return deadline
        lvt = self.lvt[LVT_TIMER]
        if lvt & TIMER_PERIODIC and self.timer_initial:
            period = max(self._period_ns(), 1)
            now = time.monotonic_ns()
            self._timer_start = now
            self._timer_deadline = deadline + period * (1 + (now - deadline) // period)
        else:
            self._timer_deadline = None
        if not lvt & LVT_MASKED:
            with self._lock:
                self.irr |= 1 << (lvt & 0xFF)
        return self._timer_deadline

    def _current_count(self) -> int:
        if self._timer_deadline is None or not self.timer_initial:
            return 0
        elapsed = (time.monotonic_ns() - self._timer_start) * TIMER_HZ // 1_000_000_000 // self._divider()
        return max(self.timer_initial - elapsed, 0)

    # ---- register access (offset in the xAPIC page)
    def read(self, offset: int) -> int:
        if offset == ID:
            return self.apic_id if self.x2apic else self.apic_id << 24
        if offset == VERSION:
            return VERSION_VALUE
        if offset == TPR:
            return self.tpr
        if offset == PPR:
            return self.processor_priority()
        if offset == LDR:
            return self.logical_id
        if offset == DFR:
            return self.dfr
        if offset == SVR:
            return self.svr
        if ISR0 <= offset < ISR0 + 0x80:
            return (self.isr >> (32 * ((offset - ISR0) // 16))) & 0xFFFFFFFF
        if IRR0 <= offset < IRR0 + 0x80:
            return (self.irr >> (32 * ((offset - IRR0) // 16))) & 0xFFFFFFFF
        if TMR0 <= offset < TMR0 + 0x80:
            return 0
        if offset == ESR:
            return self.esr
        if offset == ICR_LOW:
            return self.icr & 0xFFFFFFFF
        if offset == ICR_HIGH:
            return self.icr >> 32
        if offset in self.lvt:
            return self.lvt[offset]
        if offset == TIMER_INITIAL:
            return self.timer_initial
        if offset == TIMER_CURRENT:
            return self._current_count()
        if offset == TIMER_DIVIDE:
            return self.timer_divide
        return 0

    def write(self, offset: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == TPR:
            self.tpr = value & 0xFF
        elif offset == EOI:
            self.eoi()
        elif offset == LDR:
            if not self.x2apic:   # read-only in x2APIC mode
                self.ldr = value & 0xFF000000
        elif offset == DFR:
            if not self.x2apic:   # no DFR in x2APIC mode
                self.dfr = value | DFR_RESERVED_ONES
        elif offset == SVR:
            self.svr = value & 0x13FF
        elif offset == ESR:
            self.esr = 0
        elif offset == ICR_HIGH:
            self.icr = (self.icr & 0xFFFFFFFF) | value << 32
        elif offset == ICR_LOW:
            self.icr = (self.icr & ~0xFFFFFFFF) | value
            self._ipi(self.icr)
        elif offset in self.lvt:
            self.lvt[offset] = value & (0x710FF if offset == LVT_TIMER else 0x1F7FF)
        elif offset == TIMER_INITIAL:
            self.timer_initial = value
            self._arm()
        elif offset == TIMER_DIVIDE:
            self.timer_divide = value & 0b1011
        elif offset == SELF_IPI:
            self.accept(value & 0xFF)
        self._wake()

    def write_icr64(self, value: int) -> None:
        """A 64-bit ICR write (x2APIC MSR 0x830, or Hyper-V's ICR MSR): the
        destination is in bits 32-63 in x2APIC mode, bits 56-63 in xAPIC mode."""
        self.icr = value & ((1 << 64) - 1)
        self._ipi(self.icr)

    def _ipi(self, icr: int) -> None:
        mode = (icr >> ICR_MODE_SHIFT) & 7
        if mode == DeliveryMode.INIT and icr & ICR_TRIGGER_LEVEL and not icr & ICR_LEVEL_ASSERT:
            return   # INIT level de-assert: no effect since the Pentium 4
        if self.x2apic:
            destination, wide = icr >> X2APIC_DESTINATION_SHIFT, True
        else:
            destination, wide = (icr >> XAPIC_DESTINATION_SHIFT) & 0xFF, False
        self._send_ipi(destination, icr & ICR_VECTOR, mode, bool(icr & ICR_LOGICAL), wide=wide,
                       shorthand=Shorthand((icr >> ICR_SHORTHAND_SHIFT) & 3), source=self.apic_id)
