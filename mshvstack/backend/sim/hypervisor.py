"""The Microsoft hypervisor as the simulator models it: partitions and hypercalls.

Hypercalls arrive here as raw input bytes (from MSHV_ROOT_HVCALL); each
handler parses its input struct through the binding and returns a status,
the output bytes and the reps completed, as the hypervisor would.

Threads and locks (docs/concurrency.md): the root's calls (hypercalls, VP
creation, memory and doorbell changes) come from any VMM thread and run
under the partition's lock; the VPs' threads read the partition's tables
without it (each is one read, or a reference replaced whole: ``vps``,
``doorbells``) and take it only to change partition state themselves (a
dirty-tracking fault, after their own run lock).  Under it only the locks
below it in docs/concurrency.md (the engines', the VPs' wake, SynIC and
LAPIC locks, the partition MSRs', the GPA map's, the irqfd worker's, the C
core's); never a VMM lock: those come before it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import x86
from mshvstack.backend.sim.engines.unicorn import EngineGroup, read_tsc, tsc_hz
from mshvstack.backend.sim.hv1 import SYNTHETIC_MSRS, PartitionMsrs
from mshvstack.backend.sim.lapic import XAPIC_BROADCAST, DeliveryMode, Shorthand
from mshvstack.backend.sim.memory import PAGE_SHIFT, GpaMap
from mshvstack.backend.sim.vp import VECTOR_REGISTERS, SimVp
from mshvstack.backend.sim.vpinsns import MTRR_VARIABLE_AND_FIXED_RANGE, NATIVE_MSRS

HV_OK = int(lib.HV_STATUS_SUCCESS)

# The router takes HV_X64_INTERRUPT_TYPE_* and the LAPIC sends its ICR's delivery mode: one numbering.
assert all(int(getattr(lib, f"HV_X64_INTERRUPT_TYPE_{name}")) == mode for name, mode in (
    ("FIXED", DeliveryMode.FIXED), ("LOWESTPRIORITY", DeliveryMode.LOWEST_PRIORITY), ("SMI", DeliveryMode.SMI),
    ("NMI", DeliveryMode.NMI), ("INIT", DeliveryMode.INIT), ("SIPI", DeliveryMode.STARTUP), ("EXTINT", DeliveryMode.EXTINT)))


REP_HYPERCALLS = frozenset(int(getattr(lib, f"HVCALL_{name}")) for name in (
    "GET_VP_REGISTERS", "SET_VP_REGISTERS", "GET_GPA_PAGES_ACCESS_STATES", "GET_VP_CPUID_VALUES"))


@dataclass(frozen=True)
class Doorbell:
    """An MMIO doorbell port (what MSHV_IOEVENTFD installs)."""

    address: int
    length: int          # 0: any access size
    fd: int              # the partition's own duplicate of the caller's eventfd
    context: int         # the eventfd's identity (dups share it)
    datamatch: int | None

    def matches(self, gpa: int, size: int, value: int) -> bool:
        if gpa != self.address or (self.length and size != self.length):
            return False
        return self.datamatch is None or value == self.datamatch


@dataclass
class HvResult:
    status: int
    output: bytes = b""
    reps: int = 0


def _signal_outputs() -> tuple[bytes, bytes]:
    """HvSignalEventDirect's two possible outputs: not newly signalled, newly signalled."""
    out = ffi.new("struct hv_output_signal_event_direct *")
    outputs = []
    for newly in (0, 1):
        out.newly_signaled = newly
        outputs.append(bytes(ffi.buffer(out)))
    return outputs[0], outputs[1]


_SIGNALLED = _signal_outputs()

# CPUID: the Hyper-V interface the guest sees ("Microsoft Hv").
_HV_VENDOR = b"Microsoft Hv"
_HV_INTERFACE = int.from_bytes(b"Hv#1", "little")
_PRIVILEGES_LOW = int(lib.HV_MSR_VP_INDEX_AVAILABLE | lib.HV_MSR_HYPERCALL_AVAILABLE | lib.HV_MSR_SYNIC_AVAILABLE
                      | lib.HV_MSR_TIME_REF_COUNT_AVAILABLE | lib.HV_MSR_APIC_ACCESS_AVAILABLE | lib.HV_ACCESS_FREQUENCY_MSRS
                      | lib.HV_MSR_REFERENCE_TSC_AVAILABLE | lib.HV_MSR_SYNTIMER_AVAILABLE)
_PRIVILEGES_HIGH = int(lib.HV_POST_MESSAGES | lib.HV_SIGNAL_EVENTS)


MAX_TRACKED_PAGES = 1024   # dirty-page tracking's limit on the simulator (docs/simulator.md)


class VpExists(Exception):
    """MSHV_CREATE_VP for an index that has a VP already (the driver's EEXIST)."""


