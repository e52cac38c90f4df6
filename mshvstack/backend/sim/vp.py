"""One simulated virtual processor: registers, exits, synthetic MSRs, SynIC.

``run()`` behaves like the hypervisor behind MSHV_RUN_VP: it executes the
guest until something needs the VMM, then returns that hv_message (also
left in the intercept message page).  The VP stays suspended at the
intercepting instruction until the next run.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import x86
from mshvstack.backend.sim.engines.base import CONTINUE, Engine, EngineStop, Instruction, Special, StopKind
from mshvstack.backend.sim.engines.unicorn import UnicornEngine
from mshvstack.backend.sim.lapic import TIMER_HZ, X2APIC_MSR_BASE, XAPIC_BASE, Lapic
from mshvstack.backend.sim.messages import new_message, to_bytes
from mshvstack.backend.sim.memory import GpaUnmapped
from mshvstack.backend.sim.synic import SLOT, SynIc

if TYPE_CHECKING:
    from mshvstack.backend.sim.hypervisor import SimPartition

R = lib  # register names read better as R.HV_X64_REGISTER_*
PAGE = 4096
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1
VECTOR_REGISTERS = frozenset(int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
                             [f"XMM{i}" for i in range(16)] + [f"FP_MMX{i}" for i in range(8)])

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

# Synthetic MSRs the hypervisor itself implements.
MSR_GUEST_OS_ID = int(lib.HV_X64_MSR_GUEST_OS_ID)
MSR_HYPERCALL = int(lib.HV_X64_MSR_HYPERCALL)
MSR_VP_INDEX = int(lib.HV_X64_MSR_VP_INDEX)
MSR_TIME_REF_COUNT = int(lib.HV_X64_MSR_TIME_REF_COUNT)
MSR_SCONTROL = int(lib.HV_X64_MSR_SCONTROL)
MSR_SVERSION = int(lib.HV_X64_MSR_SVERSION)
MSR_SIEFP = int(lib.HV_X64_MSR_SIEFP)
MSR_SIMP = int(lib.HV_X64_MSR_SIMP)
MSR_EOM = int(lib.HV_X64_MSR_EOM)
MSR_SINT0 = int(lib.HV_X64_MSR_SINT0)
MSR_EOI = int(lib.HV_X64_MSR_EOI)
MSR_ICR = int(lib.HV_X64_MSR_ICR)
MSR_TPR = int(lib.HV_X64_MSR_TPR)
MSR_VP_ASSIST_PAGE = int(lib.HV_X64_MSR_VP_ASSIST_PAGE)
MSR_TSC_FREQUENCY = int(lib.HV_X64_MSR_TSC_FREQUENCY)
MSR_APIC_FREQUENCY = int(lib.HV_X64_MSR_APIC_FREQUENCY)
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_X2APIC = 1 << 10
MSR_APIC_BASE = 0x1B

# Architectural MSRs the CPU engine implements; they run natively unless intercepted.
_NATIVE_MSR_NAMES = {
    "TSC": 0x10, "TSC_ADJUST": 0x3B, "UCODE_REV": 0x8B, "SPEC_CTRL": 0x48, "PRED_CMD": 0x49, "MTRRCAP": 0xFE,
    "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176, "MCG_CAP": 0x179, "MCG_STATUS": 0x17A,
    "MISC_ENABLE": 0x1A0, "PAT": 0x277, "MTRR_DEF_TYPE": 0x2FF,
    "EFER": 0xC0000080, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083, "SFMASK": 0xC0000084,
    "FS_BASE": 0xC0000100, "GS_BASE": 0xC0000101, "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
}
NATIVE_MSRS = frozenset(_NATIVE_MSR_NAMES.values())
MTRR_VARIABLE_AND_FIXED_RANGE = 0x200  # 0x200..0x2FF

# How long the CPU runs while a pending interrupt waits for IF=1.
BLOCKED_INTERRUPT_SLICE_US = 1000

# HV_REGISTER_INTERNAL_ACTIVITY_STATE bit: the VP waits for a SIPI.
STARTUP_SUSPEND = 1

# The hypercall page: vmcall; ret (Intel encoding; VMMCALL is trapped too).
HYPERCALL_PAGE_CODE = bytes.fromhex("0f01c1c3")


class Kicked(Exception):
    """run() was interrupted (MSHV_RUN_VP returns EINTR)."""


class SimVp:
    def __init__(self, partition: "SimPartition", index: int) -> None:
        self.partition = partition
        self.index = index
        self.lock = threading.Lock()                 # one MSHV_RUN_VP at a time
        self.register_page = mmap.mmap(-1, PAGE)
        self.intercept_page = mmap.mmap(-1, PAGE)
        self.synic = SynIc()
        self.engine: Engine | None = None
        self._state: dict[int, int] = self._reset_state()
        self._segments: dict[int, tuple[int, int, int, int]] = {n: (0, 0xFFFF, 0, 0x93) for n in _SEGMENT_NAMES}
        self._segments.update({n: (0, 0xFFFF, 0, 0) for n in _TABLE_NAMES})
        self._segments[R.HV_X64_REGISTER_TR] = (0, 0xFFFF, 0, 0x8B)
        self._wake = threading.Condition()
        self.lapic = Lapic(index, partition.send_ipi, self._notify)
        self._kick = False
        self._halted = False
        self._pending_exit: bytes | None = None      # e.g. SINT deliverable, raised outside run
        # Registers read in one batch after the engine stops; valid until it runs again.
        self._snap: dict[int, int] | None = None
        self._guest_os_id = 0
        self._vp_assist_page = 0  # stored for the guest; no enlightenment reads it yet
        self._hypercall_msr = 0
        self._started = time.monotonic_ns()

    @staticmethod
    def _reset_state() -> dict[int, int]:
        state = {n: 0 for n in _GPR_NAMES}
        state.update({R.HV_X64_REGISTER_RIP: 0xFFF0, R.HV_X64_REGISTER_RFLAGS: 2,
                      R.HV_X64_REGISTER_CR0: 0x60000010, R.HV_X64_REGISTER_CR2: 0, R.HV_X64_REGISTER_CR3: 0,
                      R.HV_X64_REGISTER_CR4: 0, R.HV_X64_REGISTER_CR8: 0, R.HV_X64_REGISTER_EFER: 0,
                      R.HV_X64_REGISTER_APIC_BASE: 0xFEE00900, R.HV_X64_REGISTER_PAT: 0x0007040600070406,
                      R.HV_X64_REGISTER_XFEM: 3, R.HV_X64_REGISTER_DR6: 0xFFFF0FF0, R.HV_X64_REGISTER_DR7: 0x400})
        return state

    # ------------------------------------------------------------------ registers
    def reg(self, name: int) -> int:
        snap = self._snap
        if snap is not None and name in snap:
            return snap[name]
        if self.engine is not None and self.engine.holds(name):
            return self.engine.reg(name)
        return self._state.get(name, 0)

    def set_reg(self, name: int, value: int) -> None:
        value &= U128 if name in VECTOR_REGISTERS else U64
        self._state[name] = value
        snap = self._snap
        if snap is not None and name in snap:
            snap[name] = value
        if self.engine is not None and self.engine.holds(name):
            if name in (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_EFER) and self._mode_bits() != self.engine.bits:
                self._drop_engine()
            else:
                self.engine.set_reg(name, value)

    def segment(self, name: int) -> tuple[int, int, int, int]:
        if self.engine is not None:
            return self.engine.segment(name)
        return self._segments[name]

    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
        self._segments[name] = (base, limit, selector, attributes)
        if self.engine is not None:
            if name == R.HV_X64_REGISTER_CS and self._mode_bits() != self.engine.bits:
                self._drop_engine()
            else:
                self.engine.set_segment(name, base, limit, selector, attributes)

    def _mode_bits(self) -> int:
        if not self.reg(R.HV_X64_REGISTER_CR0) & x86.CR0_PE:
            return 16
        if self.reg(R.HV_X64_REGISTER_EFER) & x86.EFER_LMA:
            return 64
        return 32

    def _drop_engine(self) -> None:
        """Mode changed under the engine (host set CR0/EFER/CS): rebuild it on next run."""
        engine = self.engine
        if engine is None:
            return
        self._snap = None
        for name in list(self._state):
            if engine.holds(name):
                self._state[name] = engine.reg(name)
        for name in _SEGMENT_NAMES + _TABLE_NAMES:
            self._segments[name] = engine.segment(name)
        self.engine = None
        engine.close()

    def _ensure_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        engine = UnicornEngine(self._mode_bits(), self._on_special, self)
        for region in self.partition.memory.regions:
            engine.map(region.gpa, region.size, region.userspace_addr, region.writable, region.executable)
        if self.partition.lapic_enabled and not self.partition.memory.lookup(XAPIC_BASE):
            engine.map_mmio(XAPIC_BASE, PAGE, self._xapic_read, self._xapic_write)
        for region in self.partition.memory.regions:
            for page in sorted(region.write_protected):
                engine.protect(region.gpa + (page << 12), PAGE, False, region.executable)
        # Order matters: paging registers before the mode bits that use them.
        for name in (R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_CR0):
            engine.set_reg(name, self._state.get(name, 0))
        for name, value in self._state.items():
            if engine.holds(name) and name != R.HV_X64_REGISTER_CR0:
                engine.set_reg(name, value)
        for name in _TABLE_NAMES + _SEGMENT_NAMES:
            engine.set_segment(name, *self._segments[name])
        self.engine = engine
        return engine

    # ---- code access for the engine (CodeReader)
    def translate(self, linear: int) -> int | None:
        t = x86.translate(self.partition.memory, self.reg(R.HV_X64_REGISTER_CR0), self.reg(R.HV_X64_REGISTER_CR3),
                          self.reg(R.HV_X64_REGISTER_CR4), self.reg(R.HV_X64_REGISTER_EFER), linear, x86.Access.READ)
        return t.gpa if t.result is x86.TranslateResult.SUCCESS else None

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        try:
            return self.partition.memory.read(gpa, size)
        except GpaUnmapped:
            return None

    def map_region(self, gpa: int, size: int, address: int, writable: bool, executable: bool) -> None:
        if self.engine is not None:
            self.engine.map(gpa, size, address, writable, executable)

    def unmap_region(self, gpa: int, size: int) -> None:
        if self.engine is not None:
            self.engine.unmap(gpa, size)

    # ------------------------------------------------------------------ register page
    def _page(self) -> Any:
        return ffi.from_buffer("struct hv_vp_register_page *", self.register_page)

    def _publish_register_page(self) -> None:
        """Refresh the shared register page, as the hypervisor does on an intercept."""
        page = self._page()
        reg = self.reg
        # GPRs, RIP, RFLAGS are contiguous from gp_registers: one pack.
        struct.pack_into(f"<{len(_GPR_NAMES) + 2}Q", self.register_page, _PAGE_GPR_OFFSET,
                         *[reg(n) for n in _GPR_NAMES], reg(R.HV_X64_REGISTER_RIP), reg(R.HV_X64_REGISTER_RFLAGS))
        for offset, name in zip(_PAGE_SEGMENT_OFFSETS, _SEGMENT_NAMES):
            base, limit, selector, attributes = self.segment(name)
            struct.pack_into("<QIHH", self.register_page, offset, base, limit, selector, attributes)
        struct.pack_into("<6Q", self.register_page, _PAGE_CR0_OFFSET,
                         *[reg(n) for n in (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4,
                                            R.HV_X64_REGISTER_CR8, R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_DR7)])
        page.version = lib.HV_VP_REGISTER_PAGE_VERSION_1
        page.dirty = 0
        page.isvalid = 1

    def _consume_register_page(self) -> None:
        """Apply what the VMM wrote through the page (dirty classes only)."""
        page = self._page()
        dirty = page.dirty
        if not page.isvalid or not dirty:
            return
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_GENERAL):
            for i, name in enumerate(_GPR_NAMES):
                self.set_reg(name, page.gp_registers[i])
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_IP):
            self.set_reg(R.HV_X64_REGISTER_RIP, page.rip)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_FLAGS):
            self.set_reg(R.HV_X64_REGISTER_RFLAGS, page.rflags)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_SEGMENT):
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
        """Something may be deliverable now: wake a halted VP, stop a running one."""
        with self._wake:
            self._wake.notify_all()
        if self.engine is not None:
            self.engine.cancel()

    def queue_interrupt(self, vector: int) -> None:
        self.lapic.accept(vector)

    def queue_nmi(self) -> None:
        self.lapic.nmi_pending = True
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

    def _eoi(self) -> None:
        vector = self.lapic.eoi()
        if vector is not None:
            self.partition.end_of_interrupt(vector)

    def _xapic_enabled(self) -> bool:
        base = self.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE) and not base & APIC_BASE_X2APIC

    def run(self) -> bytes:
        """Run until an intercept; returns the 256-byte message.  Raises Kicked."""
        self._consume_register_page()
        self.partition.wait_unfrozen(self)
        while True:
            with self._wake:
                if self._kick:
                    self._kick = False
                    raise Kicked()
                exit_msg, self._pending_exit = self._pending_exit, None
            if exit_msg is None:
                exit_msg = self._step()
            if exit_msg is not None:
                self.intercept_page[: len(exit_msg)] = exit_msg
                self._publish_register_page()
                return exit_msg

    def _step(self) -> bytes | None:
        if self._state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND:
            # An AP waiting for INIT/SIPI: nothing runs until start_at_sipi().
            with self._wake:
                while self._state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND and not self._kick:
                    self._wake.wait(0.05)
            return None
        if self._halted:
            if not self._wait_for_interrupt():
                return None
        self._deliver_pending()
        if self._pending_exit is not None:
            return None
        engine = self._ensure_engine()
        self._snap = None
        stop = engine.run(self._timer_slice_us())
        self._snap = engine.snapshot()
        return self._handle_stop(stop)

    def _timer_slice_us(self) -> int:
        """Run no longer than until the LAPIC timer's next expiry, and only briefly
        while an interrupt waits for the guest to set IF (the engine cannot stop at STI)."""
        deadline = self.lapic.timer_deadline()
        slice_us = 0 if deadline is None else max((deadline - time.monotonic_ns()) // 1000, 1)
        if self.lapic.irr and self.lapic.deliverable() is not None:  # irr: skip the lock when idle
            slice_us = min(slice_us or BLOCKED_INTERRUPT_SLICE_US, BLOCKED_INTERRUPT_SLICE_US)
        return slice_us

    def _interruptible(self) -> bool:
        return bool(self.reg(R.HV_X64_REGISTER_RFLAGS) & x86.RFLAGS_IF)

    def _can_take_interrupt(self) -> bool:
        return self.lapic.nmi_pending or (self._interruptible() and self.lapic.deliverable() is not None)

    def _wait_for_interrupt(self) -> bool:
        with self._wake:
            while not self._can_take_interrupt():
                if self._kick:
                    return False
                deadline = self.lapic.timer_deadline()
                wait = 0.05 if deadline is None else min(0.05, max(deadline - time.monotonic_ns(), 0) / 1e9)
                self._wake.wait(wait)
            self._halted = False
            return True

    def _deliver_pending(self) -> None:
        if self.lapic.nmi_pending:
            self.lapic.nmi_pending = False
            vector = 2
        else:
            if not self._interruptible():
                return
            pending = self.lapic.deliverable()
            if pending is None:
                return
            vector = pending
            self.lapic.acknowledge(vector)
        self._ensure_engine()
        try:
            x86.EventDelivery(self, self.partition.memory).deliver(vector)
        except x86.DeliveryFailed:
            self._pending_exit = self._header_only(lib.HVMSG_UNRECOVERABLE_EXCEPTION)

    # ------------------------------------------------------------------ exits
    def _fill_header(self, header: Any, insn_length: int = 0, access: int = 0, rip: int | None = None) -> None:
        header.vp_index = self.index
        header.instruction_length = insn_length & 0xF
        header.cr8 = self.reg(R.HV_X64_REGISTER_CR8) & 0xF
        header.intercept_access_type = access
        cs_base, cs_limit, cs_sel, cs_attr = self.segment(R.HV_X64_REGISTER_CS)
        cr0 = self.reg(R.HV_X64_REGISTER_CR0)
        efer = self.reg(R.HV_X64_REGISTER_EFER)
        state = header.execution_state.bits
        state.cpl = cs_sel & 3 if cr0 & x86.CR0_PE else 0
        state.cr0_pe = cr0 & 1
        state.cr0_am = (cr0 >> 18) & 1
        state.efer_lma = (efer >> 10) & 1
        header.cs_segment.base, header.cs_segment.limit = cs_base, cs_limit
        header.cs_segment.selector, header.cs_segment.attributes = cs_sel, cs_attr
        header.rip = self.reg(R.HV_X64_REGISTER_RIP) if rip is None else rip
        header.rflags = self.reg(R.HV_X64_REGISTER_RFLAGS)

    def _header_only(self, message_type: int) -> bytes:
        msg, payload = new_message(message_type, "struct hv_x64_halt_message")
        self._fill_header(payload.header)
        return to_bytes(msg)

    def _handle_stop(self, stop: EngineStop) -> bytes | None:
        if stop.kind is StopKind.CANCELLED:
            return None
        if stop.kind is StopKind.SPECIAL:
            assert stop.instruction is not None
            return self._special_exit(stop.instruction)
        if stop.kind in (StopKind.UNMAPPED, StopKind.PROTECTION):
            return self._memory_exit(stop)
        if stop.vector == x86.VECTOR_PF:
            return self._page_fault(stop)
        return self._exception(stop)

    def _page_fault(self, stop: EngineStop) -> bytes | None:
        """#PF from the engine: rebuild the error code from a walk of CR2."""
        cpl = self.segment(R.HV_X64_REGISTER_CS)[2] & 3
        access = (x86.Access.WRITE if stop.write else x86.Access.READ) | (x86.Access.EXECUTE if stop.execute else x86.Access.READ)
        if cpl == 3:
            access |= x86.Access.USER
        t = x86.translate(self.partition.memory, self.reg(R.HV_X64_REGISTER_CR0), self.reg(R.HV_X64_REGISTER_CR3),
                          self.reg(R.HV_X64_REGISTER_CR4), self.reg(R.HV_X64_REGISTER_EFER), stop.address, access)
        return self._exception(stop, error_code=t.error_code, cr2=stop.address)

    def _memory_exit(self, stop: EngineStop) -> bytes | None:
        paging = self.reg(R.HV_X64_REGISTER_CR0) & x86.CR0_PG
        gva = stop.address
        gpa = gva
        if paging:
            t = x86.translate(self.partition.memory, self.reg(R.HV_X64_REGISTER_CR0), self.reg(R.HV_X64_REGISTER_CR3),
                              self.reg(R.HV_X64_REGISTER_CR4), self.reg(R.HV_X64_REGISTER_EFER), gva,
                              x86.Access.WRITE if stop.write else x86.Access.READ)
            if t.result not in (x86.TranslateResult.SUCCESS, x86.TranslateResult.GPA_UNMAPPED):
                return self._exception(EngineStop(StopKind.EXCEPTION, stop.instruction, vector=x86.VECTOR_PF),
                                       error_code=t.error_code, cr2=gva)
            gpa = t.gpa if t.result is x86.TranslateResult.SUCCESS else gva
        if stop.kind is StopKind.PROTECTION and stop.write and self.partition.track_write(gpa):
            return None  # dirty-page tracking fault: recorded, page writable again, retry
        if stop.kind is StopKind.UNMAPPED and stop.write and stop.instruction is not None:
            if self.partition.ring_doorbell(gpa, stop.size, stop.value):
                # An ioeventfd took the write: the guest continues, no exit.
                self.set_reg(R.HV_X64_REGISTER_RIP, stop.instruction.rip + stop.instruction.length)
                return None
        kind = lib.HVMSG_UNMAPPED_GPA if stop.kind is StopKind.UNMAPPED else lib.HVMSG_GPA_INTERCEPT
        msg, payload = new_message(kind, "struct hv_x64_memory_intercept_message")
        access = lib.HV_INTERCEPT_ACCESS_EXECUTE if stop.execute else (lib.HV_INTERCEPT_ACCESS_WRITE if stop.write else lib.HV_INTERCEPT_ACCESS_READ)
        insn = stop.instruction
        self._fill_header(payload.header, insn.length if insn else 0, access)
        payload.guest_virtual_address = gva
        payload.guest_physical_address = gpa
        payload.memory_access_info.bits.gva_valid = 1
        payload.memory_access_info.bits.gva_gpa_valid = 1
        if insn is not None:
            payload.instruction_byte_count = len(insn.raw[:16])
            ffi.memmove(payload.instruction_bytes, insn.raw[:16], len(insn.raw[:16]))
        return to_bytes(msg)

    def _exception(self, stop: EngineStop, error_code: int | None = None, cr2: int | None = None) -> bytes | None:
        vector = stop.vector
        if self.partition.intercepts_exception(vector):
            msg, payload = new_message(lib.HVMSG_X64_EXCEPTION_INTERCEPT, "struct hv_x64_exception_intercept_message")
            self._fill_header(payload.header, stop.instruction.length if stop.instruction else 0)
            payload.exception_vector = vector
            if error_code is not None:
                payload.exception_info.bits.error_code_valid = 1
                payload.error_code = error_code
            payload.exception_parameter = cr2 or 0
            for attr in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"):
                setattr(payload, attr, self.reg(getattr(lib, f"HV_X64_REGISTER_{attr.upper()}")))
            return to_bytes(msg)
        if vector >= 32 and stop.instruction is not None:
            # int n: the frame returns after the instruction.
            self.set_reg(R.HV_X64_REGISTER_RIP, stop.instruction.rip + stop.instruction.length)
        if vector in x86.ERROR_CODE_VECTORS and error_code is None:
            error_code = 0
        delivery = x86.EventDelivery(self, self.partition.memory)
        for attempt_vector, code in ((vector, error_code), (x86.VECTOR_DF, 0)):
            try:
                delivery.deliver(attempt_vector, code, cr2 if attempt_vector == x86.VECTOR_PF else None)
                return None
            except x86.DeliveryFailed:
                continue
        return self._header_only(lib.HVMSG_UNRECOVERABLE_EXCEPTION)

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
        if insn.kind is Special.FARJUMP:
            return None if self._long_mode_target(insn) is not None else CONTINUE
        return None

    def _long_mode_target(self, insn: Instruction) -> tuple[int, int, int] | None:
        """(selector, offset, attributes) if this direct far jump enters 64-bit code."""
        raw = insn.raw
        operand16 = (self.engine is not None and self.engine.bits == 16) != (raw[0] == 0x66)
        body = raw[1:] if raw[0] == 0x66 else raw
        if body[0] != 0xEA:
            return None
        if not self.reg(R.HV_X64_REGISTER_EFER) & x86.EFER_LMA:
            return None
        size = 2 if operand16 else 4
        offset = int.from_bytes(body[1 : 1 + size], "little")
        selector = int.from_bytes(body[1 + size : 3 + size], "little")
        gdt_base = self.segment(R.HV_X64_REGISTER_GDTR)[0]
        try:
            descriptor = self.partition.memory.read_u64(gdt_base + (selector & ~7))
        except GpaUnmapped:  # a GDT outside RAM: let the CPU fault natively
            return None
        if not descriptor >> 53 & 1:
            return None
        return selector, offset, (descriptor >> 40) & 0xF0FF

    def _special_exit(self, insn: Instruction) -> bytes | None:
        if insn.kind is Special.FARJUMP:
            # The guest enters long mode: continue it in a 64-bit engine.
            target = self._long_mode_target(insn)
            assert target is not None
            selector, offset, attributes = target
            self._drop_engine()
            self._segments[R.HV_X64_REGISTER_CS] = (0, 0xFFFFFFFF, selector, attributes)
            self._state[R.HV_X64_REGISTER_RIP] = offset
            return None
        if insn.kind is Special.IO:
            return self._io_exit(insn)
        if insn.kind is Special.HLT:
            self.set_reg(R.HV_X64_REGISTER_RIP, insn.rip + insn.length)
            msg, payload = new_message(lib.HVMSG_X64_HALT, "struct hv_x64_halt_message")
            self._fill_header(payload.header, insn.length)
            return to_bytes(msg)
        if insn.kind is Special.CPUID:
            msg, payload = new_message(lib.HVMSG_X64_CPUID_INTERCEPT, "struct hv_x64_cpuid_intercept_message")
            self._fill_header(payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_EXECUTE)
            leaf, sub = self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF, self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
            payload.rax, payload.rcx = leaf, sub
            payload.rdx, payload.rbx = self.reg(R.HV_X64_REGISTER_RDX), self.reg(R.HV_X64_REGISTER_RBX)
            a, b, c, d = self.partition.cpuid(self.index, leaf, sub)
            payload.default_result_rax, payload.default_result_rbx = a, b
            payload.default_result_rcx, payload.default_result_rdx = c, d
            return to_bytes(msg)
        if insn.kind in (Special.RDMSR, Special.WRMSR):
            msg, payload = new_message(lib.HVMSG_X64_MSR_INTERCEPT, "struct hv_x64_msr_intercept_message")
            write = insn.kind is Special.WRMSR
            self._fill_header(payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_WRITE if write else lib.HV_INTERCEPT_ACCESS_READ)
            payload.msr_number = self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
            payload.rax = self.reg(R.HV_X64_REGISTER_RAX)
            payload.rdx = self.reg(R.HV_X64_REGISTER_RDX)
            return to_bytes(msg)
        # VMCALL routed to the VMM (hypercall intercept).
        msg, payload = new_message(lib.HVMSG_HYPERCALL_INTERCEPT, "struct hv_x64_hypercall_intercept_message")
        self._fill_header(payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_EXECUTE)
        for attr in ("rax", "rbx", "rcx", "rdx", "r8", "rsi", "rdi"):
            setattr(payload, attr, self.reg(getattr(lib, f"HV_X64_REGISTER_{attr.upper()}")))
        return to_bytes(msg)

    def _io_exit(self, insn: Instruction) -> bytes:
        msg, payload = new_message(lib.HVMSG_X64_IO_PORT_INTERCEPT, "struct hv_x64_io_port_intercept_message")
        opcode_index = 0
        raw = insn.raw
        rep = False
        size_override = False
        while raw[opcode_index] in (0x66, 0xF2, 0xF3, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65):
            rep |= raw[opcode_index] in (0xF2, 0xF3)
            size_override |= raw[opcode_index] == 0x66
            opcode_index += 1
        opcode = raw[opcode_index]
        string = opcode in (0x6C, 0x6D, 0x6E, 0x6F)
        write = opcode in (0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F)
        byte_op = opcode in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E)
        wide = 2 if (self.engine and self.engine.bits == 16) != size_override else 4
        size = 1 if byte_op else wide
        port = raw[opcode_index + 1] if opcode in (0xE4, 0xE5, 0xE6, 0xE7) else self.reg(R.HV_X64_REGISTER_RDX) & 0xFFFF
        self._fill_header(payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_WRITE if write else lib.HV_INTERCEPT_ACCESS_READ)
        payload.port_number = port
        payload.access_info.bits.access_size = size
        payload.access_info.bits.string_op = int(string)
        payload.access_info.bits.rep_prefix = int(rep and string)
        payload.instruction_byte_count = insn.length
        ffi.memmove(payload.instruction_bytes, raw[:16], min(16, len(raw)))
        payload.rax = self.reg(R.HV_X64_REGISTER_RAX)
        payload.rcx = self.reg(R.HV_X64_REGISTER_RCX)
        payload.rsi = self.reg(R.HV_X64_REGISTER_RSI)
        payload.rdi = self.reg(R.HV_X64_REGISTER_RDI)
        for name, field in ((R.HV_X64_REGISTER_DS, payload.ds_segment), (R.HV_X64_REGISTER_ES, payload.es_segment)):
            field.base, field.limit, field.selector, field.attributes = self.segment(name)
        return to_bytes(msg)

    def _emulate_cpuid(self) -> None:
        leaf = self.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF
        sub = self.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        a, b, c, d = self.partition.cpuid(self.index, leaf, sub)
        for name, value in ((R.HV_X64_REGISTER_RAX, a), (R.HV_X64_REGISTER_RBX, b), (R.HV_X64_REGISTER_RCX, c), (R.HV_X64_REGISTER_RDX, d)):
            self.set_reg(name, value)

    # ---- synthetic MSRs
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
            if self.partition.unimplemented_msr_ignore:
                handled = 0
            else:
                self._raise_fault(x86.VECTOR_GP, 0)
                return self.reg(R.HV_X64_REGISTER_RIP)
        if not write:
            self.set_reg(R.HV_X64_REGISTER_RAX, handled & 0xFFFFFFFF)
            self.set_reg(R.HV_X64_REGISTER_RDX, handled >> 32)
        if self._pending_exit is not None and self.engine is not None:
            self.engine.cancel()  # e.g. EOM made a SINT deliverable: report it now
        return next_rip

    def _raise_fault(self, vector: int, error_code: int) -> None:
        """Deliver an exception raised by an emulated instruction (RIP at it)."""
        try:
            x86.EventDelivery(self, self.partition.memory).deliver(vector, error_code)
        except x86.DeliveryFailed:
            self._pending_exit = self._header_only(lib.HVMSG_UNRECOVERABLE_EXCEPTION)
            if self.engine is not None:
                self.engine.cancel()  # stop here: the VP is dead (triple fault)

    def read_msr(self, index: int) -> int | None:
        synic = self.synic
        if index == MSR_GUEST_OS_ID:
            return self._guest_os_id
        if index == MSR_VP_ASSIST_PAGE:
            return self._vp_assist_page
        if index == MSR_HYPERCALL:
            return self._hypercall_msr
        if index == MSR_VP_INDEX:
            return self.index
        if index == MSR_TIME_REF_COUNT:
            return self.partition.reference_time()
        if index == MSR_TSC_FREQUENCY:
            return self.partition.properties[int(lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY)]
        if index == MSR_APIC_FREQUENCY:
            return TIMER_HZ
        if index == MSR_SCONTROL:
            return synic.scontrol
        if index == MSR_SVERSION:
            return int(lib.HV_SYNIC_VERSION_1)
        if index == MSR_SIMP:
            return synic.simp
        if index == MSR_SIEFP:
            return synic.siefp
        if index == MSR_EOM:
            return 0
        if MSR_SINT0 <= index < MSR_SINT0 + 16:
            return synic.sints[index - MSR_SINT0]
        if index == MSR_APIC_BASE:
            return self.reg(R.HV_X64_REGISTER_APIC_BASE)
        if index == MSR_TPR:
            return self.lapic.tpr
        if index == MSR_ICR:
            return self.lapic.icr
        if X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            return self.lapic.icr if offset == 0x300 else self.lapic.read(offset) if offset != 0x20 else self.index
        return None

    def _x2apic_enabled(self) -> bool:
        base = self.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE and base & APIC_BASE_X2APIC)

    def write_msr(self, index: int, value: int) -> int | None:
        synic = self.synic
        if index == MSR_GUEST_OS_ID:
            self._guest_os_id = value
        elif index == MSR_VP_ASSIST_PAGE:
            if value & ~(lib.HV_X64_MSR_VP_ASSIST_PAGE_ADDRESS_MASK | lib.HV_X64_MSR_VP_ASSIST_PAGE_ENABLE):
                return None  # reserved bits: #GP
            self._vp_assist_page = value
        elif index == MSR_HYPERCALL:
            self._set_hypercall_page(value)
        elif index == MSR_SCONTROL:
            synic.scontrol = value
        elif index == MSR_SIMP:
            synic.simp = value
        elif index == MSR_SIEFP:
            synic.siefp = value
        elif index == MSR_EOM:
            self.partition.end_of_message(self)
        elif MSR_SINT0 <= index < MSR_SINT0 + 16:
            synic.sints[index - MSR_SINT0] = value
        elif index == MSR_EOI:
            self._eoi()
        elif index == MSR_ICR:
            self.lapic.write_icr64(value)
        elif index == MSR_TPR:
            self.lapic.tpr = value & 0xFF
        elif X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            if offset == 0x300:
                self.lapic.write_icr64(value)
            elif offset == 0xB0:
                self._eoi()
            else:
                self.lapic.write(offset, value)
        elif index in (MSR_VP_INDEX, MSR_TIME_REF_COUNT, MSR_SVERSION):
            return None  # read-only: #GP
        elif index == MSR_APIC_BASE:
            self.set_reg(R.HV_X64_REGISTER_APIC_BASE, value)
        else:
            return None
        return 0

    def _set_hypercall_page(self, value: int) -> None:
        # The guest must set a guest OS id first; otherwise the enable is ignored.
        if not self._guest_os_id:
            value &= ~int(lib.HV_X64_MSR_HYPERCALL_ENABLE)
        self._hypercall_msr = value
        if value & lib.HV_X64_MSR_HYPERCALL_ENABLE:
            gpa = value & ~0xFFF & U64
            page = HYPERCALL_PAGE_CODE + b"\xcc" * (PAGE - len(HYPERCALL_PAGE_CODE))
            try:
                self.partition.memory.write(gpa, page)
            except Exception:  # noqa: BLE001 - a page outside RAM is simply not overlaid
                return
            self.partition.flush_code(gpa, PAGE)

    # ---- guest hypercalls (vmcall through the hypercall page)
    def _hypercall(self, insn: Instruction, next_rip: int) -> int | None:
        control = self.reg(R.HV_X64_REGISTER_RCX)
        code = control & 0xFFFF
        fast = bool(control & lib.HV_HYPERCALL_FAST_BIT)
        status = lib.HV_STATUS_INVALID_HYPERCALL_CODE
        if code in (lib.HVCALL_POST_MESSAGE, lib.HVCALL_SIGNAL_EVENT):
            if self.partition.intercepts_hypercalls:
                return None  # HYPERCALL_INTERCEPT: the VMM answers and advances RIP
            status = self._validate_synic_hypercall(code, fast)
            if status == lib.HV_STATUS_SUCCESS:
                status = lib.HV_STATUS_INVALID_CONNECTION_ID
        self.set_reg(R.HV_X64_REGISTER_RAX, status)
        return next_rip

    def _validate_synic_hypercall(self, code: int, fast: bool) -> int:
        if code == lib.HVCALL_POST_MESSAGE:
            if fast:
                return int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
            gpa = self.reg(R.HV_X64_REGISTER_RDX)
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
    def post_message(self, sint: int, message: bytes) -> int:
        """HvPostMessageDirect: write into the SIMP slot or report it busy."""
        slot = self.synic.message_slot(sint)
        vector = self.synic.vector(sint)
        if slot is None or vector is None or not self.synic.enabled:
            return int(lib.HV_STATUS_INVALID_VP_STATE)
        memory = self.partition.memory
        current_type = int.from_bytes(memory.read(slot, 4), "little")
        if current_type != lib.HVMSG_NONE:
            flags = memory.read(slot + 5, 1)[0] | 1  # msg_pending
            memory.write(slot + 5, bytes([flags]))
            return int(lib.HV_STATUS_INSUFFICIENT_BUFFERS)
        memory.write(slot + 4, message[4:SLOT])
        memory.write(slot, message[:4])  # type last: the guest polls it
        self.queue_interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS)

    def signal_event(self, sint: int, flag: int) -> tuple[int, bool]:
        base = self.synic.flags_base(sint)
        vector = self.synic.vector(sint)
        if base is None or vector is None or flag >= lib.HV_EVENT_FLAGS_COUNT:
            return int(lib.HV_STATUS_INVALID_VP_STATE if flag < lib.HV_EVENT_FLAGS_COUNT else lib.HV_STATUS_INVALID_PARAMETER), False
        memory = self.partition.memory
        byte = memory.read(base + flag // 8, 1)[0]
        newly = not byte & (1 << (flag % 8))
        if newly:
            memory.write(base + flag // 8, bytes([byte | 1 << (flag % 8)]))
            self.queue_interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS), newly

    def end_of_message(self) -> None:
        """Guest wrote EOM: tell the VMM which SINT slots are free if it asked."""
        wanted = self.synic.deliverability
        if not wanted:
            return
        free = 0
        for sint in range(16):
            slot = self.synic.message_slot(sint)
            if wanted & (1 << sint) and slot is not None and int.from_bytes(self.partition.memory.read(slot, 4), "little") == 0:
                free |= 1 << sint
        if free:
            self.synic.deliverability &= ~free
            msg, payload = new_message(lib.HVMSG_SYNIC_SINT_DELIVERABLE, "struct hv_x64_sint_deliverable_message")
            self._fill_header(payload.header)
            payload.deliverable_sints = free
            self._pending_exit = to_bytes(msg)

    def start_at_sipi(self, vector: int) -> None:
        """SIPI: an AP starts in real mode at vector << 12 (no VMM intercept installed)."""
        self._drop_engine()
        self._state.update(self._reset_state())
        self._segments[R.HV_X64_REGISTER_CS] = (vector << 12, 0xFFFF, vector << 8, 0x9B)
        self._state[R.HV_X64_REGISTER_RIP] = 0
        self._state[R.HV_REGISTER_INTERNAL_ACTIVITY_STATE] = 0
        self._halted = False
        self._notify()

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
