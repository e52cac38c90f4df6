"""The one encoder from an engine stop to the 256-byte hv_message the VMM reads.

Every field the hypervisor defines for an intercept is filled from the VP's
register file at the intercepting instruction, so the VMM can emulate it
from the message alone (as it must on real hardware).
"""

from __future__ import annotations

from typing import Any, Protocol

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import x86
from mshvstack.backend.sim.engines.base import EngineStop, Instruction, Special, StopKind
from mshvstack.backend.sim.messages import new_message, to_bytes

R = lib
_PREFIXES = frozenset({0x66, 0xF2, 0xF3, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})
_STRING_IO = frozenset({0x6C, 0x6D, 0x6E, 0x6F})
_OUT = frozenset({0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F})
_BYTE_IO = frozenset({0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E})
_IMMEDIATE_PORT = frozenset({0xE4, 0xE5, 0xE6, 0xE7})
# The registers a hypercall intercept carries: (message field, register name).
_HYPERCALL_REGISTERS = tuple((attr, int(getattr(lib, f"HV_X64_REGISTER_{attr.upper()}")))
                             for attr in ("rax", "rbx", "rcx", "rdx", "r8", "rsi", "rdi"))
_EXCEPTION_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{i}" for i in range(8, 16))


class InterceptedCpu(Protocol):
    index: int

    def reg(self, name: int) -> int: ...
    def segment(self, name: int) -> tuple[int, int, int, int]: ...
    def code_bits(self) -> int: ...


def _fill_segment(field: Any, value: tuple[int, int, int, int]) -> None:
    field.base, field.limit, field.selector, field.attributes = value


def fill_header(cpu: InterceptedCpu, header: Any, insn_length: int = 0, access: int = 0) -> None:
    header.vp_index = cpu.index
    header.instruction_length = insn_length & 0xF
    header.cr8 = cpu.reg(R.HV_X64_REGISTER_CR8) & 0xF
    header.intercept_access_type = access
    cs = cpu.segment(R.HV_X64_REGISTER_CS)
    cr0 = cpu.reg(R.HV_X64_REGISTER_CR0)
    efer = cpu.reg(R.HV_X64_REGISTER_EFER)
    state = header.execution_state.bits
    state.cpl = cpu.segment(R.HV_X64_REGISTER_SS)[3] >> 5 & 3 if cr0 & x86.CR0_PE else 0
    state.cr0_pe = cr0 & 1
    state.cr0_am = (cr0 >> 18) & 1
    state.efer_lma = (efer >> 10) & 1
    _fill_segment(header.cs_segment, cs)
    header.rip = cpu.reg(R.HV_X64_REGISTER_RIP)
    header.rflags = cpu.reg(R.HV_X64_REGISTER_RFLAGS)


def header_only(cpu: InterceptedCpu, message_type: int) -> bytes:
    msg, payload = new_message(message_type, "struct hv_x64_halt_message")
    fill_header(cpu, payload.header)
    return to_bytes(msg)


def special(cpu: InterceptedCpu, insn: Instruction, cpuid: tuple[int, int, int, int]) -> bytes:
    """An instruction intercept: IO, HLT, CPUID, RDMSR/WRMSR or a hypercall."""
    if insn.kind is Special.IO:
        return io_port(cpu, insn)
    if insn.kind is Special.HLT:
        msg, payload = new_message(lib.HVMSG_X64_HALT, "struct hv_x64_halt_message")
        fill_header(cpu, payload.header, insn.length)
        return to_bytes(msg)
    if insn.kind is Special.CPUID:
        msg, payload = new_message(lib.HVMSG_X64_CPUID_INTERCEPT, "struct hv_x64_cpuid_intercept_message")
        fill_header(cpu, payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_EXECUTE)
        payload.rax, payload.rcx = cpu.reg(R.HV_X64_REGISTER_RAX), cpu.reg(R.HV_X64_REGISTER_RCX)
        payload.rdx, payload.rbx = cpu.reg(R.HV_X64_REGISTER_RDX), cpu.reg(R.HV_X64_REGISTER_RBX)
        (payload.default_result_rax, payload.default_result_rbx,
         payload.default_result_rcx, payload.default_result_rdx) = cpuid
        return to_bytes(msg)
    if insn.kind in (Special.RDMSR, Special.WRMSR):
        msg, payload = new_message(lib.HVMSG_X64_MSR_INTERCEPT, "struct hv_x64_msr_intercept_message")
        write = insn.kind is Special.WRMSR
        fill_header(cpu, payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_WRITE if write else lib.HV_INTERCEPT_ACCESS_READ)
        payload.msr_number = cpu.reg(R.HV_X64_REGISTER_RCX) & 0xFFFFFFFF
        payload.rax = cpu.reg(R.HV_X64_REGISTER_RAX)
        payload.rdx = cpu.reg(R.HV_X64_REGISTER_RDX)
        return to_bytes(msg)
    msg, payload = new_message(lib.HVMSG_HYPERCALL_INTERCEPT, "struct hv_x64_hypercall_intercept_message")
    fill_header(cpu, payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_EXECUTE)
    for attr, register in _HYPERCALL_REGISTERS:
        setattr(payload, attr, cpu.reg(register))
    return to_bytes(msg)


