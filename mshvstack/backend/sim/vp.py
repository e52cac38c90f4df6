"""One simulated virtual processor: the run loop over its parts.

``run()`` behaves like the hypervisor behind MSHV_RUN_VP: it executes the
guest until something needs the VMM, then returns that hv_message (also
left in the intercept message page).  The VP stays suspended at the
intercepting instruction until the next run.  The parts it runs over, each
owning its state: the register file and register page (regfile.py), the CPU
engine (engines/), the LAPIC, the Hyper-V emulator (hv1.py: synthetic MSRs,
SynIC, timers), the root's side of its SynIC (synicport.py), the
instructions the hypervisor carries out (vpinsns.py: MSRs, CPUID,
hypercalls), INIT/SIPI (startup.py) and the intercept encoder (intercepts.py).

Threads and locks (docs/concurrency.md): the VP's own thread (the one in
``run``) owns its registers, its engine and its run-loop state; other
threads reach the VP only through the methods that say "any thread"
(kick, queue_*, post_message, signal_event, set_deliverability,
timers_changed) and the partition's hypercalls.  Its locks, in order:
``_run_lock`` (one run at a time, held across the whole run; nothing else
is held across ``engine.run``: a VP running alone waits for the others to
reach a block boundary), then the partition's lock (a dirty-tracking fault),
its engine's, ``wake`` (the wake-up state), its SynIC port's (host writers
of the SynIC pages), and its LAPIC's lock.
"""

from __future__ import annotations

import mmap
import threading
import time
from typing import TYPE_CHECKING, Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import intercepts, x86
from mshvstack.backend.sim.engines.base import Engine, StopKind
from mshvstack.backend.sim.engines.unicorn import UnicornEngine
from mshvstack.backend.sim.hv1 import HvEmulator
from mshvstack.backend.sim.lapic import XAPIC_BASE, Lapic
from mshvstack.backend.sim.memory import GpaUnmapped
from mshvstack.backend.sim.messages import new_message, to_bytes
from mshvstack.backend.sim.regfile import APIC_BASE_ENABLE, APIC_BASE_X2APIC, PAGE, VECTOR_REGISTERS, RegisterFile
from mshvstack.backend.sim.startup import IDLE_WAIT_S, Startup
from mshvstack.backend.sim.synic import SynIc
from mshvstack.backend.sim.synicport import SynicPort
from mshvstack.backend.sim.vpinsns import VpInstructions
from mshvstack.backend.sim.vpstops import VpStops

if TYPE_CHECKING:
    from mshvstack.backend.sim.hypervisor import SimPartition

