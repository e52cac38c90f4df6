"""One simulated virtual processor: a register file and a small run loop.

``run()`` behaves like the hypervisor behind MSHV_RUN_VP: it executes the
guest until something needs the VMM, then returns that hv_message (also
left in the intercept message page).  The VP stays suspended at the
intercepting instruction until the next run.  The parts it runs over:
the CPU engine (engines/), the Hyper-V emulator (hv1.py), the LAPIC, the
machine-check banks and the intercept encoder (intercepts.py).

Threads and locks (docs/concurrency.md): the VP's own thread (the one in
``run``) owns its registers, its engine and its run-loop state; other
threads reach the VP only through the methods that say "any thread"
(kick, queue_*, post_message, signal_event, set_deliverability,
timers_changed) and the partition's hypercalls.  Its locks, in order:
``_run_lock`` (one run at a time, held across the whole run; nothing else
is held across ``engine.run``: a VP running alone waits for the others to
reach a block boundary), then the partition's lock (a dirty-tracking fault),
its engine's, ``_wake`` (the wake-up state), ``_synic_lock`` (host writers
of the SynIC pages), and its LAPIC's lock.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import intercepts, x86
from mshvstack.backend.sim.engines.base import CONTINUE, Engine, EngineStop, Instruction, Special, StopKind
from mshvstack.backend.sim.engines.unicorn import UnicornEngine
from mshvstack.backend.sim.hv1 import SYNTHETIC_MSRS, HvEmulator, MsrFault
from mshvstack.backend.sim.lapic import X2APIC_MSR_BASE, XAPIC_BASE, Lapic
from mshvstack.backend.sim.mca import MachineCheck
from mshvstack.backend.sim.memory import GpaUnmapped
from mshvstack.backend.sim.messages import new_message, to_bytes
from mshvstack.backend.sim.synic import SLOT, SynIc

if TYPE_CHECKING:
    from mshvstack.backend.sim.hypervisor import SimPartition

R = lib  # register names read better as R.HV_X64_REGISTER_*
PAGE = 4096
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1
VECTOR_REGISTERS = frozenset(int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
                             [f"XMM{i}" for i in range(16)] + [f"FP_MMX{i}" for i in range(8)]
                             + ["FP_CONTROL_STATUS", "XMM_CONTROL_STATUS"])

_SEGMENT_NAMES = (R.HV_X64_REGISTER_ES, R.HV_X64_REGISTER_CS, R.HV_X64_REGISTER_SS,
                  R.HV_X64_REGISTER_DS, R.HV_X64_REGISTER_FS, R.HV_X64_REGISTER_GS,
                  R.HV_X64_REGISTER_LDTR, R.HV_X64_REGISTER_TR)
_TABLE_NAMES = (R.HV_X64_REGISTER_GDTR, R.HV_X64_REGISTER_IDTR)
_GPR_NAMES = tuple(int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
                   ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
                    "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"))
_PAGE_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
_PAGE_GPR_OFFSET = ffi.offsetof("struct hv_vp_register_page", "gp_registers")
_PAGE_SEGMENT_OFFSETS = tuple(ffi.offsetof("struct hv_vp_register_page", s) for s in _PAGE_SEGMENTS)
_PAGE_CR0_OFFSET = ffi.offsetof("struct hv_vp_register_page", "cr0")
_PAGE_GPR_ORDER = (*_GPR_NAMES, R.HV_X64_REGISTER_RIP, R.HV_X64_REGISTER_RFLAGS)
_PAGE_CONTROL_ORDER = (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_CR8,
                       R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_DR7)
_PACK_GPRS = struct.Struct(f"<{len(_PAGE_GPR_ORDER)}Q").pack_into
_UNPACK_GPRS = struct.Struct(f"<{len(_GPR_NAMES)}Q").unpack_from
_PACK_SEGMENT = struct.Struct("<QIHH").pack_into
_PACK_CONTROL = struct.Struct(f"<{len(_PAGE_CONTROL_ORDER)}Q").pack_into
_PAGE_VERSION = int(lib.HV_VP_REGISTER_PAGE_VERSION_1)

APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_X2APIC = 1 << 10
MSR_APIC_BASE = 0x1B
X2APIC_ICR, X2APIC_EOI = 0x300, 0xB0

# Architectural MSRs the CPU engine implements; they run natively unless intercepted.
MSR_TSC = 0x10
_NATIVE_MSR_NAMES = {
    "TSC_ADJUST": 0x3B, "UCODE_REV": 0x8B, "SPEC_CTRL": 0x48, "PRED_CMD": 0x49, "MTRRCAP": 0xFE,
    "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176,
    "MISC_ENABLE": 0x1A0, "PAT": 0x277, "MTRR_DEF_TYPE": 0x2FF,
    "EFER": 0xC0000080, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083, "SFMASK": 0xC0000084,
    "FS_BASE": 0xC0000100, "GS_BASE": 0xC0000101, "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
}
NATIVE_MSRS = frozenset(_NATIVE_MSR_NAMES.values())
MTRR_VARIABLE_AND_FIXED_RANGE = 0x200  # 0x200..0x2FF

# HV_REGISTER_INTERNAL_ACTIVITY_STATE bit: the VP waits for a SIPI.
STARTUP_SUSPEND = 1
# HV_REGISTER_INTERRUPT_STATE bits.
INTERRUPT_SHADOW, NMI_MASKED = 1, 2
# How long a halted VP sleeps between checks when nothing can wake it sooner.
IDLE_WAIT_S = 0.05

# Architectural state after INIT/reset (SDM vol. 3A, 9.1.1).
_RESET_CS = (0xFFFF0000, 0xFFFF, 0xF000, 0x9B)
_RESET_DATA_SEGMENT = (0, 0xFFFF, 0, 0x93)


MESSAGE_SIZE = ffi.sizeof("struct hv_message")
MESSAGE_FLAGS_OFFSET = ffi.offsetof("struct hv_message_header", "message_flags")


def _message_pending_bit() -> int:
    flags = ffi.new("union hv_message_flags *")
    flags.bits.msg_pending = 1
    return int(flags.asu8)


MESSAGE_PENDING = _message_pending_bit()
_BARRIER = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier for this thread's guest-memory stores and later loads
    (x86 lets a load pass an earlier store): acquiring a lock is a locked instruction."""
    with _BARRIER:
        pass


