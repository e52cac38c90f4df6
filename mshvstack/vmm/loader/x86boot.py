"""Boot-time x86 state a loader hands to the first VP: page tables, GDT, registers."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mshvstack.partition.exits import Segment
from mshvstack.partition.memory import GuestMemory
from mshvstack.partition.registers import SpecialRegisters, StandardRegisters, TableRegister

# Fixed low-memory layout used by our loaders (below 1 MiB, above the IVT/BDA).
GDT_GPA = 0x500
PML4_GPA = 0x9000          # then PDPT at 0xA000 and four PDs at 0xB000..0xE000
IDENTITY_LIMIT = 4 << 30   # identity-mapped with 2 MiB pages

CODE64 = Segment(0, 0xFFFFFFFF, 0x08, 0xA09B)   # present, DPL0, code, long
DATA = Segment(0, 0xFFFFFFFF, 0x10, 0xC093)
CODE32 = Segment(0, 0xFFFFFFFF, 0x18, 0xC09B)   # present, DPL0, code, 32-bit
TSS = Segment(0, 0x67, 0x20, 0x008B)

CR0_PE, CR0_ET, CR0_PG = 1, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


@dataclass
class BootState:
    regs: StandardRegisters = field(default_factory=StandardRegisters)
    sregs: SpecialRegisters = field(default_factory=SpecialRegisters)


def write_gdt(memory: GuestMemory) -> TableRegister:
    gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF, 0x00008B0000000067]
    memory.write(GDT_GPA, struct.pack(f"<{len(gdt)}Q", *gdt))
    return TableRegister(GDT_GPA, len(gdt) * 8 - 1)


def write_identity_page_tables(memory: GuestMemory) -> int:
    """Identity map the first 4 GiB with 2 MiB pages; returns CR3."""
    pdpt = PML4_GPA + 0x1000
    memory.write(PML4_GPA, struct.pack("<Q", pdpt | 0x3) + bytes(0xFF8))
    entries = []
    for gib in range(IDENTITY_LIMIT >> 30):
        pd = pdpt + 0x1000 * (gib + 1)
        entries.append(pd | 0x3)
        memory.write(pd, struct.pack("<512Q", *[((gib << 30) + (i << 21)) | 0x83 for i in range(512)]))
    memory.write(pdpt, struct.pack(f"<{len(entries)}Q", *entries) + bytes(0x1000 - 8 * len(entries)))
    return PML4_GPA


def long_mode(memory: GuestMemory, entry: int, stack: int = 0, boot_params: int = 0) -> BootState:
    """64-bit mode with paging (identity map), flat segments, RIP at ``entry``."""
    state = BootState()
    state.sregs.gdt = write_gdt(memory)
    state.sregs.cr3 = write_identity_page_tables(memory)
    state.sregs.cr4 = CR4_PAE
    state.sregs.efer = EFER_LME | EFER_LMA
    state.sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    state.sregs.cs = CODE64
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state.sregs, name, DATA)
    state.sregs.tr = TSS
    state.regs.rip, state.regs.rsp, state.regs.rsi, state.regs.rflags = entry, stack, boot_params, 2
    return state


def protected_mode(memory: GuestMemory, entry: int, ebx: int = 0) -> BootState:
    """32-bit flat protected mode without paging (the PVH entry contract)."""
    state = BootState()
    state.sregs.gdt = write_gdt(memory)
    state.sregs.cr0 = CR0_PE | CR0_ET
    state.sregs.cs = CODE32
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state.sregs, name, DATA)
    state.sregs.tr = TSS
    state.regs.rip, state.regs.rbx, state.regs.rflags = entry, ebx, 2
    return state