class SimPartition:
    def __init__(self, flags: int, disabled_features: tuple[int, int] = (0, 0), disabled_xsave: int = 0) -> None:
        self.flags = flags
        self.disabled_features = disabled_features
        self.disabled_xsave = disabled_xsave
        self.initialized = False
        self.memory = GpaMap()
        self.vps: dict[int, SimVp] = {}   # replaced whole under the lock: VP threads iterate it without
        self.hv_msrs = PartitionMsrs()   # the partition-wide synthetic MSRs (guest OS id, hypercall page, ...)
        self.engines = EngineGroup()   # the VPs' engines run as one SMP machine
        self.properties: dict[int, int] = {
            int(lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION): int(lib.HV_UNIMPLEMENTED_MSR_ACTION_FAULT),
            int(lib.HV_PARTITION_PROPERTY_TIME_FREEZE): 0,
            int(lib.HV_PARTITION_PROPERTY_REFERENCE_TIME): 0,   # read and set as the partition's clock
            int(lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING): 0,
            int(lib.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE): 4096,
            int(lib.HV_PARTITION_PROPERTY_XSAVE_STATES): 3,
            int(lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY): tsc_hz(),
            int(lib.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0): ~disabled_features[0] & (1 << 64) - 1,
            int(lib.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1): ~disabled_features[1] & (1 << 64) - 1,
            int(lib.HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES): ~disabled_xsave & (1 << 64) - 1,
            int(lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS): _PRIVILEGES_LOW | _PRIVILEGES_HIGH << 32,
        }
        self.io_intercepts: set[int] = set()
        self.msr_intercepts: dict[int, int] = {}      # msr -> access mask
        self.all_msrs_intercepted = 0
        self.cpuid_intercepts: set[int] = set()
        self.exception_intercepts: set[int] = set()
        self.intercepts_hypercalls = False
        self.cpuid_results: dict[tuple[int, int], tuple[int, ...]] = {}
        self.doorbells: tuple[Doorbell, ...] = ()   # replaced whole under the lock: VP threads match without
        self.eoi_listeners: list[Callable[[int], None]] = []
        # The reference counter is derived from the TSC with the very scale the
        # reference TSC page publishes, so the MSR, the page and the synthetic
        # timers all read one clock (a separate clock drifts, and timers then
        # fire early by the guest's count: an interrupt storm).
        self.reference_scale = (10_000_000 << 64) // max(tsc_hz(), 1)
        self.reference_offset = -((read_tsc() * self.reference_scale) >> 64)
        self._frozen_at: int | None = None
        self._unfrozen = threading.Event()   # set while time runs: the VPs' threads wait on it (see wait_unfrozen)
        self._unfrozen.set()
        # The root's changes to the partition (see the module docstring), one at a time.  Not
        # reentrant: taken by the public methods below, the hypercall handlers run under it.
        self._lock = threading.Lock()

    # ---- the root's changes (the driver's ioctls)
    def create_vp(self, index: int) -> SimVp | None:
        """HvCreateVp: a new VP at ``index``, or None while the partition is not
        initialized (HV_STATUS_INVALID_PARTITION_STATE).  Raises VpExists."""
        with self._lock:
            if index in self.vps:
                raise VpExists(index)
            if not self.initialized:
                return None
            vp = SimVp(self, index)
            self.vps = {**self.vps, index: vp}
            return vp

    def overlaps(self, guest_pfn: int, pages: int, userspace_addr: int, endpoints_only: bool) -> bool:
        """Whether a new region would overlap a mapped one: the whole frame interval, or
        (``endpoints_only``, 6.15) its first and last frame and user address."""
        memory, size = self.memory, pages << PAGE_SHIFT
        if endpoints_only:
            return bool(memory.containing_pfn(guest_pfn) or memory.containing_pfn(guest_pfn + pages - 1)
                        or memory.containing_user(userspace_addr) or memory.containing_user(userspace_addr + size - 1))
        return memory.overlaps_guest(guest_pfn, pages)

    def add_region(self, guest_pfn: int, pages: int, userspace_addr: int, writable: bool, executable: bool,
                   endpoints_only: bool) -> bool:
        """Map a region into the partition and every VP's engine; False if it overlaps one (checked again here)."""
        with self._lock:
            if self.overlaps(guest_pfn, pages, userspace_addr, endpoints_only):
                return False
            new = self.memory.add(guest_pfn, pages, userspace_addr, writable, executable)
            for vp in self.vps.values():
                vp.map_region(new.gpa, new.size, userspace_addr, writable, executable)
            return True

    def remove_region(self, guest_pfn: int, pages: int, userspace_addr: int) -> Literal["removed", "missing", "mismatch"]:
        """Unmap the region mapped exactly so: "missing" when no region holds ``guest_pfn``,
        "mismatch" when the one there was mapped otherwise."""
        with self._lock:
            existing = self.memory.containing_pfn(guest_pfn)
            if existing is None:
                return "missing"
            if existing.guest_pfn != guest_pfn or existing.userspace_addr != userspace_addr or existing.pages != pages:
                return "mismatch"
            for vp in self.vps.values():
                vp.unmap_region(existing.gpa, existing.size)
            self.memory.remove(existing)
            return "removed"

    def add_doorbell(self, doorbell: Doorbell) -> bool:
        """MSHV_IOEVENTFD assign; False when the same trigger is taken (which eventfd does not matter)."""
        with self._lock:
            for other in self.doorbells:
                if (other.address, other.length) == (doorbell.address, doorbell.length) and (
                        other.datamatch is None or doorbell.datamatch is None or other.datamatch == doorbell.datamatch):
                    return False
            self.doorbells = (*self.doorbells, doorbell)
            return True

    def remove_doorbell(self, context: int, address: int, length: int, datamatch: int | None) -> Doorbell | None:
        """MSHV_IOEVENTFD deassign: the doorbell removed (its fd is the caller's to close), or None."""
        with self._lock:
            for doorbell in self.doorbells:
                if (doorbell.context, doorbell.address, doorbell.length, doorbell.datamatch) == (context, address, length, datamatch):
                    self.doorbells = tuple(d for d in self.doorbells if d is not doorbell)
                    return doorbell
            return None

    # ---- properties used by VPs
    @property
    def lapic_enabled(self) -> bool:
        return bool(self.flags & lib.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED)

    @property
    def unimplemented_msr_ignore(self) -> bool:
        action = self.properties[lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION]
        return bool(action == lib.HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO)

    def reference_time(self) -> int:
        """Partition reference time in 100 ns units (stops while frozen)."""
        if self._frozen_at is not None:
            return self._frozen_at
        return ((read_tsc() * self.reference_scale) >> 64) + self.reference_offset

    def reference_to_monotonic(self, reference: int | None) -> int | None:
        """The monotonic clock (ns) at which the reference counter reaches ``reference``."""
        if reference is None or self._frozen_at is not None:
            return None
        return time.monotonic_ns() + (reference - self.reference_time()) * 100

    def wait_unfrozen(self, vp: SimVp) -> None:
        """A frozen partition's VPs do not run (they can still be kicked)."""
        if self._unfrozen.is_set():
            return
        while not self._unfrozen.wait(0.05):
            if vp.kicked:
                return

    def exception_bitmap(self) -> int:
        """The exception vectors reported to the VMM instead of delivered (bit n = vector n)."""
        return sum(1 << v for v in self.exception_intercepts)

    def intercepts_cpuid(self, leaf: int) -> bool:
        return leaf in self.cpuid_intercepts

    def native_msrs(self) -> tuple[frozenset[int], int, int]:
        """The MSRs the engine runs itself, no intercept asking for them (and a range of them;
        first > last: none): what vpinsns.py would let pass, decided without a stop."""
        if self.all_msrs_intercepted:
            return frozenset(), 1, 0
        taken = {index for index, access in self.msr_intercepts.items() if access}
        first, last = MTRR_VARIABLE_AND_FIXED_RANGE, MTRR_VARIABLE_AND_FIXED_RANGE | 0xFF
        if any(first <= index <= last for index in taken):
            first, last = 1, 0
        return NATIVE_MSRS - taken, first, last

    def _native_msrs_changed(self) -> None:
        msrs = self.native_msrs()
        for vp in self.vps.values():
            if vp.engine is not None:
                vp.engine.run_msrs_natively(*msrs)

    def intercepts_msr(self, index: int, write: bool) -> bool:
        mask = self.msr_intercepts.get(index, self.all_msrs_intercepted)
        if index in SYNTHETIC_MSRS and index not in self.msr_intercepts:
            return False
        return bool(mask & (lib.HV_INTERCEPT_ACCESS_MASK_WRITE if write else lib.HV_INTERCEPT_ACCESS_MASK_READ))

    def cpuid(self, vp_index: int, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        registered = self.cpuid_results.get((leaf, subleaf)) or self.cpuid_results.get((leaf, -1))
        base = self._base_cpuid(vp_index, leaf, subleaf)
        if registered is None:
            return base
        out = []
        for i, value in enumerate(base):
            result, mask = registered[2 * i], registered[2 * i + 1]
            out.append((value & ~mask) | (result & mask))
        return out[0], out[1], out[2], out[3]

    def _base_cpuid(self, vp_index: int, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        def words(b: bytes) -> tuple[int, int, int]:
            return tuple(int.from_bytes(b[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]

        if leaf == 0:
            b, d, c = words(b"GenuineIntel")
            return 0xD, b, c, d
        if leaf == 1:
            ecx = (x86.CPUID_1_ECX_HYPERVISOR | x86.CPUID_1_ECX_SSE3 | x86.CPUID_1_ECX_CX16 | x86.CPUID_1_ECX_POPCNT
                   | x86.CPUID_1_ECX_SSE41 | x86.CPUID_1_ECX_SSE42)
            edx = 0x0789FBFF  # fpu..sse2 baseline
            if self.flags & lib.HV_PARTITION_CREATION_FLAG_X2APIC_CAPABLE:
                ecx |= x86.CPUID_1_ECX_X2APIC
            return 0x000306A9, (vp_index << 24) | 0x00010800, ecx, edx
        if leaf == 7:
            return 0, 0, 0, x86.CPUID_7_EDX_ARCH_CAPABILITIES if subleaf == 0 else 0
        if leaf == 0x40000000:
            b, c, d = words(_HV_VENDOR)
            return 0x40000006, b, c, d
        if leaf == 0x40000001:
            return _HV_INTERFACE, 0, 0, 0
        if leaf == 0x40000002:
            return 0x00004A42, 0x000A0000, 0, 0  # build 19010 (21H2 compat), version 10.0
        if leaf == 0x40000003:
            return _PRIVILEGES_LOW, _PRIVILEGES_HIGH, 0, int(lib.HV_X64_GUEST_IDLE_STATE_AVAILABLE | lib.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE
                                                             | lib.HV_STIMER_DIRECT_MODE_AVAILABLE
                                                             | lib.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE)
        if leaf == 0x40000004:
            return 0, 0xFFFFFFFF, 0, 0
        if leaf == 0x40000005:
            return 256, 0, 0, 0
        if leaf == 0x80000000:
            return 0x80000008, 0, 0, 0
        if leaf == 0x80000001:
            return 0, 0, 1, (1 << 29) | (1 << 20) | (1 << 11)  # LM, NX, SYSCALL
        if leaf == 0x80000008:
            return 0x3028, 0, 0, 0
        return 0, 0, 0, 0

    # ---- memory
    def flush_code(self, gpa: int, size: int) -> None:
        for vp in self.vps.values():
            if vp.engine is not None:
                vp.engine.flush_code(gpa, size)

    def route_interrupt(self, destination: int, vector: int, mode: int, logical: bool = False, *,
                        wide: bool | None = None, shorthand: Shorthand = Shorthand.NONE,
                        source: int | None = None) -> list[SimVp]:
        """The partition's one interrupt router (IPIs, HvAssertVirtualInterrupt, irqfd MSIs).

        ``destination`` is an APIC id (physical) or a logical destination
        (``logical``), matched by each VP's LAPIC in its own mode (xAPIC flat
        or cluster through its DFR and LDR, x2APIC cluster); ``wide`` says the
        destination is a 32-bit x2APIC one (None: when it does not fit 8 bits).
        ``shorthand`` (an ICR's, from VP ``source``) replaces the destination.
        ``mode`` is an HV_X64_INTERRUPT_TYPE_* (the APIC's delivery modes).
        Returns the VPs it reached: a fixed interrupt, an NMI, INIT or SIPI
        reaches every addressed VP once; lowest priority exactly one of them.
        """
        vps = sorted(self.vps.values(), key=lambda vp: vp.index)
        if shorthand is Shorthand.SELF:
            targets = [vp for vp in vps if vp.index == source]
        elif shorthand is Shorthand.ALL_INCLUDING_SELF:
            targets = vps
        elif shorthand is Shorthand.ALL_EXCLUDING_SELF:
            targets = [vp for vp in vps if vp.index != source]
        else:
            wide = destination > XAPIC_BROADCAST if wide is None else wide
            targets = [vp for vp in vps if vp.lapic.accepts(destination, logical, wide)]
        if mode == DeliveryMode.LOWEST_PRIORITY and len(targets) > 1:
            # Arbitration: the lowest processor priority wins; the lowest APIC id breaks ties.
            targets = [min(targets, key=lambda vp: (vp.lapic.processor_priority(), vp.index))]
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY):
            for vp in targets:
                vp.queue_interrupt(vector)
        elif mode == DeliveryMode.NMI:
            for vp in targets:
                vp.queue_nmi()
        elif mode == DeliveryMode.INIT:
            for vp in targets:
                vp.queue_init()
        elif mode == DeliveryMode.STARTUP:
            for vp in targets:
                vp.queue_startup(vector)
        else:
            return []   # SMI, remote read, ExtINT: not modelled, nothing delivered
        return targets

    # ---- dirty-page tracking (write protection, as hardware-assisted logging does)
    @property
    def tracking(self) -> bool:
        return bool(self.properties[lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING])

    def _protect_pages(self, region: Any, pages: list[int]) -> None:
        for page in pages:
            region.write_protected.add(page)
        for vp in self.vps.values():
            if vp.engine is not None:
                for page in pages:
                    vp.engine.protect(region.gpa + (page << PAGE_SHIFT), 1 << PAGE_SHIFT, False, region.executable)

    def track_write(self, gpa: int) -> bool:
        """A guest write faulted on a writable page: dirty-page tracking protected it.  Mark
        it and unprotect it everywhere; True: the VP runs the write again.  On the VP's
        thread, under the lock, as the VMM's clear-and-protect of the same page runs.

        The page may be unprotected already: another VP took its fault first (or tracking
        stopped) and this VP's engine has not applied the change yet.  The write is still
        the guest's own (no MMIO exit for RAM), so the engines are told again and it runs."""
        with self._lock:
            region = self.memory.lookup(gpa)
            if region is None or not region.writable:
                return False
            page = (gpa - region.gpa) >> PAGE_SHIFT
            if page in region.write_protected:
                region.write_protected.discard(page)
                region.access[page] |= 0b11
            for vp in self.vps.values():
                if vp.engine is not None:
                    vp.engine.protect(region.gpa + (page << PAGE_SHIFT), 1 << PAGE_SHIFT, True, region.executable)
            return True

    def _start_tracking(self, enabled: bool) -> None:
        for region in self.memory.regions:
            if not region.writable:
                continue
            if enabled:
                self._protect_pages(region, [p for p in range(region.pages) if not region.access[p] & 0b10])
            else:
                pages = sorted(region.write_protected)
                region.write_protected.clear()
                for vp in self.vps.values():
                    if vp.engine is not None:
                        for page in pages:
                            vp.engine.protect(region.gpa + (page << PAGE_SHIFT), 1 << PAGE_SHIFT, True, region.executable)

    # ---- doorbells (ioeventfd) and interrupt routing (irqfd)
    def ring_doorbell(self, gpa: int, size: int, value: int) -> bool:
        for doorbell in self.doorbells:
            if doorbell.matches(gpa, size, value):
                os.eventfd_write(doorbell.fd, 1)
                return True
        return False

    def end_of_interrupt(self, vector: int) -> None:
        """Guest EOI'd ``vector``: resample level-triggered irqfds routed to it."""
        for callback in list(self.eoi_listeners):
            callback(vector)

    def end_of_message(self, vp: SimVp) -> None:
        vp.end_of_message()

    # ---- hypercalls issued by the root (MSHV_ROOT_HVCALL)
    def hypercall(self, code: int, data: bytes, reps: int, rep_start: int, rep_count_given: bool | None = None) -> HvResult:
        """``rep_count_given``: whether the caller's control word had a rep count (None: not
        checked; the hypervisor refuses a rep count on a simple call and none on a rep call)."""
        handler = self._HANDLERS.get(code)
        if handler is None:
            return HvResult(int(lib.HV_STATUS_INVALID_HYPERCALL_CODE))
        if rep_count_given is not None and rep_count_given != (code in REP_HYPERCALLS):
            return HvResult(int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT))
        with self._lock:
            return handler(self, data, reps, rep_start)

    def _input(self, ctype: str, data: bytes) -> Any:
        """The input as ``ctype`` (zeros past a short input): read where it lies when whole."""
        if len(data) >= ffi.sizeof(ctype):
            view = ffi.from_buffer(f"{ctype} *", data)
            return view, view
        buf = ffi.new("char[]", ffi.sizeof(ctype))
        ffi.memmove(buf, data, len(data))
        return ffi.cast(f"{ctype} *", buf), buf

    def _vp(self, index: int) -> SimVp | None:
        return self.vps.get(index)

    def _get_property(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_get_partition_property", data)
        value = self.reference_time() if inp.property_code == lib.HV_PARTITION_PROPERTY_REFERENCE_TIME else self.properties.get(inp.property_code)
        if value is None:
            return HvResult(int(lib.HV_STATUS_UNKNOWN_PROPERTY))
        return HvResult(HV_OK, (value & (1 << 64) - 1).to_bytes(8, "little"))

    def _set_property(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_set_partition_property", data)
        code, value = int(inp.property_code), int(inp.property_value)
        if code not in self.properties:
            return HvResult(int(lib.HV_STATUS_UNKNOWN_PROPERTY))
        if code == lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS and self.initialized:
            return HvResult(int(lib.HV_STATUS_INVALID_PARTITION_STATE))   # fixed once the partition is initialized
        if code == lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION and value >= lib.HV_UNIMPLEMENTED_MSR_ACTION_COUNT:
            return HvResult(int(lib.HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE))
        if code == lib.HV_PARTITION_PROPERTY_TIME_FREEZE:
            if value > 1:
                return HvResult(int(lib.HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE))
            self._freeze(bool(value))
        if code == lib.HV_PARTITION_PROPERTY_REFERENCE_TIME:
            self._set_reference_time(value)
            return HvResult(HV_OK)
        if code == lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING and value and self._tracked_pages() > MAX_TRACKED_PAGES:
            # Tracking write-protects page by page in Unicorn, whose region splits cost time
            # quadratic in their number (1500 pages: 111 s) and then fail: refused beyond this.
            return HvResult(int(lib.HV_STATUS_INSUFFICIENT_MEMORY))
        self.properties[code] = value
        if code == lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING:
            self._start_tracking(bool(value))
        return HvResult(HV_OK)

    def _tracked_pages(self) -> int:
        return sum(region.pages for region in self.memory.regions if region.writable)

    def _freeze(self, frozen: bool) -> None:
        if frozen and self._frozen_at is None:
            self._frozen_at = self.reference_time()
            self._unfrozen.clear()
            for vp in self.vps.values():
                if vp.engine is not None:
                    vp.engine.cancel()
        elif not frozen and self._frozen_at is not None:
            frozen_at, self._frozen_at = self._frozen_at, None
            self.reference_offset += frozen_at - self.reference_time()
            self._publish_reference_tsc()
            self._unfrozen.set()

    def _set_reference_time(self, value: int) -> None:
        """The partition's clock now reads ``value`` (a restored partition goes on from its
        saved time); frozen, it thaws from there."""
        if self._frozen_at is not None:
            self._frozen_at = value
        else:
            self.reference_offset += value - self.reference_time()
        self._publish_reference_tsc()
        for vp in self.vps.values():
            vp.timers_changed()   # expiries are in reference time: deadlines move with it

    def _publish_reference_tsc(self) -> None:
        """The reference TSC page follows the offset (else the guest's clocksource jumps)."""
        vp = next(iter(self.vps.values()), None)
        if vp is not None:
            vp.hv.refresh_tsc_page()

    def _install_intercept(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_install_intercept", data)
        kind, access, param = int(inp.intercept_type), int(inp.access_type), inp.intercept_parameter
        if kind == lib.HV_INTERCEPT_TYPE_X64_IO_PORT:
            self.io_intercepts.add(int(param.io_port))
        elif kind == lib.HV_INTERCEPT_TYPE_X64_MSR:
            self.all_msrs_intercepted = access
            self._native_msrs_changed()
        elif kind == lib.HV_INTERCEPT_TYPE_X64_MSR_INDEX:
            self.msr_intercepts[int(param.msr_index)] = access
            self._native_msrs_changed()
        elif kind == lib.HV_INTERCEPT_TYPE_X64_CPUID:
            self.cpuid_intercepts.add(int(param.cpuid_index))
        elif kind == lib.HV_INTERCEPT_TYPE_EXCEPTION:
            if param.exception_vector > 31:
                return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
            self.exception_intercepts.add(int(param.exception_vector))
            for vp in self.vps.values():
                if vp.engine is not None:
                    vp.engine.intercept_exceptions(self.exception_bitmap())
        elif kind == lib.HV_INTERCEPT_TYPE_HYPERCALL:
            self.intercepts_hypercalls = True
            for vp in self.vps.values():
                if vp.engine is not None:
                    vp.engine.intercept_hypercalls(True)
        elif kind in (lib.HV_INTERCEPT_TYPE_X64_GLOBAL_CPUID, lib.HV_INTERCEPT_TYPE_MMIO, lib.HV_INTERCEPT_TYPE_X64_APIC_WRITE):
            pass  # accepted; MMIO (unmapped GPA) exits are always delivered here
        else:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        return HvResult(HV_OK)

    def _vp_registers(self, data: bytes, reps: int, start: int, write: bool) -> HvResult:
        ctype = "struct hv_input_set_vp_registers" if write else "struct hv_input_get_vp_registers"
        inp, _k = self._input(ctype, data)
        vp = self._vp(int(inp.vp_index))
        if vp is None:
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        header = ffi.sizeof(ctype)
        elem = ffi.sizeof("struct hv_register_assoc") if write else 4
        if len(data) < header + reps * elem:
            return HvResult(int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT))
        out = bytearray()
        done = start
        for i in range(start, reps):
            if write:
                assoc = inp.elements[i]
                status = register_file_set(vp, int(assoc.name), assoc.value)
            else:
                value = ffi.new("union hv_register_value *")
                status = register_file_get(vp, int(inp.names[i]), value)
                out += bytes(ffi.buffer(value))
            if status != HV_OK:
                return HvResult(status, bytes(out), done)
            done += 1
        return HvResult(HV_OK, bytes(out), done)

    def _get_vp_registers(self, data: bytes, reps: int, start: int) -> HvResult:
        return self._vp_registers(data, reps, start, write=False)

    def _set_vp_registers(self, data: bytes, reps: int, start: int) -> HvResult:
        return self._vp_registers(data, reps, start, write=True)

    def _translate(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_translate_virtual_address", data)
        vp = self._vp(int(inp.vp_index))
        if vp is None:
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        flags = int(inp.control_flags)
        access = x86.Access.READ
        if flags & lib.HV_TRANSLATE_GVA_VALIDATE_WRITE:
            access |= x86.Access.WRITE
        if flags & lib.HV_TRANSLATE_GVA_VALIDATE_EXECUTE:
            access |= x86.Access.EXECUTE
        if flags & lib.HV_TRANSLATE_GVA_USER_ACCESS:
            access |= x86.Access.USER
        t = x86.translate(self.memory, vp.reg(lib.HV_X64_REGISTER_CR0), vp.reg(lib.HV_X64_REGISTER_CR3),
                          vp.reg(lib.HV_X64_REGISTER_CR4), vp.reg(lib.HV_X64_REGISTER_EFER),
                          int(inp.gva_page) << PAGE_SHIFT, access)
        out = ffi.new("struct hv_output_translate_virtual_address *")
        out.translation_result.bits.result_code = int(t.result)
        out.gpa_page = t.gpa >> PAGE_SHIFT
        return HvResult(HV_OK, bytes(ffi.buffer(out)))

    def _assert_interrupt(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_assert_virtual_interrupt", data)
        kind = int(inp.control.bits.interrupt_type)
        if kind not in (lib.HV_X64_INTERRUPT_TYPE_FIXED, lib.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY, lib.HV_X64_INTERRUPT_TYPE_NMI):
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        vector = int(inp.vector)
        if kind != lib.HV_X64_INTERRUPT_TYPE_NMI and not 16 <= vector <= 255:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        if not self.route_interrupt(int(inp.dest_addr), vector, kind, bool(inp.control.bits.logical_dest_mode)):
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        return HvResult(HV_OK)

    def _clear_interrupt(self, data: bytes, reps: int, start: int) -> HvResult:
        return HvResult(HV_OK)

    def _register_intercept_result(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_register_intercept_result", data)
        if inp.intercept_type != lib.HV_INTERCEPT_TYPE_X64_CPUID:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        p = inp.parameters.cpuid
        sub = int(p.input.ecx) if p.input.subleaf_specific else -1
        r = p.result
        self.cpuid_results[(int(p.input.eax), sub)] = (r.eax, r.eax_mask, r.ebx, r.ebx_mask, r.ecx, r.ecx_mask, r.edx, r.edx_mask)
        return HvResult(HV_OK)

    def _gpa_access_states(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_get_gpa_pages_access_state", data)
        flags = inp.flags.bits
        out = bytearray()
        done = start
        for i in range(start, reps):
            gpa = (int(inp.hv_gpa_page_number) + i) << PAGE_SHIFT
            region = self.memory.lookup(gpa)
            if region is None:
                return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER), bytes(out), done)
            page = (gpa - region.gpa) >> PAGE_SHIFT
            out.append(region.access[page])
            state = region.access[page]
            if flags.clear_accessed:
                state &= ~0b01
            if flags.set_accessed:
                state |= 0b01
            if flags.clear_dirty:
                state &= ~0b10
            if flags.set_dirty:
                state |= 0b10
            region.access[page] = state
            if flags.clear_dirty and self.tracking and region.writable and page not in region.write_protected:
                self._protect_pages(region, [page])
            done += 1
        return HvResult(HV_OK, bytes(out), done)

    def _post_message_direct(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_post_message_direct", data)
        vp = self._vp(int(inp.vp_index))
        if vp is None:
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        if inp.sint_index >= 16:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        message = bytes(ffi.buffer(inp.message))
        if message[4] > lib.HV_MESSAGE_PAYLOAD_BYTE_COUNT:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        return HvResult(vp.post_message(int(inp.sint_index), message))

    def _signal_event_direct(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_signal_event_direct", data)
        vp = self._vp(int(inp.target_vp))
        if vp is None:
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        if inp.target_sint >= 16:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        status, newly = vp.signal_event(int(inp.target_sint), int(inp.flag_number))
        return HvResult(status, _SIGNALLED[newly])

    def _read_gpa(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_read_gpa", data)
        out = ffi.new("struct hv_output_read_gpa *")
        if not 1 <= inp.byte_count <= 16:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        try:
            chunk = self.memory.read(int(inp.base_gpa), int(inp.byte_count))
        except Exception:  # noqa: BLE001 - outside RAM
            out.access_result.result_code = lib.HV_ACCESS_GPA_UNMAPPED
        else:
            ffi.memmove(out.data, chunk, len(chunk))
        return HvResult(HV_OK, bytes(ffi.buffer(out)))

    def _write_gpa(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_write_gpa", data)
        out = ffi.new("struct hv_output_write_gpa *")
        if not 1 <= inp.byte_count <= 16:
            return HvResult(int(lib.HV_STATUS_INVALID_PARAMETER))
        try:
            self.memory.write(int(inp.base_gpa), bytes(ffi.buffer(inp.data))[: inp.byte_count])
        except Exception:  # noqa: BLE001 - outside RAM
            out.access_result.result_code = lib.HV_ACCESS_GPA_UNMAPPED
        return HvResult(HV_OK, bytes(ffi.buffer(out)))

    def _vp_cpuid_values(self, data: bytes, reps: int, start: int) -> HvResult:
        inp, _k = self._input("struct hv_input_get_vp_cpuid_values", data)
        vp = self._vp(int(inp.vp_index))
        if vp is None:
            return HvResult(int(lib.HV_STATUS_INVALID_VP_INDEX))
        header = ffi.sizeof("struct hv_input_get_vp_cpuid_values")
        if len(data) < header + reps * ffi.sizeof("struct hv_cpuid_leaf_info"):
            return HvResult(int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT))
        out = bytearray()
        for i in range(start, reps):
            leaf = inp.cpuid_leaf_info[i]
            values = self.cpuid(vp.index, int(leaf.eax), int(leaf.ecx))
            out += b"".join(v.to_bytes(4, "little") for v in values)
        return HvResult(HV_OK, bytes(out), reps)

    def _scrub(self, data: bytes, reps: int, start: int) -> HvResult:
        return HvResult(HV_OK)

    _HANDLERS: dict[int, Callable[[SimPartition, bytes, int, int], HvResult]] = {
        int(lib.HVCALL_GET_PARTITION_PROPERTY): _get_property,
        int(lib.HVCALL_GET_PARTITION_PROPERTY_EX): _get_property,
        int(lib.HVCALL_SET_PARTITION_PROPERTY): _set_property,
        int(lib.HVCALL_INSTALL_INTERCEPT): _install_intercept,
        int(lib.HVCALL_GET_VP_REGISTERS): _get_vp_registers,
        int(lib.HVCALL_SET_VP_REGISTERS): _set_vp_registers,
        int(lib.HVCALL_TRANSLATE_VIRTUAL_ADDRESS): _translate,
        int(lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT): _assert_interrupt,
        int(lib.HVCALL_CLEAR_VIRTUAL_INTERRUPT): _clear_interrupt,
        int(lib.HVCALL_REGISTER_INTERCEPT_RESULT): _register_intercept_result,
        int(lib.HVCALL_GET_GPA_PAGES_ACCESS_STATES): _gpa_access_states,
        int(lib.HVCALL_POST_MESSAGE_DIRECT): _post_message_direct,
        int(lib.HVCALL_SIGNAL_EVENT_DIRECT): _signal_event_direct,
        int(lib.HVCALL_READ_GPA): _read_gpa,
        int(lib.HVCALL_WRITE_GPA): _write_gpa,
        int(lib.HVCALL_GET_VP_CPUID_VALUES): _vp_cpuid_values,
        int(lib.HVCALL_SCRUB_PARTITION): _scrub,
    }

    def close(self) -> None:
        self._unfrozen.set()
        with self._lock:
            vps, self.vps = self.vps, {}
            doorbells, self.doorbells = self.doorbells, ()
        for vp in vps.values():
            vp.close()
        for doorbell in doorbells:
            os.close(doorbell.fd)
        for region in self.memory.regions:
            self.memory.remove(region)


_SEGMENT_REGS = {int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")}
_TABLE_REGS = {int(lib.HV_X64_REGISTER_GDTR), int(lib.HV_X64_REGISTER_IDTR)}
_SYNIC_SINT0 = int(lib.HV_REGISTER_SINT0)


def register_file_get(vp: SimVp, name: int, value: Any) -> int:
    """Read one hv_register_name into a union hv_register_value."""
    if name in _SEGMENT_REGS:
        base, limit, selector, attributes = vp.segment(name)
        value.segment.base, value.segment.limit = base, limit
        value.segment.selector, value.segment.attributes = selector, attributes
    elif name in _TABLE_REGS:
        base, limit, _sel, _attr = vp.segment(name)
        value.table.base, value.table.limit = base, limit
    elif name == lib.HV_REGISTER_DELIVERABILITY_NOTIFICATIONS:
        value.reg64 = vp.synic.deliverability
    elif name == lib.HV_REGISTER_SCONTROL:
        value.reg64 = vp.synic.scontrol
    elif name == lib.HV_REGISTER_SIMP:
        value.reg64 = vp.synic.simp
    elif name == lib.HV_REGISTER_SIEFP:
        value.reg64 = vp.synic.siefp
    elif _SYNIC_SINT0 <= name < _SYNIC_SINT0 + 16:
        value.reg64 = vp.synic.sints[name - _SYNIC_SINT0]
    elif name in _MSR_BACKED:
        msr = vp.read_msr(_MSR_BACKED[name])
        value.reg64 = msr or 0
    elif name in VECTOR_REGISTERS:
        wide = vp.reg(name)
        value.reg128.low_part, value.reg128.high_part = wide & (1 << 64) - 1, wide >> 64
    else:
        value.reg64 = vp.reg(name)
    return HV_OK


def register_file_set(vp: SimVp, name: int, value: Any) -> int:
    if name in _SEGMENT_REGS:
        s = value.segment
        vp.set_segment(name, int(s.base), int(s.limit), int(s.selector), int(s.attributes))
    elif name in _TABLE_REGS:
        vp.set_segment(name, int(value.table.base), int(value.table.limit), 0, 0)
    elif name == lib.HV_REGISTER_DELIVERABILITY_NOTIFICATIONS:
        return vp.set_deliverability(int(value.reg64))
    elif name == lib.HV_REGISTER_SCONTROL:
        vp.synic.scontrol = int(value.reg64)
    elif name == lib.HV_REGISTER_SIMP:
        vp.synic.simp = int(value.reg64)
    elif name == lib.HV_REGISTER_SIEFP:
        vp.synic.siefp = int(value.reg64)
    elif _SYNIC_SINT0 <= name < _SYNIC_SINT0 + 16:
        vp.write_msr(int(lib.HV_X64_MSR_SINT0) + name - _SYNIC_SINT0, int(value.reg64))  # the MSR's side effects too
    elif name in _MSR_BACKED:
        if vp.write_msr(_MSR_BACKED[name], int(value.reg64)) is None:
            return int(lib.HV_STATUS_INVALID_PARAMETER)
        if name in _TIMER_REGISTERS:
            vp.timers_changed()   # the VP may be running with the old deadline
    elif name in VECTOR_REGISTERS:
        vp.set_reg(name, int(value.reg128.low_part) | int(value.reg128.high_part) << 64)
    elif name in (lib.HV_REGISTER_INTERCEPT_SUSPEND, lib.HV_REGISTER_EXPLICIT_SUSPEND, lib.HV_REGISTER_PENDING_INTERRUPTION,
                  lib.HV_REGISTER_PENDING_EVENT0):
        vp.regs.state[name] = int(value.reg64)
    else:
        vp.set_reg(name, int(value.reg64))
    return HV_OK


_TIMER_REGISTERS = frozenset(int(lib.HV_REGISTER_STIMER0_CONFIG) + i for i in range(8))

_MSR_BACKED = {
    int(lib.HV_REGISTER_GUEST_OS_ID): int(lib.HV_X64_MSR_GUEST_OS_ID),
    int(lib.HV_X64_REGISTER_HYPERCALL): int(lib.HV_X64_MSR_HYPERCALL),
    int(lib.HV_REGISTER_VP_INDEX): int(lib.HV_X64_MSR_VP_INDEX),
    int(lib.HV_REGISTER_TIME_REF_COUNT): int(lib.HV_X64_MSR_TIME_REF_COUNT),
    int(lib.HV_REGISTER_REFERENCE_TSC): int(lib.HV_X64_MSR_REFERENCE_TSC),
    **{int(lib.HV_REGISTER_STIMER0_CONFIG) + i: int(lib.HV_MSR_STIMER0_CONFIG) + i for i in range(8)},
    **{int(lib.HV_REGISTER_GUEST_CRASH_P0) + i: int(lib.HV_MSR_CRASH_P0) + i for i in range(6)},
}
