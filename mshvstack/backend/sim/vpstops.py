"""What a VP's run does when its engine stops: the intercept message for the VMM
(special instructions, memory, exceptions, a triple fault) or nothing (a
cancel, a deadline, a dirty-page tracking fault, an ioeventfd's write), and
the engine's callback for a special instruction about to execute."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mshvstack.abi import lib
from mshvstack.backend.sim import intercepts
from mshvstack.backend.sim.engines.base import EngineStop, Instruction, Special, StopKind

if TYPE_CHECKING:
    from mshvstack.backend.sim.vp import SimVp

R = lib


class VpStops:
    def __init__(self, vp: SimVp) -> None:
        self.vp = vp

    def handle(self, stop: EngineStop) -> bytes | None:
        vp = self.vp
        kind = stop.kind
        if kind in (StopKind.CANCELLED, StopKind.DEADLINE):
            return None
        if kind is StopKind.SPECIAL:
            assert stop.instruction is not None
            return self._special_exit(stop.instruction)
        if kind in (StopKind.UNMAPPED, StopKind.PROTECTION):
            return self._memory_exit(stop)
        if kind is StopKind.EXCEPTION:
            return intercepts.exception(vp, stop)
        return intercepts.header_only(vp, lib.HVMSG_UNRECOVERABLE_EXCEPTION)  # triple fault

    def _memory_exit(self, stop: EngineStop) -> bytes | None:
        vp = self.vp
        gpa = stop.address   # the engine reports the physical address: the guest's paging already succeeded
        if stop.kind is StopKind.PROTECTION and stop.write and vp.partition.track_write(gpa):
            return None  # dirty-page tracking fault: recorded, page writable again, retry
        if stop.kind is StopKind.UNMAPPED and stop.write and stop.instruction is not None:
            if vp.partition.ring_doorbell(gpa, stop.size, stop.value):
                # An ioeventfd took the write: the guest continues, no exit.
                vp.set_reg(R.HV_X64_REGISTER_RIP, stop.instruction.rip + stop.instruction.length)
                return None
        return intercepts.memory(vp, stop, gpa, stop.linear)

    def _special_exit(self, insn: Instruction) -> bytes:
        vp = self.vp
        if insn.kind is Special.HLT:
            vp.set_reg(R.HV_X64_REGISTER_RIP, insn.rip + insn.length)
        cpuid = (0, 0, 0, 0)
        if insn.kind is Special.CPUID:
            leaf, subleaf = vp.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF, vp.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
            cpuid = vp.partition.cpuid(vp.index, leaf, subleaf)
        return intercepts.special(vp, insn, cpuid)

    def on_special(self, insn: Instruction) -> int | None:
        """A special instruction, inside the engine before it executes: where the guest
        goes on when the hypervisor carries it out, None for an intercept."""
        vp = self.vp
        next_rip = insn.rip + insn.length
        if insn.kind is Special.HLT:
            if vp.interruptible() and vp.partition.lapic_enabled:
                vp.halted = True
                if vp.engine is not None:
                    vp.engine.cancel()
                return next_rip
            return None
        if insn.kind is Special.CPUID:
            if vp.partition.intercepts_cpuid(vp.reg(R.HV_X64_REGISTER_RAX) & 0xFFFFFFFF):
                return None
            vp.instructions.emulate_cpuid()
            return next_rip
        if insn.kind in (Special.RDMSR, Special.WRMSR):
            return vp.instructions.msr(insn, next_rip)
        if insn.kind is Special.VMCALL:
            return vp.instructions.hypercall(next_rip)
        return None   # I/O and the rest: the VMM's
