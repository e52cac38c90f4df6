"""x86 architecture the simulated hypervisor must provide itself.

The hypervisor walks the guest's page tables itself (to translate a GVA
for the VMM, to read the code at an intercept): 4-level long mode, PAE and
32-bit paging, with the #PF error code a walk implies.
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

# IA32_ARCH_CAPABILITIES (SDM vol. 4): enumerated by CPUID.(EAX=7,ECX=0):EDX[29].  The engine
# executes without speculation and has no fill, store or load-port buffers to sample, so the
# CPU it models is immune to every speculative-execution and data-sampling attack these bits
# describe, and says so.  What that spares a Linux guest: page-table isolation (RDCL_NO: a CR3
# switch, so a TLB flush, at every kernel entry and exit), VERW at every return to user mode
# (MDS_NO, TAA_NO), the thunk every return and indirect branch goes through (ITS_NO, which a
# guest of an Intel CPU otherwise assumes), and the buffer clearing for MMIO stale data, GDS
# and RFDS.  Not claimed: enhanced IBRS (IBRS_ALL), which would need IA32_SPEC_CTRL.
MSR_IA32_ARCH_CAPABILITIES = 0x10A
ARCH_CAP_RDCL_NO = 1 << 0
ARCH_CAP_SSB_NO = 1 << 4
ARCH_CAP_MDS_NO = 1 << 5
ARCH_CAP_PSCHANGE_MC_NO = 1 << 6
ARCH_CAP_TAA_NO = 1 << 8
ARCH_CAP_SBDR_SSDP_NO = 1 << 13
ARCH_CAP_FBSDP_NO = 1 << 14
ARCH_CAP_PSDP_NO = 1 << 15
ARCH_CAP_BHI_NO = 1 << 20
ARCH_CAP_PBRSB_NO = 1 << 24
ARCH_CAP_GDS_NO = 1 << 26
ARCH_CAP_RFDS_NO = 1 << 27
ARCH_CAP_ITS_NO = 1 << 62
ARCH_CAPABILITIES = (ARCH_CAP_RDCL_NO | ARCH_CAP_SSB_NO | ARCH_CAP_MDS_NO | ARCH_CAP_PSCHANGE_MC_NO | ARCH_CAP_TAA_NO
                     | ARCH_CAP_SBDR_SSDP_NO | ARCH_CAP_FBSDP_NO | ARCH_CAP_PSDP_NO | ARCH_CAP_BHI_NO | ARCH_CAP_PBRSB_NO
                     | ARCH_CAP_GDS_NO | ARCH_CAP_RFDS_NO | ARCH_CAP_ITS_NO)
CPUID_7_EDX_ARCH_CAPABILITIES = 1 << 29

# CPUID.1:ECX, what the engine implements of it.  CMPXCHG16B is a host 128-bit atomic
# between VPs when locked (x86parallel.c); without it Linux's SLUB takes a bit lock and
# emulates its per-CPU double compare-and-swap with interrupts off, on every allocation.
CPUID_1_ECX_SSE3 = 1 << 0
CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_SSE41 = 1 << 19
CPUID_1_ECX_SSE42 = 1 << 20
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_POPCNT = 1 << 23
CPUID_1_ECX_HYPERVISOR = 1 << 31

VECTOR_DF = 8
VECTOR_GP = 13
VECTOR_PF = 14
# Exceptions that push an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})




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