class _EngineWrote:
    """The engine wrote the intercept message and the register page itself."""


ENGINE_WROTE = _EngineWrote()


class Kicked(Exception):
    """run() was interrupted (MSHV_RUN_VP returns EINTR)."""


class SimVp:
    def __init__(self, partition: SimPartition, index: int) -> None:
        self.partition = partition
        self.index = index
        self._run_lock = threading.Lock()            # one run at a time (MSHV_RUN_VP's VP mutex): first in the VP's order
        self.register_page = mmap.mmap(-1, PAGE)
        self._page_cdata: Any = None
        self.intercept_page = mmap.mmap(-1, PAGE)
        self.engine: Engine | None = None
        self._state: dict[int, int] = self._reset_state()
        self._segments = self._reset_segments()
        # Kicks, INIT/SIPI and wake-ups from other threads: guards _kick, _init_pending and _sipi_vector,
        # and a halted VP waits on it.  After _run_lock; under it only the LAPIC's lock.  Not reentrant:
        # what can notify (an interrupt accepted, a timer fired) is never called with it held.
        self._wake = threading.Condition(threading.Lock())
        self.lapic = Lapic(index, partition.route_interrupt, self._notify)
        self.hv = HvEmulator(index, self.lapic, _HvServices(self), partition.hv_msrs)
        self.machine_check = MachineCheck()
        self._kick = False
        self._halted = False
        self._init_pending = False                   # INIT and SIPI arrive from other VPs' threads ...
        self._sipi_vector: int | None = None         # ... and are taken on this VP's own (see _startup)
        self._pending_exit: bytes | None = None      # e.g. SINT deliverable, raised outside run
        self._synic_lock = threading.Lock()          # host writers of this VP's SIMP slots, SIEF flags, deliverability (then the GPA map's)
        # Registers read in one batch after the engine stops (at the first read); valid until it runs again.
        self._snap: dict[int, int] | None = None
        self._snap_due = False
        self._publish_register_page()

    @property
    def synic(self) -> SynIc:
        return self.hv.synic

    def _reset_state(self) -> dict[int, int]:
        """Registers of a new VP (SDM vol. 3A, 9.1.1, but for EDX, which stays 0 for
        the VMM to set up); VP 0 is the bootstrap processor (APIC_BASE.BSP)."""
        state = {n: 0 for n in _GPR_NAMES}
        apic_base = XAPIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if self.index == 0 else 0)
        state.update({R.HV_X64_REGISTER_RIP: 0xFFF0, R.HV_X64_REGISTER_RFLAGS: 2,
                      R.HV_X64_REGISTER_CR0: 0x60000010, R.HV_X64_REGISTER_CR2: 0, R.HV_X64_REGISTER_CR3: 0,
                      R.HV_X64_REGISTER_CR4: 0, R.HV_X64_REGISTER_CR8: 0, R.HV_X64_REGISTER_EFER: 0,
                      R.HV_X64_REGISTER_APIC_BASE: apic_base, R.HV_X64_REGISTER_PAT: 0x0007040600070406,
                      R.HV_X64_REGISTER_XFEM: 3, R.HV_X64_REGISTER_DR6: 0xFFFF0FF0, R.HV_X64_REGISTER_DR7: 0x400,
                      # x87 control word and MXCSR at power-up, every x87 register empty (SDM vol. 3A, table 9-1)
                      R.HV_X64_REGISTER_FP_CONTROL_STATUS: lib.X86_FCW_RESET,
                      R.HV_X64_REGISTER_XMM_CONTROL_STATUS: lib.X86_MXCSR_RESET << 64 | lib.X86_MXCSR_MASK << 96})
        return state

    @staticmethod
    def _reset_segments() -> dict[int, tuple[int, int, int, int]]:
        segments = {n: _RESET_DATA_SEGMENT for n in _SEGMENT_NAMES}
        segments[R.HV_X64_REGISTER_CS] = _RESET_CS
        segments[R.HV_X64_REGISTER_LDTR] = (0, 0xFFFF, 0, 0x82)
        segments[R.HV_X64_REGISTER_TR] = (0, 0xFFFF, 0, 0x8B)
        segments.update({n: (0, 0xFFFF, 0, 0) for n in _TABLE_NAMES})
        return segments

    # ------------------------------------------------------------------ registers
    def reg(self, name: int) -> int:
        snap = self._snap
        if snap is None and self._snap_due and self.engine is not None:
            snap = self._snap = self.engine.snapshot()
            self._snap_due = False
        if snap is not None and name in snap:
            return snap[name]
        if self.engine is not None and self.engine.holds(name):
            return self.engine.reg(name)
        if name == R.HV_REGISTER_INTERRUPT_STATE and self.engine is not None:
            return (INTERRUPT_SHADOW if self.engine.interrupt_shadow() else 0) | (NMI_MASKED if self.engine.nmi_blocked() else 0)
        return self._state.get(name, 0)

    def set_reg(self, name: int, value: int) -> None:
        value &= U128 if name in VECTOR_REGISTERS else U64
        self._state[name] = value
        if name == R.HV_X64_REGISTER_APIC_BASE:
            self.lapic.x2apic = bool(value & APIC_BASE_ENABLE and value & APIC_BASE_X2APIC)
        snap = self._snap
        if snap is not None and name in snap:
            snap[name] = value
        engine = self.engine
        if engine is None:
            return
        if engine.holds(name):
            engine.set_reg(name, value)
        elif name == R.HV_REGISTER_INTERRUPT_STATE:
            engine.set_interrupt_state(bool(value & INTERRUPT_SHADOW), bool(value & NMI_MASKED))

    def segment(self, name: int) -> tuple[int, int, int, int]:
        if self.engine is not None:
            return self.engine.segment(name)
        return self._segments[name]

    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
        self._segments[name] = (base, limit, selector, attributes)
        if self.engine is not None:
            self.engine.set_segment(name, base, limit, selector, attributes)

    def code_bits(self) -> int:
        if self.engine is not None:
            return self.engine.code_bits()
        cs_attributes = self._segments[R.HV_X64_REGISTER_CS][3]
        if not self._state[R.HV_X64_REGISTER_CR0] & x86.CR0_PE:
            return 16
        if self._state[R.HV_X64_REGISTER_EFER] & x86.EFER_LMA and cs_attributes & 0x2000:
            return 64
        return 32 if cs_attributes & 0x4000 else 16

    def _ensure_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        engine = UnicornEngine(self._on_special, self, self._acknowledge_interrupt, self.partition.engines)
        for region in self.partition.memory.regions:
            engine.map(region.gpa, region.size, region.userspace_addr, region.writable, region.executable)
        if self.partition.lapic_enabled and not self.partition.memory.lookup(XAPIC_BASE):
            engine.map_mmio(XAPIC_BASE, PAGE, self._xapic_read, self._xapic_write)
        for region in self.partition.memory.regions:
            for page in sorted(region.write_protected):
                engine.protect(region.gpa + (page << 12), PAGE, False, region.executable)
        # The mode follows from EFER, the control registers and CS: set them first.
        for name in (R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_CR0):
            engine.set_reg(name, self._state.get(name, 0))
        for name in _TABLE_NAMES + _SEGMENT_NAMES:
            engine.set_segment(name, *self._segments[name])
        for name, value in self._state.items():
            if engine.holds(name):
                engine.set_reg(name, value)
        interrupt_state = self._state.get(R.HV_REGISTER_INTERRUPT_STATE, 0)
        engine.set_interrupt_state(bool(interrupt_state & INTERRUPT_SHADOW), bool(interrupt_state & NMI_MASKED))
        engine.intercept_exceptions(self.partition.exception_bitmap())
        engine.attach_vp(self.index, int(ffi.cast("uintptr_t", self._page())),
                         int(ffi.cast("uintptr_t", ffi.from_buffer(self.intercept_page))))
        self.engine = engine
        return engine

    # ---- code access for the engine (CodeReader)
    def translate(self, linear: int) -> int | None:
        if self.engine is not None:
            cr0, cr3, cr4, efer = self.engine.paging()
        else:
            cr0, cr3, cr4, efer = (self.reg(n) for n in (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR3,
                                                         R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_EFER))
        t = x86.translate(self.partition.memory, cr0, cr3, cr4, efer, linear, x86.Access.READ)
        return t.gpa if t.result is x86.TranslateResult.SUCCESS else None

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        try:
            return self.partition.memory.read(gpa, size)
        except GpaUnmapped:
            return None

    def host_address(self, gpa: int) -> int | None:
        region = self.partition.memory.lookup(gpa)
        return None if region is None else region.userspace_addr + gpa - region.gpa

    def map_region(self, gpa: int, size: int, address: int, writable: bool, executable: bool) -> None:
        if self.engine is not None:
            self.engine.map(gpa, size, address, writable, executable)

    def unmap_region(self, gpa: int, size: int) -> None:
        if self.engine is not None:
            self.engine.unmap(gpa, size)

    # ------------------------------------------------------------------ register page
    def _page(self) -> Any:
        if self._page_cdata is None:
            self._page_cdata = ffi.from_buffer("struct hv_vp_register_page *", self.register_page)
        return self._page_cdata

    def _publish_register_page(self) -> None:
        """Refresh the shared register page, as the hypervisor does on an intercept
        (the engine's core writes it from the CPU once there is one)."""
        if self.engine is not None:
            self.engine.publish_registers()
        else:
            self._write_register_page()

    def _write_register_page(self) -> None:
        """The register page from this VP's register file (the reference for the core's)."""
        page = self._page()
        reg = self.reg
        # GPRs, RIP, RFLAGS are contiguous from gp_registers: one pack.
        _PACK_GPRS(self.register_page, _PAGE_GPR_OFFSET, *[reg(n) for n in _PAGE_GPR_ORDER])
        for offset, name in zip(_PAGE_SEGMENT_OFFSETS, _SEGMENT_NAMES):
            _PACK_SEGMENT(self.register_page, offset, *self.segment(name))
        _PACK_CONTROL(self.register_page, _PAGE_CR0_OFFSET, *[reg(n) for n in _PAGE_CONTROL_ORDER])
        page.version = _PAGE_VERSION
        page.dirty = 0
        page.isvalid = 1

    def _consume_register_page(self) -> None:
        """Apply what the VMM wrote through the page (dirty classes only)."""
        engine = self.engine
        if engine is not None:
            self._snap = None   # the engine's registers change under it
            if engine.consume_registers():
                self._consume_page_segments()
            return
        page = self._page()
        dirty = page.dirty
        if not page.isvalid or not dirty:
            return
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_GENERAL):
            # The VMM usually changed one or two: only those reach the engine.
            reg = self.reg
            for name, value in zip(_GPR_NAMES, _UNPACK_GPRS(self.register_page, _PAGE_GPR_OFFSET)):
                if value != reg(name):
                    self.set_reg(name, value)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_IP):
            self.set_reg(R.HV_X64_REGISTER_RIP, page.rip)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_FLAGS):
            self.set_reg(R.HV_X64_REGISTER_RFLAGS, page.rflags)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_SEGMENT):
            self._consume_page_segments()
        page.dirty = 0

    def _consume_page_segments(self) -> None:
        page = self._page()
        for attr, name in zip(_PAGE_SEGMENTS, _SEGMENT_NAMES):
            seg = getattr(page, attr)
            self.set_segment(name, seg.base, seg.limit, seg.selector, seg.attributes)
        page.dirty = 0

    # ------------------------------------------------------------------ run
    def kick(self) -> None:
        """Make a blocked or running run() return Kicked (the driver's EINTR)."""
        with self._wake:
            self._kick = True
            self._wake.notify_all()
        if self.engine is not None:
            self.engine.cancel()

    def _notify(self) -> None:
        """Something may be deliverable now: wake a halted VP, stop a running one
        (at its next block boundary) so the run loop offers it."""
        with self._wake:
            self._wake.notify_all()
        if self.engine is not None:
            self.engine.cancel()

    def timers_changed(self) -> None:
        """A timer was armed from outside the VP's thread (the VMM set its registers): a
        running engine stops and a halted VP wakes, so the run loop takes the new deadline."""
        self._notify()

    def queue_interrupt(self, vector: int) -> None:
        self.lapic.accept(vector)

    def queue_nmi(self) -> None:
        self.lapic.nmi_pending = True
        self._notify()

    def queue_init(self) -> None:
        """INIT from another VP (any thread): taken by this VP's thread before it runs again."""
        with self._wake:
            self._init_pending = True
            self._sipi_vector = None    # a SIPI that came before this INIT is void
        self._notify()

    def queue_startup(self, vector: int) -> None:
        """SIPI (any thread): starts a VP that waits for one; ignored otherwise, so
        only the first of the usual two SIPIs starts it."""
        with self._wake:
            waiting = self._init_pending or self._state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND
            if not waiting or self._sipi_vector is not None:
                return
            self._sipi_vector = vector & 0xFF
        self._notify()

    def _xapic_read(self, offset: int, size: int) -> int:
        return self.lapic.read(offset & ~0xF) if self._xapic_enabled() else 0xFFFFFFFF

    def _xapic_write(self, offset: int, size: int, value: int) -> None:
        if not self._xapic_enabled():
            return
        if offset & ~0xF == 0xB0:
            self._eoi()
        else:
            self.lapic.write(offset & ~0xF, value)
            if self.engine is not None:
                self.engine.set_deadline(self._deadline_ns())

    def _eoi(self) -> None:
        vector = self.lapic.eoi()
        if vector is not None:
            self.partition.end_of_interrupt(vector)
            if self.lapic.irr and self.engine is not None:
                self.engine.cancel()  # a lower-priority interrupt may be deliverable now

    def _xapic_enabled(self) -> bool:
        base = self.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE) and not base & APIC_BASE_X2APIC

    def run(self) -> bytes:
        """Run until an intercept; returns the 256-byte message.  Raises Kicked.
        One run at a time: a second caller waits for the first (the driver's VP mutex)."""
        with self._run_lock:
            return self._run_locked()

    def _run_locked(self) -> bytes:
        self._consume_register_page()
        self.partition.wait_unfrozen(self)
        while True:
            exit_msg: bytes | _EngineWrote | None = None
            if self._kick or self._pending_exit is not None:   # a kick missed here stops the engine at once
                with self._wake:
                    if self._kick:
                        self._kick = False
                        self._publish_register_page()   # the VP ran since the last exit: the page shows it now
                        raise Kicked()
                    exit_msg, self._pending_exit = self._pending_exit, None
            if exit_msg is None:
                exit_msg = self._step()
            if isinstance(exit_msg, _EngineWrote):
                return self.intercept_page[:MESSAGE_SIZE]
            if exit_msg is not None:
                self.intercept_page[: len(exit_msg)] = exit_msg
                self._publish_register_page()
                return exit_msg

    def _step(self) -> bytes | _EngineWrote | None:
        if self._init_pending or self._state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND:
            if not self._startup():
                return None
        self._poll_timers()
        if self._halted and (not self._wait_for_interrupt() or self._init_pending):
            return None
        engine = self._ensure_engine()
        if self._kick:
            return None   # kicked before the engine existed, so nothing cancelled it: take the kick first
        self._deliver_pending_interruption(engine)
        self._offer_events(engine)
        self._snap = None
        self._snap_due = False
        stop = engine.run(self._deadline_ns())
        if stop.kind is StopKind.WRITTEN:
            return ENGINE_WROTE
        self._snap_due = True
        return self._handle_stop(stop)

    def _deliver_pending_interruption(self, engine: Any) -> None:
        """An event the VMM queued in HV_REGISTER_PENDING_INTERRUPTION is taken on entry."""
        raw = self._state.get(R.HV_REGISTER_PENDING_INTERRUPTION, 0)
        if not raw & 1:
            return
        self._state[R.HV_REGISTER_PENDING_INTERRUPTION] = 0
        pending = ffi.new("union hv_x64_pending_interruption_register *", {"as_uint64": raw})
        kind = pending.bits.interruption_type
        if kind == R.HV_X64_PENDING_EXCEPTION:
            engine.inject_exception(int(pending.bits.interruption_vector),
                                    int(pending.bits.error_code) if pending.bits.deliver_error_code else None)
        elif kind == R.HV_X64_PENDING_NMI:
            engine.inject_nmi()
        elif kind == R.HV_X64_PENDING_INTERRUPT:
            self.lapic.accept(int(pending.bits.interruption_vector) & 0xFF)

    # ---- time and events
    def _poll_timers(self) -> None:
        self.lapic.poll_timer()
        self.hv.poll_timers()

    def _deadline_ns(self) -> int:
        """When the engine must stop for the next timer expiry (0: no timer armed)."""
        lapic = self.lapic.timer_deadline()
        expiry = self.hv.next_timer_expiry()
        hv = None if expiry is None else self.partition.reference_to_monotonic(expiry)
        if hv is None or lapic is None:
            return lapic or hv or 0
        return min(lapic, hv)

    def _offer_events(self, engine: Engine) -> None:
        """Tell the engine what to deliver once the guest can take it (IF, shadows, NMI blocking)."""
        if self.lapic.nmi_pending:
            self.lapic.nmi_pending = False
            engine.inject_nmi()
        vector = self.lapic.deliverable()
        engine.offer_interrupt(-1 if vector is None else vector)

    def _acknowledge_interrupt(self, vector: int) -> int:
        """The engine delivered ``vector``: the LAPIC moves it to in-service."""
        self.lapic.acknowledge(vector)
        self._halted = False
        following = self.lapic.deliverable()
        return -1 if following is None else following

    def _interruptible(self) -> bool:
        return bool(self.reg(R.HV_X64_REGISTER_RFLAGS) & x86.RFLAGS_IF)

    def _can_take_interrupt(self) -> bool:
        return (self.lapic.nmi_pending or self._init_pending
                or (self._interruptible() and self.lapic.deliverable() is not None))

    def _wait_for_interrupt(self) -> bool:
        while True:
            # Without the condition: a timer that fires accepts its interrupt, which notifies.  Polled
            # before the check below, so what fires is seen there; what arrives later notifies the wait.
            self._poll_timers()
            with self._wake:
                if self._can_take_interrupt():
                    self._halted = False
                    return True
                if self._kick:
                    return False
                deadline = self._deadline_ns()
                wait = IDLE_WAIT_S if not deadline else min(IDLE_WAIT_S, max(deadline - time.monotonic_ns(), 0) / 1e9)
                self._wake.wait(wait)

    # ------------------------------------------------------------------ exits
    def _handle_stop(self, stop: EngineStop) -> bytes | None:
        kind = stop.kind
        if kind in (StopKind.CANCELLED, StopKind.DEADLINE):
            return None
        if kind is StopKind.SPECIAL:
            assert stop.instruction is not None
            return self._special_exit(stop.instruction)
        if kind in (StopKind.UNMAPPED, StopKind.PROTECTION):
            return self._memory_exit(stop)
        if kind is StopKind.EXCEPTION:
            return intercepts.exception(self, stop)
        return intercepts.header_only(self, lib.HVMSG_UNRECOVERABLE_EXCEPTION)  # triple fault

    def _memory_exit(self, stop: EngineStop) -> bytes | None:
        gpa = stop.address   # the engine reports the physical address: the guest's paging already succeeded
        if stop.kind is StopKind.PROTECTION and stop.write and self.partition.track_write(gpa):
            return None  # dirty-page tracking fault: recorded, page writable again, retry
        if stop.kind is StopKind.UNMAPPED and stop.write and stop.instruction is not None:
            if self.partition.ring_doorbell(gpa, stop.size, stop.value):
                # An ioeventfd took the write: the guest continues, no exit.
                self.set_reg(R.HV_X64_REGISTER_RIP, stop.instruction.rip + stop.instruction.length)
                return None
        return intercepts.memory(self, stop, gpa, stop.linear)

    def _special_exit(self, insn: Instruction) -> bytes:
        if insn.kind is Special.HLT:
            self.set_reg(R.HV_X64_REGISTER_RIP, insn.rip + insn.length)
        leaf, subleaf = self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF, self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        cpuid = self.partition.cpuid(self.index, leaf, subleaf) if insn.kind is Special.CPUID else (0, 0, 0, 0)
        return intercepts.special(self, insn, cpuid)

    # ---- special instructions (called inside the engine, before they execute)
    def _on_special(self, insn: Instruction) -> int | None:
        next_rip = insn.rip + insn.length
        if insn.kind is Special.IO:
            return None
        if insn.kind is Special.HLT:
            if self._interruptible() and self.partition.lapic_enabled:
                self._halted = True
                if self.engine is not None:
                    self.engine.cancel()
                return next_rip
            return None
        if insn.kind is Special.CPUID:
            if self.partition.intercepts_cpuid(self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF):
                return None
            self._emulate_cpuid()
            return next_rip
        if insn.kind in (Special.RDMSR, Special.WRMSR):
            return self._msr(insn, next_rip)
        if insn.kind is Special.VMCALL:
            return self._hypercall(insn, next_rip)
        return None

    def _emulate_cpuid(self) -> None:
        leaf = self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF
        sub = self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        a, b, c, d = self.partition.cpuid(self.index, leaf, sub)
        for name, value in ((R.HV_X64_REGISTER_RAX, a), (R.HV_X64_REGISTER_RBX, b), (R.HV_X64_REGISTER_RCX, c), (R.HV_X64_REGISTER_RDX, d)):
            self.set_reg(name, value)

    # ---- MSRs
    def _msr(self, insn: Instruction, next_rip: int) -> int | None:
        index = self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        write = insn.kind is Special.WRMSR
        value = (self.reg(R.HV_X64_REGISTER_RDX) & 0xFFFFFFFF) << 32 | (self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF)
        if self.partition.intercepts_msr(index, write):
            return None
        if index in NATIVE_MSRS or (index & ~0xFF) == MTRR_VARIABLE_AND_FIXED_RANGE:
            return CONTINUE  # architectural MSRs the engine implements itself
        handled = self.write_msr(index, value) if write else self.read_msr(index)
        if handled is None:
            if not self.partition.unimplemented_msr_ignore:
                self._ensure_engine().inject_exception(x86.VECTOR_GP, 0)
                return insn.rip  # the fault is taken at the instruction
            handled = 0
        if not write:
            self.set_reg(R.HV_X64_REGISTER_RAX, handled & 0xFFFFFFFF)
            self.set_reg(R.HV_X64_REGISTER_RDX, handled >> 32)
        elif self.engine is not None:
            self.engine.set_deadline(self._deadline_ns())  # the write may have armed a timer
        if self._pending_exit is not None and self.engine is not None:
            self.engine.cancel()  # e.g. EOM made a SINT deliverable: report it now
        return next_rip

    def read_msr(self, index: int) -> int | None:
        """An MSR the hypervisor implements, or None (#GP)."""
        if index in SYNTHETIC_MSRS:
            value = self.hv.read(index)
            return None if isinstance(value, MsrFault) else value
        if MachineCheck.handles(index):
            return self.machine_check.read(index)
        if index == MSR_TSC:
            return self.reg(R.HV_X64_REGISTER_TSC)
        if index == MSR_APIC_BASE:
            return self.reg(R.HV_X64_REGISTER_APIC_BASE)
        if index == x86.MSR_IA32_ARCH_CAPABILITIES:   # read-only (a write is #GP)
            return x86.ARCH_CAP_RDCL_NO
        if X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            return self.lapic.icr if offset == X2APIC_ICR else self.lapic.read(offset)
        return None

    def write_msr(self, index: int, value: int) -> int | None:
        """0 when the write is taken, None for #GP."""
        if index in SYNTHETIC_MSRS:
            return None if isinstance(self.hv.write(index, value), MsrFault) else 0
        if MachineCheck.handles(index):
            return 0 if self.machine_check.write(index, value) else None
        if index == MSR_TSC:
            return 0  # the TSC follows the host's counter (writes are dropped)
        if index == MSR_APIC_BASE:
            self.set_reg(R.HV_X64_REGISTER_APIC_BASE, value)
            return 0
        if X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            if offset == X2APIC_ICR:
                self.lapic.write_icr64(value)
            elif offset == X2APIC_EOI:
                self._eoi()
            else:
                self.lapic.write(offset, value)
            return 0
        return None

    def _x2apic_enabled(self) -> bool:
        base = self.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE and base & APIC_BASE_X2APIC)

    # ---- guest hypercalls (vmcall through the hypercall page)
    def _hypercall(self, insn: Instruction, next_rip: int) -> int | None:
        # TLFS conventions: 64-bit callers RCX (control), RDX (input), result in RAX;
        # 32-bit callers EDX:EAX, EBX:ECX, result in EDX:EAX.
        long_mode = self.code_bits() == 64
        control = self.reg(R.HV_X64_REGISTER_RCX) if long_mode else self._pair(R.HV_X64_REGISTER_RDX, R.HV_X64_REGISTER_RAX)
        code = control & 0xFFFF
        fast = bool(control & lib.HV_HYPERCALL_FAST_BIT)
        status = int(lib.HV_STATUS_INVALID_HYPERCALL_CODE)
        if code in (lib.HVCALL_POST_MESSAGE, lib.HVCALL_SIGNAL_EVENT):
            if self.partition.intercepts_hypercalls:
                return None  # HYPERCALL_INTERCEPT: the VMM answers and advances RIP
            gpa = self.reg(R.HV_X64_REGISTER_RDX) if long_mode else self._pair(R.HV_X64_REGISTER_RBX, R.HV_X64_REGISTER_RCX)
            status = self._validate_synic_hypercall(code, fast, gpa)
            if status == lib.HV_STATUS_SUCCESS:
                status = int(lib.HV_STATUS_INVALID_CONNECTION_ID)
        if long_mode:
            self.set_reg(R.HV_X64_REGISTER_RAX, status)
        else:
            self.set_reg(R.HV_X64_REGISTER_RAX, status & 0xFFFFFFFF)
            self.set_reg(R.HV_X64_REGISTER_RDX, status >> 32)
        return next_rip

    def _pair(self, high: int, low: int) -> int:
        return (self.reg(high) & 0xFFFFFFFF) << 32 | (self.reg(low) & 0xFFFFFFFF)

    def _validate_synic_hypercall(self, code: int, fast: bool, gpa: int) -> int:
        if code == lib.HVCALL_POST_MESSAGE:
            if fast:
                return int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
            if gpa & 7:
                return int(lib.HV_STATUS_INVALID_ALIGNMENT)
            try:
                raw = self.partition.memory.read(gpa, 16)
            except Exception:  # noqa: BLE001 - GPA outside RAM
                return int(lib.HV_STATUS_INVALID_PARAMETER)
            _conn, _rsvd, msg_type, size = struct.unpack("<IIII", raw)
            if size > lib.HV_MESSAGE_MAX_PAYLOAD_BYTES or msg_type & 0x80000000:
                return int(lib.HV_STATUS_INVALID_PARAMETER)
        return int(lib.HV_STATUS_SUCCESS)

    # ---- SynIC delivery from the root
    # Any thread posts and signals (the VMM answers on whichever VP's thread took
    # the guest's hypercall; timers post on their own VP's): host writers take
    # _synic_lock, and the guest, which runs meanwhile, frees slots and clears
    # flags with its own atomics and barriers.
    def post_message(self, sint: int, message: bytes) -> int:
        """HvPostMessageDirect: write into the SIMP slot or report it busy.

        A busy slot gets MessagePending, then is looked at again after a full
        barrier: a guest that freed it meanwhile may have read the flags before
        we set them and will write no EOM, so it gets the message now."""
        slot = self.synic.message_slot(sint)
        vector = self.synic.vector(sint)
        if slot is None or vector is None or not self.synic.enabled:
            return int(lib.HV_STATUS_INVALID_VP_STATE)
        memory = self.partition.memory
        with self._synic_lock:
            try:
                if not self._slot_free(slot):
                    flags = memory.read(slot + MESSAGE_FLAGS_OFFSET, 1)[0] | MESSAGE_PENDING
                    memory.write(slot + MESSAGE_FLAGS_OFFSET, bytes([flags]))
                    full_barrier()
                    if not self._slot_free(slot):
                        return int(lib.HV_STATUS_INSUFFICIENT_BUFFERS)
                memory.write(slot + 4, message[4:SLOT])
                memory.write(slot, message[:4])  # type last: the guest polls it
            except GpaUnmapped:
                return int(lib.HV_STATUS_INVALID_VP_STATE)   # a SIMP outside RAM (overlays there are not modelled)
        self.queue_interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS)

    def signal_event(self, sint: int, flag: int) -> tuple[int, bool]:
        base = self.synic.flags_base(sint)
        vector = self.synic.vector(sint)
        if base is None or vector is None or flag >= lib.HV_EVENT_FLAGS_COUNT:
            return int(lib.HV_STATUS_INVALID_VP_STATE if flag < lib.HV_EVENT_FLAGS_COUNT else lib.HV_STATUS_INVALID_PARAMETER), False
        memory = self.partition.memory
        with self._synic_lock:   # the guest only clears flags: a set bit is never lost, at worst seen twice
            try:
                byte = memory.read(base + flag // 8, 1)[0]
                newly = not byte & (1 << (flag % 8))
                if newly:
                    memory.write(base + flag // 8, bytes([byte | 1 << (flag % 8)]))
            except GpaUnmapped:
                return int(lib.HV_STATUS_INVALID_VP_STATE), False   # a SIEFP outside RAM
        if newly:
            self.queue_interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS), newly

    def set_deliverability(self, value: int) -> int:
        """HV_REGISTER_DELIVERABILITY_NOTIFICATIONS from the VMM (any thread); an HV_STATUS.

        The hypervisor takes the SINT bits and the interrupt notification with
        its priority; an NMI notification or a reserved bit is
        HV_STATUS_INVALID_PARAMETER (rust-vmm's test sees EINVAL for 1 on
        hardware) and leaves the register as it was.  Interrupt notifications
        are kept but never raised here (no HVMSG_X64_INTERRUPTION_DELIVERABLE:
        docs/simulator.md)."""
        register = ffi.new("union hv_deliverability_notifications_register *", {"as_uint64": value})
        if register.bits.nmi_notification or register.bits.reserved:
            return int(lib.HV_STATUS_INVALID_PARAMETER)
        with self._synic_lock:
            self.synic.deliverability = value
        return int(lib.HV_STATUS_SUCCESS)

    def end_of_message(self) -> None:
        """Guest wrote EOM: tell the VMM which SINT slots are free if it asked."""
        with self._synic_lock:
            register = ffi.new("union hv_deliverability_notifications_register *", {"as_uint64": self.synic.deliverability})
            wanted = int(register.bits.sints)
            if not wanted:
                return
            free = 0
            for sint in range(16):
                slot = self.synic.message_slot(sint)
                if wanted & (1 << sint) and slot is not None and self._slot_free(slot):
                    free |= 1 << sint
            register.bits.sints = wanted & ~free
            self.synic.deliverability = int(register.as_uint64)
        if free:
            msg, payload = new_message(lib.HVMSG_SYNIC_SINT_DELIVERABLE, "struct hv_x64_sint_deliverable_message")
            intercepts.fill_header(self, payload.header)
            payload.deliverable_sints = free
            self._pending_exit = to_bytes(msg)

    def _slot_free(self, slot: int) -> bool:
        try:
            return int.from_bytes(self.partition.memory.read(slot, 4), "little") == int(lib.HVMSG_NONE)
        except GpaUnmapped:
            return False

    # ---- INIT and SIPI (on the VP's own thread: its engine is not thread-safe)
    def _startup(self) -> bool:
        """Take a pending INIT, then wait in wait-for-SIPI; True once the VP may run."""
        with self._wake:
            init, self._init_pending = self._init_pending, False
        if init:
            self._take_init()
        with self._wake:
            while (self._sipi_vector is None and not self._kick and not self._init_pending
                   and self._state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND):
                self._wake.wait(IDLE_WAIT_S)
            if self._init_pending:
                return False   # a new INIT first (a SIPI sent after it stays queued)
            vector, self._sipi_vector = self._sipi_vector, None
        if vector is not None:
            self._start_at(vector)
            return True
        return False   # kicked, or the VMM ended the wait: the run loop decides

    def _take_init(self) -> None:
        """INIT: the reset state but for the APIC base and the MSRs, a reset
        LAPIC, and the VP waits for a SIPI."""
        self._apply_reset_state()
        self.lapic.reset()
        self._halted = False
        self._state[R.HV_REGISTER_INTERNAL_ACTIVITY_STATE] = STARTUP_SUSPEND

    def _start_at(self, vector: int) -> None:
        """SIPI: the AP starts in real mode at vector << 12 (CS = vector << 8, IP 0)."""
        self._apply_reset_state()
        self.set_segment(R.HV_X64_REGISTER_CS, vector << 12, 0xFFFF, vector << 8, 0x9B)
        self.set_reg(R.HV_X64_REGISTER_RIP, 0)
        self._state[R.HV_REGISTER_INTERNAL_ACTIVITY_STATE] = 0
        self._halted = False

    def _apply_reset_state(self) -> None:
        """The state INIT leaves (SDM vol. 3A, 9.1.1): EDX holds the processor signature."""
        state = self._reset_state()
        state[R.HV_X64_REGISTER_RDX] = self.partition.cpuid(self.index, 1, 0)[0]
        for kept in (R.HV_X64_REGISTER_APIC_BASE, R.HV_X64_REGISTER_PAT):   # MSRs: INIT leaves them
            del state[kept]
        # Leave paging and long mode first: the mode follows from CR0, CR4 and EFER.
        for name in (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_CR3):
            self.set_reg(name, state.pop(name))
        for name, value in state.items():
            self.set_reg(name, value)
        for name, segment in self._reset_segments().items():
            self.set_segment(name, *segment)
        self.set_reg(R.HV_REGISTER_INTERRUPT_STATE, 0)   # no STI shadow, NMIs unblocked

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        # The VP pages stay valid while the VMM still maps them (as after
        # close() on the real driver, until munmap); they go with the last view.
        for page in (self.register_page, self.intercept_page):
            try:
                page.close()
            except BufferError:
                pass


class _HvServices:
    """What the Hyper-V emulator may ask of its VP and partition."""

    def __init__(self, vp: SimVp) -> None:
        self._vp = vp
        self.memory = vp.partition.memory

    def reference_time(self) -> int:
        return self._vp.partition.reference_time()

    def tsc_hz(self) -> int:
        return int(self._vp.partition.properties[int(lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY)])

    def reference_tsc_parameters(self) -> tuple[int, int]:
        partition = self._vp.partition
        return partition.reference_scale, partition.reference_offset

    def flush_code(self, gpa: int, size: int) -> None:
        self._vp.partition.flush_code(gpa, size)

    def end_of_interrupt(self) -> None:
        self._vp._eoi()

    def end_of_message(self) -> None:
        self._vp.partition.end_of_message(self._vp)

    def timers_changed(self) -> None:
        self._vp.timers_changed()

    def post_timer_message(self, sint: int, payload: bytes) -> bool:
        msg, body = new_message(lib.HVMSG_TIMER_EXPIRED, "struct hv_timer_message_payload")
        ffi.memmove(body, payload, len(payload))
        return bool(self._vp.post_message(sint, to_bytes(msg)) == lib.HV_STATUS_SUCCESS)
