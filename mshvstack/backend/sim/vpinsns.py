"""The instructions and accesses the hypervisor carries out for a VP inside its
run: RDMSR and WRMSR of the MSRs it implements (synthetic, machine-check, TSC,
APIC base, x2APIC), CPUID it answers, hypercalls through the hypercall page,
and the xAPIC page.  The instruction handlers return where the guest goes on
(None: an intercept for the VMM)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from mshvstack.abi import lib
from mshvstack.backend.sim import x86
from mshvstack.backend.sim.engines.base import CONTINUE, Instruction, Special
from mshvstack.backend.sim.hv1 import SYNTHETIC_MSRS, MsrFault
from mshvstack.backend.sim.lapic import X2APIC_MSR_BASE
from mshvstack.backend.sim.mca import MachineCheck
from mshvstack.backend.sim.regfile import APIC_BASE_ENABLE, APIC_BASE_X2APIC

if TYPE_CHECKING:
    from mshvstack.backend.sim.vp import SimVp

R = lib
MSR_APIC_BASE = 0x1B
X2APIC_ICR, APIC_EOI = 0x300, 0xB0   # register offsets (x2APIC MSRs: offset >> 4)
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


class VpInstructions:
    def __init__(self, vp: SimVp) -> None:
        self.vp = vp
        self.machine_check = MachineCheck()

    # ---- CPUID
    def emulate_cpuid(self) -> None:
        vp = self.vp
        leaf = vp.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF
        sub = vp.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        a, b, c, d = vp.partition.cpuid(vp.index, leaf, sub)
        for name, value in ((R.HV_X64_REGISTER_RAX, a), (R.HV_X64_REGISTER_RBX, b), (R.HV_X64_REGISTER_RCX, c), (R.HV_X64_REGISTER_RDX, d)):
            vp.set_reg(name, value)

    # ---- MSRs
    def msr(self, insn: Instruction, next_rip: int) -> int | None:
        vp = self.vp
        index = vp.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        write = insn.kind is Special.WRMSR
        value = (vp.reg(R.HV_X64_REGISTER_RDX) & 0xFFFFFFFF) << 32 | (vp.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF)
        if vp.partition.intercepts_msr(index, write):
            return None
        if index in NATIVE_MSRS or (index & ~0xFF) == MTRR_VARIABLE_AND_FIXED_RANGE:
            return CONTINUE  # architectural MSRs the engine implements itself
        handled = self.write_msr(index, value) if write else self.read_msr(index)
        if handled is None:
            if not vp.partition.unimplemented_msr_ignore:
                vp.ensure_engine().inject_exception(x86.VECTOR_GP, 0)
                return insn.rip  # the fault is taken at the instruction
            handled = 0
        if not write:
            vp.set_reg(R.HV_X64_REGISTER_RAX, handled & 0xFFFFFFFF)
            vp.set_reg(R.HV_X64_REGISTER_RDX, handled >> 32)
        elif vp.engine is not None:
            vp.engine.set_deadline(vp.deadline_ns())  # the write may have armed a timer
        if vp.pending_exit is not None and vp.engine is not None:
            vp.engine.cancel()  # e.g. EOM made a SINT deliverable: report it now
        return next_rip

    def read_msr(self, index: int) -> int | None:
        """An MSR the hypervisor implements, or None (#GP)."""
        vp = self.vp
        if index in SYNTHETIC_MSRS:
            value = vp.hv.read(index)
            return None if isinstance(value, MsrFault) else value
        if MachineCheck.handles(index):
            return self.machine_check.read(index)
        if index == MSR_TSC:
            return vp.reg(R.HV_X64_REGISTER_TSC)
        if index == MSR_APIC_BASE:
            return vp.reg(R.HV_X64_REGISTER_APIC_BASE)
        if index == x86.MSR_IA32_ARCH_CAPABILITIES:   # read-only (a write is #GP)
            return x86.ARCH_CAPABILITIES
        if X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            return vp.lapic.icr if offset == X2APIC_ICR else vp.lapic.read(offset)
        return None

    def write_msr(self, index: int, value: int) -> int | None:
        """0 when the write is taken, None for #GP."""
        vp = self.vp
        if index in SYNTHETIC_MSRS:
            return None if isinstance(vp.hv.write(index, value), MsrFault) else 0
        if MachineCheck.handles(index):
            return 0 if self.machine_check.write(index, value) else None
        if index == MSR_TSC:
            return 0  # the TSC follows the host's counter (writes are dropped)
        if index == MSR_APIC_BASE:
            vp.set_reg(R.HV_X64_REGISTER_APIC_BASE, value)
            return 0
        if X2APIC_MSR_BASE <= index < X2APIC_MSR_BASE + 0x100 and self._x2apic_enabled():
            offset = (index - X2APIC_MSR_BASE) << 4
            if offset == X2APIC_ICR:
                vp.lapic.write_icr64(value)
            elif offset == APIC_EOI:
                self.eoi()
            else:
                vp.lapic.write(offset, value)
            return 0
        return None

    # ---- the xAPIC page (MMIO inside the engine) and EOI
    def xapic_read(self, offset: int, size: int) -> int:
        return self.vp.lapic.read(offset & ~0xF) if self._xapic_enabled() else 0xFFFFFFFF

    def xapic_write(self, offset: int, size: int, value: int) -> None:
        if not self._xapic_enabled():
            return
        if offset & ~0xF == APIC_EOI:
            self.eoi()
        else:
            self.vp.lapic.write(offset & ~0xF, value)
            if self.vp.engine is not None:
                self.vp.engine.set_deadline(self.vp.deadline_ns())

    def eoi(self) -> None:
        vector = self.vp.lapic.eoi()
        if vector is not None:
            self.vp.partition.end_of_interrupt(vector)
            if self.vp.lapic.irr and self.vp.engine is not None:
                self.vp.engine.cancel()  # a lower-priority interrupt may be deliverable now

    def _xapic_enabled(self) -> bool:
        base = self.vp.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE) and not base & APIC_BASE_X2APIC

    def _x2apic_enabled(self) -> bool:
        base = self.vp.reg(R.HV_X64_REGISTER_APIC_BASE)
        return bool(base & APIC_BASE_ENABLE and base & APIC_BASE_X2APIC)

    # ---- guest hypercalls (vmcall through the hypercall page)
    def hypercall(self, next_rip: int) -> int | None:
        # TLFS conventions: 64-bit callers RCX (control), RDX (input), result in RAX;
        # 32-bit callers EDX:EAX, EBX:ECX, result in EDX:EAX.
        vp = self.vp
        long_mode = vp.code_bits() == 64
        control = vp.reg(R.HV_X64_REGISTER_RCX) if long_mode else self._pair(R.HV_X64_REGISTER_RDX, R.HV_X64_REGISTER_RAX)
        code = control & 0xFFFF
        fast = bool(control & lib.HV_HYPERCALL_FAST_BIT)
        status = int(lib.HV_STATUS_INVALID_HYPERCALL_CODE)
        if code in (lib.HVCALL_POST_MESSAGE, lib.HVCALL_SIGNAL_EVENT):
            if vp.partition.intercepts_hypercalls:
                return None  # HYPERCALL_INTERCEPT: the VMM answers and advances RIP
            gpa = vp.reg(R.HV_X64_REGISTER_RDX) if long_mode else self._pair(R.HV_X64_REGISTER_RBX, R.HV_X64_REGISTER_RCX)
            status = self._validate_synic_hypercall(code, fast, gpa)
            if status == lib.HV_STATUS_SUCCESS:
                status = int(lib.HV_STATUS_INVALID_CONNECTION_ID)
        if long_mode:
            vp.set_reg(R.HV_X64_REGISTER_RAX, status)
        else:
            vp.set_reg(R.HV_X64_REGISTER_RAX, status & 0xFFFFFFFF)
            vp.set_reg(R.HV_X64_REGISTER_RDX, status >> 32)
        return next_rip

    def _pair(self, high: int, low: int) -> int:
        return (self.vp.reg(high) & 0xFFFFFFFF) << 32 | (self.vp.reg(low) & 0xFFFFFFFF)

    def _validate_synic_hypercall(self, code: int, fast: bool, gpa: int) -> int:
        if code == lib.HVCALL_POST_MESSAGE:
            if fast:
                return int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
            if gpa & 7:
                return int(lib.HV_STATUS_INVALID_ALIGNMENT)
            try:
                raw = self.vp.partition.memory.read(gpa, 16)
            except Exception:  # noqa: BLE001 - GPA outside RAM
                return int(lib.HV_STATUS_INVALID_PARAMETER)
            _conn, _rsvd, msg_type, size = struct.unpack("<IIII", raw)
            if size > lib.HV_MESSAGE_MAX_PAYLOAD_BYTES or msg_type & 0x80000000:
                return int(lib.HV_STATUS_INVALID_PARAMETER)
        return int(lib.HV_STATUS_SUCCESS)
