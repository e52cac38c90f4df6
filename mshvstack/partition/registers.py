"""Register sets in the style of kvm-ioctls: plain dataclasses a VMM edits."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mshvstack.abi import lib
from mshvstack.partition.exits import Segment

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


def hv_name(register: str) -> int:
    """hv_register_name of an x64 register given by its lower-case name."""
    return int(getattr(lib, f"HV_X64_REGISTER_{register.upper()}"))


@dataclass
class StandardRegisters:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2

    def as_dict(self) -> dict[int, int]:
        return {hv_name(f.name): getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TableRegister:
    base: int = 0
    limit: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass
class SpecialRegisters:
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldtr: Segment = field(default_factory=Segment)
    gdt: TableRegister = field(default_factory=TableRegister)
    idt: TableRegister = field(default_factory=TableRegister)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0


@dataclass
class FpuRegisters:
    """x87/MMX and SSE state: 128-bit XMM values, 80-bit x87 values (as ints), control words."""

    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    fpr: list[int] = field(default_factory=lambda: [0] * 8)
    fcw: int = 0x037F
    fsw: int = 0
    ftw: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    mxcsr: int = 0x1F80
    mxcsr_mask: int = 0xFFFF


XMM_NAMES = tuple(int(getattr(lib, f"HV_X64_REGISTER_XMM{i}")) for i in range(16))
FPR_NAMES = tuple(int(getattr(lib, f"HV_X64_REGISTER_FP_MMX{i}")) for i in range(8))
FP_CONTROL_STATUS = int(lib.HV_X64_REGISTER_FP_CONTROL_STATUS)
XMM_CONTROL_STATUS = int(lib.HV_X64_REGISTER_XMM_CONTROL_STATUS)


# Architectural MSRs that are hypervisor registers (for Vp.get_msrs/set_msrs).
MSR_REGISTERS: dict[int, int] = {
    0x10: int(lib.HV_X64_REGISTER_TSC),
    0x1B: int(lib.HV_X64_REGISTER_APIC_BASE),
    0x174: int(lib.HV_X64_REGISTER_SYSENTER_CS),
    0x175: int(lib.HV_X64_REGISTER_SYSENTER_ESP),
    0x176: int(lib.HV_X64_REGISTER_SYSENTER_EIP),
    0x277: int(lib.HV_X64_REGISTER_PAT),
    0xC0000080: int(lib.HV_X64_REGISTER_EFER),
    0xC0000081: int(lib.HV_X64_REGISTER_STAR),
    0xC0000082: int(lib.HV_X64_REGISTER_LSTAR),
    0xC0000083: int(lib.HV_X64_REGISTER_CSTAR),
    0xC0000084: int(lib.HV_X64_REGISTER_SFMASK),
    0xC0000102: int(lib.HV_X64_REGISTER_KERNEL_GS_BASE),
    0xC0000103: int(lib.HV_X64_REGISTER_TSC_AUX),
    0x40000000: int(lib.HV_REGISTER_GUEST_OS_ID),
    0x40000001: int(lib.HV_X64_REGISTER_HYPERCALL),
    0x40000002: int(lib.HV_REGISTER_VP_INDEX),
    0x40000020: int(lib.HV_REGISTER_TIME_REF_COUNT),
    0x40000080: int(lib.HV_REGISTER_SCONTROL),
    0x40000082: int(lib.HV_REGISTER_SIEFP),
    0x40000083: int(lib.HV_REGISTER_SIMP),
    **{0x40000090 + i: int(lib.HV_REGISTER_SINT0) + i for i in range(16)},
}
