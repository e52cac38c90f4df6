"""The per-VP Hyper-V emulator: the synthetic MSRs the hypervisor implements.

Guest OS id, hypercall page, VP index, reference counter and reference TSC
page, frequency MSRs, VP assist page, SynIC, synthetic timers, the guest
crash MSRs and the Hyper-V aliases of the LAPIC's EOI/ICR/TPR.  ``read``/``write`` return the
value (or None for a write) or a typed ``MsrFault`` the caller turns into
a guest #GP; nothing here knows how the CPU is executed.

The TLFS makes some of them partition-wide: the guest OS id, the hypercall
page, the reference TSC page and the crash MSRs are written once (Linux
does so on the boot CPU) and read the same on every VP; they live in one
``PartitionMsrs`` the partition's emulators share.  The VP index, VP assist
page, SynIC and timers are per VP.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim.lapic import TIMER_HZ, Lapic
from mshvstack.backend.sim.memory import GpaMap, GpaUnmapped
from mshvstack.backend.sim.synic import SynIc

PAGE = 4096
U64 = (1 << 64) - 1

# The hypercall page: vmcall; ret (Intel encoding; VMMCALL is trapped too).
HYPERCALL_PAGE_CODE = bytes.fromhex("0f01c1c3")

MSR_GUEST_OS_ID = int(lib.HV_X64_MSR_GUEST_OS_ID)
MSR_HYPERCALL = int(lib.HV_X64_MSR_HYPERCALL)
MSR_VP_INDEX = int(lib.HV_X64_MSR_VP_INDEX)
MSR_TIME_REF_COUNT = int(lib.HV_X64_MSR_TIME_REF_COUNT)
MSR_REFERENCE_TSC = int(lib.HV_X64_MSR_REFERENCE_TSC)
MSR_TSC_FREQUENCY = int(lib.HV_X64_MSR_TSC_FREQUENCY)
MSR_APIC_FREQUENCY = int(lib.HV_X64_MSR_APIC_FREQUENCY)
MSR_VP_ASSIST_PAGE = int(lib.HV_X64_MSR_VP_ASSIST_PAGE)
MSR_SCONTROL = int(lib.HV_X64_MSR_SCONTROL)
MSR_SVERSION = int(lib.HV_X64_MSR_SVERSION)
MSR_SIEFP = int(lib.HV_X64_MSR_SIEFP)
MSR_SIMP = int(lib.HV_X64_MSR_SIMP)
MSR_EOM = int(lib.HV_X64_MSR_EOM)
MSR_SINT0 = int(lib.HV_X64_MSR_SINT0)
MSR_STIMER0_CONFIG = int(lib.HV_MSR_STIMER0_CONFIG)
MSR_EOI = int(lib.HV_X64_MSR_EOI)
MSR_ICR = int(lib.HV_X64_MSR_ICR)
MSR_TPR = int(lib.HV_X64_MSR_TPR)
STIMER_COUNT = int(lib.HV_SYNIC_STIMER_COUNT)
MSR_CRASH_P0 = int(lib.HV_MSR_CRASH_P0)
MSR_CRASH_CTL = int(lib.HV_MSR_CRASH_CTL)
CRASH_PARAMETERS = MSR_CRASH_CTL - MSR_CRASH_P0
# What a read of CRASH_CTL reports: the notifications this hypervisor accepts.
CRASH_CTL_CAPABILITIES = int(lib.HV_CRASH_CTL_CRASH_NOTIFY | lib.HV_CRASH_CTL_CRASH_NOTIFY_MSG)
# Every MSR the hypervisor implements itself (the VMM intercepts one only by its index).
SYNTHETIC_MSRS = range(0x40000000, MSR_CRASH_CTL + 1)

_TSC_PAGE_SIZE = ffi.sizeof("struct hv_reference_tsc_page")
_TIMER_MESSAGE_SIZE = ffi.sizeof("struct hv_timer_message_payload")


class MsrFault(enum.Enum):
    """What the guest gets for an access the hypervisor refuses."""

    GP = 13


class Services(Protocol):
    """What the emulator needs from its partition and VP."""

    memory: GpaMap

    def reference_time(self) -> int: ...
    def reference_tsc_parameters(self) -> tuple[int, int]: ...
    def tsc_hz(self) -> int: ...
    def flush_code(self, gpa: int, size: int) -> None: ...
    def end_of_interrupt(self) -> None: ...
    def end_of_message(self) -> None: ...
    def post_timer_message(self, sint: int, payload: bytes) -> bool: ...
    def timers_changed(self) -> None: ...


@dataclass
class SyntheticTimer:
    """One STIMERn: config and count MSRs and the next expiry (reference time)."""

    config: int = 0
    count: int = 0
    expiry: int | None = None
    undelivered: bool = False   # message mode: waiting for a free SIMP slot

    @property
    def enabled(self) -> bool:
        return bool(self.config & lib.HV_STIMER_CONFIG_ENABLE)

    @property
    def periodic(self) -> bool:
        return bool(self.config & lib.HV_STIMER_CONFIG_PERIODIC)

    @property
    def direct(self) -> bool:
        return bool(self.config & lib.HV_STIMER_CONFIG_DIRECT_MODE)

    @property
    def vector(self) -> int:
        return int((self.config & lib.HV_STIMER_CONFIG_APIC_VECTOR_MASK) >> lib.HV_STIMER_CONFIG_APIC_VECTOR_SHIFT)

    @property
    def sint(self) -> int:
        return int((self.config & lib.HV_STIMER_CONFIG_SINTX_MASK) >> lib.HV_STIMER_CONFIG_SINTX_SHIFT)

    def arm(self, now: int) -> None:
        if not self.enabled or not self.count:
            self.expiry = None
        else:
            self.expiry = now + self.count if self.periodic else self.count


@dataclass
class PartitionMsrs:
    """The partition-wide synthetic MSRs (one per partition, shared by its VPs' emulators)."""

    guest_os_id: int = 0
    hypercall: int = 0
    reference_tsc: int = 0
    crash: list[int] = field(default_factory=lambda: [0] * CRASH_PARAMETERS)   # P0..P4, the guest's crash report
    crash_ctl: int = 0
    tsc_sequence: int = 0   # of the reference TSC page, bumped at each change
    # Writes that read one shared value to compute another (the hypercall page needs the OS id; the TSC
    # page its sequence), from any VP's thread and the root's.  Under it only a read of the clock parameters
    # and guest-memory writes.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set_hypercall(self, value: int) -> int:
        """Write the hypercall MSR; the enable bit is dropped while no guest OS id is set
        (the guest must set one first).  Returns the value written."""
        with self._lock:
            if not self.guest_os_id:
                value &= ~int(lib.HV_X64_MSR_HYPERCALL_ENABLE)
            self.hypercall = value
            return value

    def publish_tsc_page(self, memory: GpaMap, parameters: Callable[[], tuple[int, int]]) -> None:
        """Write the reference TSC page (if enabled) with ``parameters()`` (scale, offset).  Two
        publishers (a VP's MSR write, the root changing the clock) take turns: each page has
        its own sequence, and the last one written holds the parameters read last."""
        with self._lock:
            if not self.reference_tsc & lib.HV_X64_MSR_TSC_REFERENCE_ENABLE:
                return
            gpa = self.reference_tsc & ~0xFFF & U64
            scale, offset = parameters()
            # A guest reading while it changes sees the sequence change (0: invalid meanwhile) and reads again.
            self.tsc_sequence = self.tsc_sequence % 0xFFFFFFFE + 1
            page = struct.pack("<IIQq", self.tsc_sequence, 0, scale, offset)
            assert len(page) == _TSC_PAGE_SIZE
            try:
                memory.write(gpa, b"\0\0\0\0")
                memory.write(gpa + 4, page[4:])
                memory.write(gpa, page[:4])
            except GpaUnmapped:
                pass  # not RAM: the guest reads nothing valid there, as on hardware


@dataclass
class HvEmulator:
    index: int
    lapic: Lapic
    services: Services
    shared: PartitionMsrs = field(default_factory=PartitionMsrs)
    synic: SynIc = field(default_factory=SynIc)
    vp_assist_page: int = 0
    timers: list[SyntheticTimer] = field(default_factory=lambda: [SyntheticTimer() for _ in range(STIMER_COUNT)])

    # The partition-wide MSRs, read and written through the shared record.
    @property
    def guest_os_id(self) -> int:
        return self.shared.guest_os_id

    @property
    def hypercall(self) -> int:
        return self.shared.hypercall

    @property
    def reference_tsc(self) -> int:
        return self.shared.reference_tsc

    @property
    def crash(self) -> list[int]:
        return self.shared.crash

    @property
    def crash_ctl(self) -> int:
        return self.shared.crash_ctl

    def __post_init__(self) -> None:
        # The MSRs read straight from state, built once (read() is on every MSR exit).
        self._readers: dict[int, Callable[[], int]] = {
            MSR_GUEST_OS_ID: lambda: self.guest_os_id,
            MSR_HYPERCALL: lambda: self.hypercall,
            MSR_VP_INDEX: lambda: self.index,
            MSR_TIME_REF_COUNT: self.services.reference_time,
            MSR_REFERENCE_TSC: lambda: self.reference_tsc,
            MSR_TSC_FREQUENCY: self.services.tsc_hz,
            MSR_APIC_FREQUENCY: lambda: TIMER_HZ,
            MSR_VP_ASSIST_PAGE: lambda: self.vp_assist_page,
            MSR_SCONTROL: lambda: self.synic.scontrol,
            MSR_SVERSION: lambda: int(lib.HV_SYNIC_VERSION_1),
            MSR_SIMP: lambda: self.synic.simp,
            MSR_SIEFP: lambda: self.synic.siefp,
            MSR_EOM: lambda: 0,
            MSR_TPR: lambda: self.lapic.tpr,
            MSR_ICR: lambda: self.lapic.icr,
            MSR_CRASH_CTL: lambda: CRASH_CTL_CAPABILITIES,
        }

    # ---- MSR access
    def read(self, index: int) -> int | MsrFault:
        reader = self._readers.get(index)
        if reader is not None:
            return reader()
        synic = self.synic
        if MSR_SINT0 <= index < MSR_SINT0 + 16:
            return synic.sints[index - MSR_SINT0]
        if MSR_STIMER0_CONFIG <= index < MSR_STIMER0_CONFIG + 2 * STIMER_COUNT:
            timer = self.timers[(index - MSR_STIMER0_CONFIG) // 2]
            return timer.count if (index - MSR_STIMER0_CONFIG) & 1 else timer.config
        if MSR_CRASH_P0 <= index < MSR_CRASH_CTL:
            return self.crash[index - MSR_CRASH_P0]
        return MsrFault.GP

    def write(self, index: int, value: int) -> None | MsrFault:
        synic = self.synic
        if index == MSR_GUEST_OS_ID:
            self.shared.guest_os_id = value
        elif index == MSR_HYPERCALL:
            self._set_hypercall_page(value)
        elif index == MSR_REFERENCE_TSC:
            self.shared.reference_tsc = value
            self.refresh_tsc_page()
        elif index == MSR_VP_ASSIST_PAGE:
            if value & ~(lib.HV_X64_MSR_VP_ASSIST_PAGE_ADDRESS_MASK | lib.HV_X64_MSR_VP_ASSIST_PAGE_ENABLE):
                return MsrFault.GP  # reserved bits
            self.vp_assist_page = value
        elif index == MSR_SCONTROL:
            synic.scontrol = value
        elif index == MSR_SIMP:
            synic.simp = value
        elif index == MSR_SIEFP:
            synic.siefp = value
        elif index == MSR_EOM:
            self.services.end_of_message()
            self._retry_timer_messages()
        elif MSR_SINT0 <= index < MSR_SINT0 + 16:
            synic.sints[index - MSR_SINT0] = value
            self.lapic.auto_eoi = synic.auto_eoi_vectors()
        elif MSR_STIMER0_CONFIG <= index < MSR_STIMER0_CONFIG + 2 * STIMER_COUNT:
            self._write_timer((index - MSR_STIMER0_CONFIG) // 2, bool((index - MSR_STIMER0_CONFIG) & 1), value)
        elif index == MSR_EOI:
            self.services.end_of_interrupt()
        elif index == MSR_ICR:
            self.lapic.write_icr64(value)
        elif index == MSR_TPR:
            self.lapic.tpr = value & 0xFF
        elif MSR_CRASH_P0 <= index < MSR_CRASH_CTL:
            self.shared.crash[index - MSR_CRASH_P0] = value
        elif index == MSR_CRASH_CTL:
            # The notification itself reaches the VMM only through its MSR-index intercept.
            self.shared.crash_ctl = value
        else:
            return MsrFault.GP  # read-only (VP index, counters, frequencies) or unknown
        return None

    def _set_hypercall_page(self, value: int) -> None:
        value = self.shared.set_hypercall(value)
        if value & lib.HV_X64_MSR_HYPERCALL_ENABLE:
            gpa = value & ~0xFFF & U64
            page = HYPERCALL_PAGE_CODE + b"\xcc" * (PAGE - len(HYPERCALL_PAGE_CODE))
            try:
                self.services.memory.write(gpa, page)
            except GpaUnmapped:
                return  # a page outside RAM is simply not overlaid
            self.services.flush_code(gpa, PAGE)

    # ---- reference TSC page
    def refresh_tsc_page(self) -> None:
        """Publish scale and offset so that ((tsc * scale) >> 64) + offset is the reference time."""
        self.shared.publish_tsc_page(self.services.memory, self.services.reference_tsc_parameters)

    # ---- synthetic timers
    def restore_timers(self, timers: list[SyntheticTimer]) -> None:
        """Timers as saved (MSHV_SET_VP_STATE): each keeps its next expiry in reference time."""
        self.timers[:] = timers[:STIMER_COUNT]
        self.services.timers_changed()

    def _write_timer(self, n: int, is_count: bool, value: int) -> None:
        timer = self.timers[n]
        now = self.services.reference_time()
        if is_count:
            timer.count = value
            if value and timer.config & lib.HV_STIMER_CONFIG_AUTO_ENABLE:
                timer.config |= lib.HV_STIMER_CONFIG_ENABLE
            if not value:
                timer.config &= ~int(lib.HV_STIMER_CONFIG_ENABLE)
        else:
            timer.config = value
        timer.undelivered = False
        timer.arm(now)

    def next_timer_expiry(self) -> int | None:
        """The earliest armed expiry (reference time), for the run loop's deadline."""
        earliest = None
        for timer in self.timers:
            expiry = timer.expiry
            if expiry is not None and not timer.undelivered and (earliest is None or expiry < earliest):
                earliest = expiry
        return earliest

    def poll_timers(self) -> int | None:
        """Fire the timers whose expiry has passed; the earliest expiry still armed after it."""
        earliest = self.next_timer_expiry()
        if earliest is None:
            return None   # none armed (the common case): no clock read
        now = self.services.reference_time()
        if now < earliest:
            return earliest
        for n, timer in enumerate(self.timers):
            if timer.expiry is None or timer.undelivered or now < timer.expiry:
                continue
            expiry = timer.expiry
            if timer.direct:
                self.lapic.accept(timer.vector)
            elif not self._post_timer_message(n, expiry, now):
                timer.undelivered = True
                continue
            self._rearm_after_expiry(timer, expiry, now)
        return self.next_timer_expiry()

    def _rearm_after_expiry(self, timer: SyntheticTimer, expiry: int, now: int) -> None:
        if timer.periodic and timer.count:
            missed = (now - expiry) // timer.count
            timer.expiry = expiry + timer.count * (missed + 1)
        else:
            timer.expiry = None
            timer.config &= ~int(lib.HV_STIMER_CONFIG_ENABLE)

    def _post_timer_message(self, n: int, expiry: int, now: int) -> bool:
        payload = struct.pack("<IIQQ", n, 0, expiry, now)
        assert len(payload) == _TIMER_MESSAGE_SIZE
        return self.services.post_timer_message(self.timers[n].sint, payload)

    def _retry_timer_messages(self) -> None:
        now = self.services.reference_time()
        for n, timer in enumerate(self.timers):
            if timer.undelivered and timer.expiry is not None and self._post_timer_message(n, timer.expiry, now):
                timer.undelivered = False
                self._rearm_after_expiry(timer, timer.expiry, now)