__all__ = ["VECTOR_REGISTERS", "Kicked", "SimVp"]
R = lib  # register names read better as R.HV_X64_REGISTER_*
MESSAGE_SIZE = ffi.sizeof("struct hv_message")


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
        self.intercept_page = mmap.mmap(-1, PAGE)
        # Kicks, INIT/SIPI and wake-ups from other threads: guards kicked and the startup state, and a
        # halted VP waits on it.  After _run_lock; under it only the LAPIC's lock.  Not reentrant: what
        # can notify (an interrupt accepted, a timer fired) is never called with it held.
        self.wake = threading.Condition(threading.Lock())
        self.lapic = Lapic(index, partition.route_interrupt, self.notify, self.interrupt_arrived)
        self.regs = RegisterFile(index, self._apic_base_set)
        self.register_page = self.regs.page
        self.reg, self.set_reg, self.segment, self.set_segment = self.regs.reg, self.regs.set_reg, self.regs.segment, self.regs.set_segment
        self.code_bits = self.regs.code_bits
        self.hv = HvEmulator(index, self.lapic, _HvServices(self), partition.hv_msrs)
        self.port = SynicPort(self.hv.synic, partition.memory, self.queue_interrupt, self._sints_deliverable)
        self.post_message, self.signal_event = self.port.post_message, self.port.signal_event
        self.set_deliverability, self.end_of_message = self.port.set_deliverability, self.port.end_of_message
        self.instructions = VpInstructions(self)
        self.read_msr, self.write_msr, self.eoi = self.instructions.read_msr, self.instructions.write_msr, self.instructions.eoi
        self.stops = VpStops(self)
        self.startup = Startup(self)
        self.queue_init, self.queue_startup = self.startup.queue_init, self.startup.queue_startup
        self.kicked = False
        self.halted = False
        self.pending_exit: bytes | None = None       # e.g. SINT deliverable, raised outside run

    @property
    def synic(self) -> SynIc:
        return self.hv.synic

    @property
    def engine(self) -> Engine | None:
        return self.regs.engine

    def _apic_base_set(self, value: int) -> None:
        self.lapic.x2apic = bool(value & APIC_BASE_ENABLE and value & APIC_BASE_X2APIC)

    def ensure_engine(self) -> Engine:
        if self.regs.engine is not None:
            return self.regs.engine
        engine = UnicornEngine(self.stops.on_special, self, self._acknowledge_interrupt, self.partition.engines,
                               offer=self._offer_now)
        for region in self.partition.memory.regions:
            engine.map(region.gpa, region.size, region.userspace_addr, region.writable, region.executable)
        if self.partition.lapic_enabled and not self.partition.memory.lookup(XAPIC_BASE):
            engine.map_mmio(XAPIC_BASE, PAGE, self.instructions.xapic_read, self.instructions.xapic_write)
        for region in self.partition.memory.regions:
            for page in sorted(region.write_protected):
                engine.protect(region.gpa + (page << 12), PAGE, False, region.executable)
        self.regs.load_into(engine)
        engine.intercept_exceptions(self.partition.exception_bitmap())
        engine.intercept_hypercalls(self.partition.intercepts_hypercalls)
        engine.run_msrs_natively(*self.partition.native_msrs())
        engine.attach_vp(self.index, int(ffi.cast("uintptr_t", self.regs.page_cdata())),
                         int(ffi.cast("uintptr_t", ffi.from_buffer(self.intercept_page))))
        return engine

    # ---- code and memory access for the engine (CodeReader) and the partition
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

    # ---- from other threads
    def kick(self) -> None:
        """Make a blocked or running run() return Kicked (the driver's EINTR)."""
        with self.wake:
            self.kicked = True
            self.wake.notify_all()
        if self.engine is not None:
            self.engine.cancel()

    def interrupt_arrived(self) -> None:
        """An interrupt was accepted (any thread): a halted VP wakes; a running one offers it at
        its next block boundary without leaving its engine."""
        with self.wake:
            self.wake.notify_all()
        if self.engine is not None:
            self.engine.offer_soon()

    def notify(self) -> None:
        """Something may be deliverable now: wake a halted VP, stop a running one
        (at its next block boundary) so the run loop offers it."""
        with self.wake:
            self.wake.notify_all()
        if self.engine is not None:
            self.engine.cancel()

    def timers_changed(self) -> None:
        """A timer was armed from outside the VP's thread (the VMM set its registers): a
        running engine stops and a halted VP wakes, so the run loop takes the new deadline."""
        self.notify()

    def queue_interrupt(self, vector: int) -> None:
        self.lapic.accept(vector)

    def queue_nmi(self) -> None:
        self.lapic.nmi_pending = True
        self.notify()

    def _sints_deliverable(self, sints: int) -> None:
        msg, payload = new_message(lib.HVMSG_SYNIC_SINT_DELIVERABLE, "struct hv_x64_sint_deliverable_message")
        intercepts.fill_header(self, payload.header)
        payload.deliverable_sints = sints
        self.pending_exit = to_bytes(msg)

    # ---- the run loop
    def run(self) -> bytes:
        """Run until an intercept; returns the 256-byte message.  Raises Kicked.
        One run at a time: a second caller waits for the first (the driver's VP mutex)."""
        with self._run_lock:
            self.regs.consume_page()
            self.partition.wait_unfrozen(self)
            while True:
                exit_msg: bytes | _EngineWrote | None = None
                if self.kicked or self.pending_exit is not None:   # a kick missed here stops the engine at once
                    with self.wake:
                        if self.kicked:
                            self.kicked = False
                            self.regs.publish_page()   # the VP ran since the last exit: the page shows it now
                            raise Kicked()
                        exit_msg, self.pending_exit = self.pending_exit, None
                if exit_msg is None:
                    exit_msg = self._step()
                if isinstance(exit_msg, _EngineWrote):
                    return self.intercept_page[:MESSAGE_SIZE]
                if exit_msg is not None:
                    self.intercept_page[: len(exit_msg)] = exit_msg
                    self.regs.publish_page()
                    return exit_msg

    def _step(self) -> bytes | _EngineWrote | None:
        startup = self.startup
        if startup.suspended() and not startup.take():
            return None
        deadline = self._poll_timers()
        if self.halted:
            if not self._wait_for_interrupt() or startup.pending:
                return None
            deadline = self._poll_timers()
        engine = self.ensure_engine()
        if self.kicked:
            return None   # kicked before the engine existed, so nothing cancelled it: take the kick first
        if self.regs.state.get(R.HV_REGISTER_PENDING_INTERRUPTION, 0) & 1:
            self._deliver_pending_interruption(engine)
        engine.offer_interrupt(self._offer_now())   # delivered once the guest can take it (IF, shadows, NMI blocking)
        self.regs.running()
        stop = engine.run(deadline)
        if stop.kind is StopKind.WRITTEN:
            return ENGINE_WROTE
        self.regs.stopped()
        return self.stops.handle(stop)

    def _deliver_pending_interruption(self, engine: Any) -> None:
        """An event the VMM queued in HV_REGISTER_PENDING_INTERRUPTION is taken on entry (one is pending)."""
        raw = self.regs.state.get(R.HV_REGISTER_PENDING_INTERRUPTION, 0)
        self.regs.state[R.HV_REGISTER_PENDING_INTERRUPTION] = 0
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
    def _poll_timers(self) -> int:
        """Fire the timers that are due; when the engine must stop for the next expiry
        (monotonic ns, never in the past; 0: no timer armed)."""
        lapic, expiry = self.lapic.poll_timer(), self.hv.poll_timers()
        if expiry is None:
            return lapic or 0   # no synthetic timer armed (the common case)
        return self._deadline(lapic, expiry)

    def deadline_ns(self) -> int:
        """When the engine must stop for the next timer expiry (0: no timer armed)."""
        return self._deadline(self.lapic.timer_deadline(), self.hv.next_timer_expiry())

    def _deadline(self, lapic: int | None, expiry: int | None) -> int:
        hv = None if expiry is None else self.partition.reference_to_monotonic(expiry)
        if hv is None or lapic is None:
            return lapic or hv or 0
        return min(lapic, hv)

    def _offer_now(self) -> int:
        """On the VP's thread: a pending NMI goes to the engine; the interrupt to offer (-1: none)."""
        if self.lapic.nmi_pending and self.engine is not None:
            self.lapic.nmi_pending = False
            self.engine.inject_nmi()
        vector = self.lapic.deliverable()
        return -1 if vector is None else vector

    def _acknowledge_interrupt(self, vector: int) -> int:
        """The engine delivered ``vector``: the LAPIC moves it to in-service."""
        self.lapic.acknowledge(vector)
        self.halted = False
        following = self.lapic.deliverable()
        return -1 if following is None else following

    def interruptible(self) -> bool:
        return bool(self.reg(R.HV_X64_REGISTER_RFLAGS) & x86.RFLAGS_IF)

    def _wait_for_interrupt(self) -> bool:
        while True:
            # Without the condition: a timer that fires accepts its interrupt, which notifies.  Polled
            # before the check below, so what fires is seen there; what arrives later notifies the wait.
            self._poll_timers()
            with self.wake:
                if self.lapic.nmi_pending or self.startup.pending or (self.interruptible() and self.lapic.deliverable() is not None):
                    self.halted = False
                    return True
                if self.kicked:
                    return False
                deadline = self.deadline_ns()
                wait = IDLE_WAIT_S if not deadline else min(IDLE_WAIT_S, max(deadline - time.monotonic_ns(), 0) / 1e9)
                self.wake.wait(wait)

    def close(self) -> None:
        engine, self.regs.engine = self.regs.engine, None
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
        self._vp.eoi()

    def end_of_message(self) -> None:
        self._vp.partition.end_of_message(self._vp)

    def timers_changed(self) -> None:
        self._vp.timers_changed()

    def post_timer_message(self, sint: int, payload: bytes) -> bool:
        msg, body = new_message(lib.HVMSG_TIMER_EXPIRED, "struct hv_timer_message_payload")
        ffi.memmove(body, payload, len(payload))
        return bool(self._vp.post_message(sint, to_bytes(msg)) == lib.HV_STATUS_SUCCESS)
