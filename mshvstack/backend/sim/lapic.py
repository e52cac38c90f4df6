"""The local APIC the hypervisor emulates for each VP (partition flag LAPIC).

On Hyper-V the hypervisor, not the VMM, owns the LAPIC: interrupt request
and in-service registers with priorities, EOI, the timer, and IPIs between
VPs.  Reached through x2APIC MSRs (0x800-0x8FF), the xAPIC MMIO page and the
Hyper-V EOI/ICR/TPR MSRs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

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

# (destination, vector, delivery mode, logical destination, APIC id to leave out)
IpiSender = Callable[[int, int, int, bool, "int | None"], object]
SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_ALL_BUT_SELF = 1, 2, 3
BROADCAST = 0xFFFFFFFF


class Lapic:
    def __init__(self, apic_id: int, send_ipi: IpiSender, wake: Callable[[], None]) -> None:
        self.apic_id = apic_id
        self._send_ipi = send_ipi
        self._wake = wake
        self._lock = threading.Lock()
        self.irr = 0  # 256-bit sets as ints
        self.isr = 0
        # Vectors of SINTs with auto-EOI: taken without entering service (no EOI follows).
        self.auto_eoi = 0
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

    # ---- interrupt flow
    def accept(self, vector: int) -> None:
        """An interrupt arrives for this VP (IRR)."""
        with self._lock:
            self.irr |= 1 << (vector & 0xFF)
        self._wake()

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
        self.poll_timer()
        return self._timer_deadline

    def poll_timer(self) -> None:
        deadline = self._timer_deadline
        if deadline is None or time.monotonic_ns() < deadline:
            return
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

    def _current_count(self) -> int:
        if self._timer_deadline is None or not self.timer_initial:
            return 0
        elapsed = (time.monotonic_ns() - self._timer_start) * TIMER_HZ // 1_000_000_000 // self._divider()
        return max(self.timer_initial - elapsed, 0)

    # ---- register access (offset in the xAPIC page)
    def read(self, offset: int) -> int:
        if offset == ID:
            return self.apic_id << 24
        if offset == VERSION:
            return VERSION_VALUE
        if offset == TPR:
            return self.tpr
        if offset == PPR:
            return max(self.tpr & 0xF0, self._highest(self.isr) & 0xF0 if self.isr else 0)
        if offset == LDR:
            return self.ldr
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
            self.ldr = value & 0xFF000000
        elif offset == DFR:
            self.dfr = value | 0x0FFFFFFF
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
        """x2APIC ICR write (one 64-bit MSR; destination in bits 32-63)."""
        self.icr = value
        self._ipi(value)

    def _ipi(self, icr: int) -> None:
        vector = icr & 0xFF
        mode = (icr >> 8) & 7
        shorthand = (icr >> 18) & 3
        destination = icr >> 32
        if destination > 0xFF and destination != 0xFFFFFFFF:
            destination >>= 24  # xAPIC form: destination in bits 56-63
        logical = bool(icr & (1 << 11)) and not shorthand
        if shorthand == SHORTHAND_SELF:
            destination = self.apic_id
        elif shorthand in (SHORTHAND_ALL, SHORTHAND_ALL_BUT_SELF):
            destination = BROADCAST
        self._send_ipi(destination, vector, mode, logical, self.apic_id if shorthand == SHORTHAND_ALL_BUT_SELF else None)
