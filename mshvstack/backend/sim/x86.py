"""x86 architecture the simulated hypervisor must provide itself.

Unicorn neither walks page tables for us nor delivers exceptions and
interrupts to the guest's IDT (engines.md), so this module does both:
a guest page-table walker (4-level long mode, PAE, 32-bit) and event
delivery through the real-mode IVT and 32-/64-bit IDT gates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from mshvstack.abi import lib
from mshvstack.backend.sim.memory import GpaMap, GpaUnmapped

CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17

PTE_P, PTE_W, PTE_U, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

VECTOR_DF = 8
VECTOR_GP = 13
VECTOR_PF = 14
# Exceptions that push an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})



def _flags_on_gate_entry(flags: int, gate_type: int) -> int:
    """RFLAGS after entering a 32/64-bit IDT gate: interrupt gates (type 0xE) also clear IF."""
    flags &= ~(RFLAGS_TF | RFLAGS_RF | RFLAGS_VM)
    return flags & ~RFLAGS_IF if gate_type == 0xE else flags

class Access(enum.Flag):
    READ = 0
    WRITE = enum.auto()
    EXECUTE = enum.auto()
    USER = enum.auto()


class TranslateResult(enum.IntEnum):
    SUCCESS = lib.HV_TRANSLATE_GVA_SUCCESS
    PAGE_NOT_PRESENT = lib.HV_TRANSLATE_GVA_PAGE_NOT_PRESENT
    PRIVILEGE_VIOLATION = lib.HV_TRANSLATE_GVA_PRIVILEGE_VIOLATION
    INVALID_PAGE_TABLE_FLAGS = lib.HV_TRANSLATE_GVA_INVALIDE_PAGE_TABLE_FLAGS
    GPA_UNMAPPED = lib.HV_TRANSLATE_GVA_GPA_UNMAPPED


@dataclass(frozen=True)
class Translation:
    result: TranslateResult
    gpa: int = 0
    # #PF error code the walk implies (P, W, U, I bits), for fault delivery.
    error_code: int = 0


class CpuState(Protocol):
    """What the walker and event delivery need from a VP."""

    def reg(self, name: int) -> int: ...
    def set_reg(self, name: int, value: int) -> None: ...
    def segment(self, name: int) -> tuple[int, int, int, int]: ...  # base, limit, selector, attributes
    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None: ...


def translate(memory: GpaMap, cr0: int, cr3: int, cr4: int, efer: int, gva: int, access: Access) -> Translation:
    """Walk the guest's page tables for ``gva`` with the given access."""
    if not cr0 & CR0_PG:
        return Translation(TranslateResult.SUCCESS, gva & 0xFFFF_FFFF if not efer & EFER_LMA else gva)
    write = Access.WRITE in access
    user = Access.USER in access
    fetch = Access.EXECUTE in access
    err = (2 if write else 0) | (4 if user else 0) | (16 if fetch else 0)
    try:
        if efer & EFER_LMA:
            levels, table, shift, width, entry_size = 4, cr3 & ADDR_MASK, 39, 9, 8
        elif cr4 & CR4_PAE:
            pdpte = memory.read_u64((cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8)
            if not pdpte & PTE_P:
                return Translation(TranslateResult.PAGE_NOT_PRESENT, 0, err)
            levels, table, shift, width, entry_size = 2, pdpte & ADDR_MASK, 21, 9, 8
        else:
            levels, table, shift, width, entry_size = 2, cr3 & 0xFFFF_F000, 22, 10, 4
        allowed_w = allowed_u = True
        no_exec = False
        for level in range(levels):
            index = (gva >> shift) & ((1 << width) - 1)
            raw = memory.read(table + index * entry_size, entry_size)
            entry = int.from_bytes(raw, "little")
            if not entry & PTE_P:
                return Translation(TranslateResult.PAGE_NOT_PRESENT, 0, err)
            allowed_w &= bool(entry & PTE_W)
            allowed_u &= bool(entry & PTE_U)
            no_exec |= bool(entry & PTE_NX) and bool(efer & EFER_NXE)
            large = entry & PTE_PS and level < levels - 1 and (entry_size == 8 or cr4 & CR4_PSE)
            if large or level == levels - 1:
                if entry_size == 4:
                    base = entry & (0xFFC0_0000 if large else 0xFFFF_F000)
                else:
                    base = entry & ADDR_MASK & ~((1 << shift) - 1)
                gpa = base | (gva & ((1 << shift) - 1))
                denied = (user and not allowed_u) or (fetch and no_exec) or (
                    write and not allowed_w and (user or cr0 & CR0_WP)
                )
                if denied:
                    return Translation(TranslateResult.PRIVILEGE_VIOLATION, 0, err | 1)
                return Translation(TranslateResult.SUCCESS, gpa)
            table = entry & (ADDR_MASK if entry_size == 8 else 0xFFFF_F000)
            shift -= width
    except GpaUnmapped:
        return Translation(TranslateResult.GPA_UNMAPPED, 0, err)
    raise AssertionError("unreachable")


class DeliveryFailed(Exception):
    """The event could not be delivered (bad IDT/IVT entry, unmapped stack)."""


class EventDelivery:
    """Delivers exceptions and interrupts to a guest through its IDT."""

    def __init__(self, cpu: CpuState, memory: GpaMap) -> None:
        self.cpu = cpu
        self.memory = memory

    def _virt(self, gva: int, access: Access) -> int:
        c = self.cpu
        t = translate(self.memory, c.reg(lib.HV_X64_REGISTER_CR0), c.reg(lib.HV_X64_REGISTER_CR3),
                      c.reg(lib.HV_X64_REGISTER_CR4), c.reg(lib.HV_X64_REGISTER_EFER), gva, access)
        if t.result is not TranslateResult.SUCCESS:
            raise DeliveryFailed(f"cannot access {gva:#x} ({t.result.name})")
        return t.gpa

    def _read(self, gva: int, size: int) -> int:
        return int.from_bytes(self.memory.read(self._virt(gva, Access.READ), size), "little")

    def _write(self, gva: int, value: int, size: int) -> None:
        self.memory.write(self._virt(gva, Access.WRITE), (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def deliver(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Deliver ``vector`` now.  Raises DeliveryFailed for a triple-fault path."""
        c = self.cpu
        if cr2 is not None:
            c.set_reg(lib.HV_X64_REGISTER_CR2, cr2)
        cr0 = c.reg(lib.HV_X64_REGISTER_CR0)
        if not cr0 & CR0_PE:
            self._deliver_real(vector)
        elif c.reg(lib.HV_X64_REGISTER_EFER) & EFER_LMA:
            self._deliver_long(vector, error_code)
        else:
            self._deliver_protected(vector, error_code)

    def _deliver_real(self, vector: int) -> None:
        c = self.cpu
        idt_base, idt_limit = self._table(lib.HV_X64_REGISTER_IDTR)
        if vector * 4 + 3 > idt_limit:
            raise DeliveryFailed(f"vector {vector} beyond the IVT limit")
        entry = int.from_bytes(self.memory.read(idt_base + vector * 4, 4), "little")
        ss_base = c.segment(lib.HV_X64_REGISTER_SS)[0]
        sp = c.reg(lib.HV_X64_REGISTER_RSP) & 0xFFFF
        flags = c.reg(lib.HV_X64_REGISTER_RFLAGS)
        cs = c.segment(lib.HV_X64_REGISTER_CS)[2]
        ip = c.reg(lib.HV_X64_REGISTER_RIP) & 0xFFFF
        for value in (flags, cs, ip):
            sp = (sp - 2) & 0xFFFF
            self.memory.write(ss_base + sp, (value & 0xFFFF).to_bytes(2, "little"))
        c.set_reg(lib.HV_X64_REGISTER_RSP, sp)
        c.set_reg(lib.HV_X64_REGISTER_RFLAGS, flags & ~(RFLAGS_IF | RFLAGS_TF))
        selector = entry >> 16
        c.set_segment(lib.HV_X64_REGISTER_CS, selector << 4, 0xFFFF, selector, 0x93)
        c.set_reg(lib.HV_X64_REGISTER_RIP, entry & 0xFFFF)

    def _table(self, name: int) -> tuple[int, int]:
        base, limit, _sel, _attr = self.cpu.segment(name)
        return base, limit

    def _deliver_long(self, vector: int, error_code: int | None) -> None:
        c = self.cpu
        idt_base, idt_limit = self._table(lib.HV_X64_REGISTER_IDTR)
        if vector * 16 + 15 > idt_limit:
            raise DeliveryFailed(f"vector {vector} beyond the IDT limit")
        low = self._read(idt_base + vector * 16, 8)
        high = self._read(idt_base + vector * 16 + 8, 8)
        present = (low >> 47) & 1
        gate_type = (low >> 40) & 0xF
        if not present or gate_type not in (0xE, 0xF):
            raise DeliveryFailed(f"IDT entry {vector} is not a present 64-bit gate")
        target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | ((high & 0xFFFF_FFFF) << 32)
        selector = (low >> 16) & 0xFFFF
        ist = (low >> 32) & 7
        rsp = c.reg(lib.HV_X64_REGISTER_RSP)
        cs = c.segment(lib.HV_X64_REGISTER_CS)[2]
        ss = c.segment(lib.HV_X64_REGISTER_SS)[2]
        flags = c.reg(lib.HV_X64_REGISTER_RFLAGS)
        rip = c.reg(lib.HV_X64_REGISTER_RIP)
        cpl = cs & 3
        new_rsp = rsp
        tr_base = c.segment(lib.HV_X64_REGISTER_TR)[0]
        if ist:
            new_rsp = self._read(tr_base + 0x24 + (ist - 1) * 8, 8)
        elif cpl != 0:
            new_rsp = self._read(tr_base + 4, 8)
        new_rsp &= ~0xF
        frame = [ss, rsp, flags, cs, rip]
        if error_code is not None:
            frame.append(error_code)
        for value in frame:
            new_rsp -= 8
            self._write(new_rsp, value, 8)
        c.set_reg(lib.HV_X64_REGISTER_RSP, new_rsp)
        c.set_reg(lib.HV_X64_REGISTER_RFLAGS, _flags_on_gate_entry(flags, gate_type))
        if selector != cs:
            c.set_segment(lib.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, selector, 0xA09B)
        if cpl != 0:
            c.set_segment(lib.HV_X64_REGISTER_SS, 0, 0xFFFFFFFF, 0, 0)
        c.set_reg(lib.HV_X64_REGISTER_RIP, target)

    def _deliver_protected(self, vector: int, error_code: int | None) -> None:
        c = self.cpu
        idt_base, idt_limit = self._table(lib.HV_X64_REGISTER_IDTR)
        if vector * 8 + 7 > idt_limit:
            raise DeliveryFailed(f"vector {vector} beyond the IDT limit")
        entry = self._read(idt_base + vector * 8, 8)
        present = (entry >> 47) & 1
        gate_type = (entry >> 40) & 0xF
        if not present or gate_type not in (0xE, 0xF):
            raise DeliveryFailed(f"IDT entry {vector} is not a present 32-bit gate")
        target = (entry & 0xFFFF) | ((entry >> 32) & 0xFFFF_0000)
        selector = (entry >> 16) & 0xFFFF
        esp = c.reg(lib.HV_X64_REGISTER_RSP) & 0xFFFF_FFFF
        ss_base = c.segment(lib.HV_X64_REGISTER_SS)[0]
        flags = c.reg(lib.HV_X64_REGISTER_RFLAGS)
        cs = c.segment(lib.HV_X64_REGISTER_CS)[2]
        frame = [flags, cs, c.reg(lib.HV_X64_REGISTER_RIP)]
        if error_code is not None:
            frame.append(error_code)
        for value in frame:
            esp = (esp - 4) & 0xFFFF_FFFF
            self._write(ss_base + esp, value, 4)
        c.set_reg(lib.HV_X64_REGISTER_RSP, esp)
        c.set_reg(lib.HV_X64_REGISTER_RFLAGS, _flags_on_gate_entry(flags, gate_type))
        if selector != cs:
            c.set_segment(lib.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, selector, 0xC09B)
        c.set_reg(lib.HV_X64_REGISTER_RIP, target)