def io_port(cpu: InterceptedCpu, insn: Instruction) -> bytes:
    msg, payload = new_message(lib.HVMSG_X64_IO_PORT_INTERCEPT, "struct hv_x64_io_port_intercept_message")
    raw = insn.raw
    opcode_index = 0
    rep = size_override = False
    while raw[opcode_index] in _PREFIXES:
        rep |= raw[opcode_index] in (0xF2, 0xF3)
        size_override |= raw[opcode_index] == 0x66
        opcode_index += 1
    if cpu.code_bits() == 64 and raw[opcode_index] & 0xF0 == 0x40:
        opcode_index += 1  # REX
    opcode = raw[opcode_index]
    string = opcode in _STRING_IO
    wide = 2 if (cpu.code_bits() == 16) != size_override else 4
    port = raw[opcode_index + 1] if opcode in _IMMEDIATE_PORT else cpu.reg(R.HV_X64_REGISTER_RDX) & 0xFFFF
    fill_header(cpu, payload.header, insn.length, lib.HV_INTERCEPT_ACCESS_WRITE if opcode in _OUT else lib.HV_INTERCEPT_ACCESS_READ)
    payload.port_number = port
    payload.access_info.bits.access_size = 1 if opcode in _BYTE_IO else wide
    payload.access_info.bits.string_op = int(string)
    payload.access_info.bits.rep_prefix = int(rep and string)
    payload.instruction_byte_count = insn.length
    ffi.memmove(payload.instruction_bytes, raw[:16], min(16, len(raw)))
    payload.rax = cpu.reg(R.HV_X64_REGISTER_RAX)
    payload.rcx = cpu.reg(R.HV_X64_REGISTER_RCX)
    payload.rsi = cpu.reg(R.HV_X64_REGISTER_RSI)
    payload.rdi = cpu.reg(R.HV_X64_REGISTER_RDI)
    _fill_segment(payload.ds_segment, cpu.segment(R.HV_X64_REGISTER_DS))
    _fill_segment(payload.es_segment, cpu.segment(R.HV_X64_REGISTER_ES))
    return to_bytes(msg)


def memory(cpu: InterceptedCpu, stop: EngineStop, gpa: int, gva: int | None) -> bytes:
    """UNMAPPED_GPA or GPA_INTERCEPT for an access the GPA map does not allow
    (``gva`` None: the virtual address is not known, and flagged invalid)."""
    kind = lib.HVMSG_UNMAPPED_GPA if stop.kind is StopKind.UNMAPPED else lib.HVMSG_GPA_INTERCEPT
    msg, payload = new_message(kind, "struct hv_x64_memory_intercept_message")
    access = lib.HV_INTERCEPT_ACCESS_EXECUTE if stop.execute else (lib.HV_INTERCEPT_ACCESS_WRITE if stop.write else lib.HV_INTERCEPT_ACCESS_READ)
    insn = stop.instruction
    fill_header(cpu, payload.header, insn.length if insn else 0, access)
    payload.guest_virtual_address = gva or 0
    payload.guest_physical_address = gpa
    payload.memory_access_info.bits.gva_valid = int(gva is not None)
    payload.memory_access_info.bits.gva_gpa_valid = int(gva is not None)
    if insn is not None:
        payload.instruction_byte_count = len(insn.raw[:16])
        ffi.memmove(payload.instruction_bytes, insn.raw[:16], len(insn.raw[:16]))
    return to_bytes(msg)


def exception(cpu: InterceptedCpu, stop: EngineStop) -> bytes:
    """An intercepted exception, with the state at the faulting instruction."""
    msg, payload = new_message(lib.HVMSG_X64_EXCEPTION_INTERCEPT, "struct hv_x64_exception_intercept_message")
    insn = stop.instruction
    fill_header(cpu, payload.header, insn.length if insn else 0)
    payload.exception_vector = stop.vector
    if stop.vector in x86.ERROR_CODE_VECTORS and stop.error_code is not None:
        payload.exception_info.bits.error_code_valid = 1
        payload.error_code = stop.error_code
    payload.exception_parameter = stop.address
    for attr in _EXCEPTION_GPRS:
        setattr(payload, attr, cpu.reg(getattr(lib, f"HV_X64_REGISTER_{attr.upper()}")))
    _fill_segment(payload.ds_segment, cpu.segment(R.HV_X64_REGISTER_DS))
    _fill_segment(payload.ss_segment, cpu.segment(R.HV_X64_REGISTER_SS))
    if insn is not None:
        payload.instruction_byte_count = len(insn.raw[:16])
        ffi.memmove(payload.instruction_bytes, insn.raw[:16], len(insn.raw[:16]))
    return to_bytes(msg)
