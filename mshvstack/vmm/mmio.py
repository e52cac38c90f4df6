"""MMIO instruction emulation for UNMAPPED_GPA exits.

Decodes the intercepted instruction from the message's instruction bytes with
capstone (chosen over iced-x86: it is maintained, has wheels for every
platform we run on, and the simulator's engine already uses it), performs
the access on the MMIO bus and writes results back to the VP's registers,
flags included.  Covers the forms device drivers use: MOV (all sizes,
immediates, moffs), MOVZX/MOVSX/MOVSXD, AND/OR/XOR/ADD/SUB/CMP/TEST with a
memory operand, XCHG, STOS and MOVS (REP too).  An instruction outside that
set raises MmioUnsupported, for which the guest gets #UD; a REP string
instruction does at most STRING_BATCH elements per exit and leaves RIP on
itself, so the guest resumes it (as hardware does after an interrupt).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import capstone
import capstone.x86 as cx

from mshvstack.abi import lib
from mshvstack.errors import MshvError

U64 = (1 << 64) - 1
FLAG_CF, FLAG_PF, FLAG_AF, FLAG_ZF, FLAG_SF, FLAG_DF, FLAG_OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 10, 1 << 11
ARITH_FLAGS = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF


STRING_BATCH = 4096
PAGE = 4096


class MmioError(MshvError):
    """The MMIO access cannot be completed (the device or guest memory refused it)."""


class MmioUnsupported(MmioError):
    """The instruction is not one the emulator performs (the guest gets #UD)."""


class CpuAccess(Protocol):
    """What the emulator needs from a VP."""

    def get_registers(self, names: list[int]) -> list[int]: ...
    def set_registers(self, values: dict[int, int]) -> None: ...


@dataclass(frozen=True)
class MmioAccess:
    """The exit as the emulator needs it."""

    gpa: int
    rip: int
    instruction: bytes
    bits: int          # 16, 32 or 64


MemRead = Callable[[int, int], int]            # (gpa, size) -> value
MemWrite = Callable[[int, int, int], None]     # (gpa, size, value)
Translate = Callable[[int, bool], int]         # (gva, write) -> gpa (for MOVS' RAM side)


def _gpr(name: str) -> int:
    return int(getattr(lib, f"HV_X64_REGISTER_{name}"))


# capstone register name -> (hv register, bit shift, width in bytes)
_REGISTERS: dict[str, tuple[int, int, int]] = {}
for _full, _d, _w, _b in (("RAX", "eax", "ax", "al"), ("RBX", "ebx", "bx", "bl"), ("RCX", "ecx", "cx", "cl"),
                          ("RDX", "edx", "dx", "dl"), ("RSI", "esi", "si", "sil"), ("RDI", "edi", "di", "dil"),
                          ("RSP", "esp", "sp", "spl"), ("RBP", "ebp", "bp", "bpl")):
    _REGISTERS[_full.lower()] = (_gpr(_full), 0, 8)
    _REGISTERS[_d] = (_gpr(_full), 0, 4)
    _REGISTERS[_w] = (_gpr(_full), 0, 2)
    _REGISTERS[_b] = (_gpr(_full), 0, 1)
for _full, _h in (("RAX", "ah"), ("RBX", "bh"), ("RCX", "ch"), ("RDX", "dh")):
    _REGISTERS[_h] = (_gpr(_full), 8, 1)
for _i in range(8, 16):
    _REGISTERS[f"r{_i}"] = (_gpr(f"R{_i}"), 0, 8)
    _REGISTERS[f"r{_i}d"] = (_gpr(f"R{_i}"), 0, 4)
    _REGISTERS[f"r{_i}w"] = (_gpr(f"R{_i}"), 0, 2)
    _REGISTERS[f"r{_i}b"] = (_gpr(f"R{_i}"), 0, 1)

RAX, RCX, RSI, RDI, RIP, RFLAGS = (_gpr(n) for n in ("RAX", "RCX", "RSI", "RDI", "RIP", "RFLAGS"))

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _sign_extend(value: int, size: int) -> int:
    bit = 1 << (8 * size - 1)
    return (value & (bit - 1)) - (value & bit)


def _parity(value: int) -> bool:
    return bin(value & 0xFF).count("1") % 2 == 0


def _result_flags(result: int, size: int) -> int:
    result &= _mask(size)
    flags = 0
    if result == 0:
        flags |= FLAG_ZF
    if result >> (8 * size - 1):
        flags |= FLAG_SF
    if _parity(result):
        flags |= FLAG_PF
    return flags


def alu(op: str, a: int, b: int, size: int) -> tuple[int, int]:
    """(result, flags) of ``a op b`` at ``size`` bytes, as the CPU computes them."""
    m = _mask(size)
    a, b = a & m, b & m
    sign = 1 << (8 * size - 1)
    if op in ("and", "test"):
        r = a & b
        return r, _result_flags(r, size)
    if op == "or":
        r = a | b
        return r, _result_flags(r, size)
    if op == "xor":
        r = a ^ b
        return r, _result_flags(r, size)
    if op == "add":
        full = a + b
        r = full & m
        flags = _result_flags(r, size)
        if full > m:
            flags |= FLAG_CF
        if (~(a ^ b) & (a ^ r)) & sign:
            flags |= FLAG_OF
        if (a ^ b ^ r) & 0x10:
            flags |= FLAG_AF
        return r, flags
    if op in ("sub", "cmp"):
        r = (a - b) & m
        flags = _result_flags(r, size)
        if a < b:
            flags |= FLAG_CF
        if ((a ^ b) & (a ^ r)) & sign:
            flags |= FLAG_OF
        if (a ^ b ^ r) & 0x10:
            flags |= FLAG_AF
        return r, flags
    raise MmioError(f"unsupported ALU operation {op}")


class MmioEmulator:
    def __init__(self, read: MemRead, write: MemWrite, translate: Translate | None = None,
                 ram_read: MemRead | None = None, ram_write: MemWrite | None = None) -> None:
        self.read = read
        self.write = write
        self.translate = translate
        self.ram_read = ram_read
        self.ram_write = ram_write
        # Every VP's thread emulates its own exits: each gets its own decoders (a capstone handle
        # keeps state while it prints an instruction, and is safe in one thread at a time).
        self._local = threading.local()

    @staticmethod
    def _decoder(mode: int) -> capstone.Cs:
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        md.detail = True
        return md

    def _decoders(self) -> dict[int, capstone.Cs]:
        """This thread's decoders, one per code width."""
        decoders: dict[int, capstone.Cs] | None = getattr(self._local, "decoders", None)
        if decoders is None:
            decoders = self._local.decoders = {bits: self._decoder(mode) for bits, mode in _MODES.items()}
        return decoders

    def decode(self, access: MmioAccess) -> capstone.CsInsn:
        for insn in self._decoders()[access.bits].disasm(access.instruction, access.rip, count=1):
            return insn
        raise MmioUnsupported(f"undecodable instruction bytes {access.instruction.hex()} at {access.rip:#x}")

    def emulate(self, cpu: CpuAccess, access: MmioAccess, translate: Translate | None = None) -> None:
        """Perform the instruction's MMIO access and advance RIP past it.  ``translate``:
        the address translation of the VP that made the access (its own page tables),
        instead of the emulator's default."""
        insn = self.decode(access)
        state = _RegisterState(cpu)
        base = insn.mnemonic.split()[-1]
        done = True
        string = insn.opcode[0] in _STRING_OPCODES   # by opcode: SSE2's movsd shares the mnemonic
        if string:
            done = self._string(insn, access, state, base.startswith("stos"), translate or self.translate)
        else:
            self._simple(insn, access, state)
        if done:
            state.values[RIP] = (access.rip + insn.size) & U64
        state.flush()

    def _operand_value(self, op: capstone.x86.X86Op, insn: capstone.CsInsn, state: _RegisterState) -> int:
        if op.type == cx.X86_OP_IMM:
            return int(op.imm) & U64
        if op.type == cx.X86_OP_REG:
            return state.get_reg(insn.reg_name(op.reg))
        raise MmioUnsupported(f"{insn.mnemonic} {insn.op_str}: unexpected operand")

    def _simple(self, insn: capstone.CsInsn, access: MmioAccess, state: _RegisterState) -> None:
        ops = list(insn.operands)
        mem = [i for i, op in enumerate(ops) if op.type == cx.X86_OP_MEM]
        if len(mem) != 1:
            raise MmioUnsupported(f"{insn.mnemonic} {insn.op_str}: expected one memory operand")
        m = mem[0]
        size = ops[m].size
        name = insn.mnemonic
        gpa = access.gpa
        if name in ("mov", "movabs"):  # movabs: the moffs forms (A0-A3)
            if m == 0:
                self.write(gpa, size, self._operand_value(ops[1], insn, state) & _mask(size))
            else:
                state.set_reg(insn.reg_name(ops[0].reg), self.read(gpa, size))
        elif name in ("movzx", "movsx", "movsxd"):
            value = self.read(gpa, size)
            if name != "movzx":
                value = _sign_extend(value, size) & _mask(ops[0].size)
            state.set_reg(insn.reg_name(ops[0].reg), value)
        elif name in ("and", "or", "xor", "add", "sub", "cmp", "test"):
            other = ops[1 - m]
            operand = self._operand_value(other, insn, state)  # immediates come sign-extended
            current = self.read(gpa, size)
            a, b = (current, operand) if m == 0 else (operand, current)
            result, flags = alu(name, a, b, size)
            state.set_flags(flags)
            if name not in ("cmp", "test"):
                if m == 0:
                    self.write(gpa, size, result)
                else:
                    state.set_reg(insn.reg_name(ops[0].reg), result)
        elif name == "xchg":
            reg = ops[1 - m]
            old = self.read(gpa, size)
            self.write(gpa, size, state.get_reg(insn.reg_name(reg.reg)))
            state.set_reg(insn.reg_name(reg.reg), old)
        else:
            raise MmioUnsupported(f"cannot emulate {name} {insn.op_str} on MMIO at {gpa:#x}")

    def _string(self, insn: capstone.CsInsn, access: MmioAccess, state: _RegisterState, store: bool,
                translate: Translate | None) -> bool:
        """STOS/MOVS, at most STRING_BATCH elements; True when the instruction is complete."""
        size = _STRING_SIZES[insn.mnemonic.split()[-1]]
        rep = insn.mnemonic.startswith("rep")
        address_mask = _mask(access.bits // 8)
        total = state.get(RCX) & address_mask if rep else 1
        count = min(total, STRING_BATCH)
        step = -size if state.get(RFLAGS) & FLAG_DF else size
        rdi = state.get(RDI)
        if store:
            value = state.get(RAX) & _mask(size)
            for i in range(count):
                self.write(access.gpa + i * step, size, value)
        else:
            if translate is None or self.ram_read is None or self.ram_write is None:
                raise MmioError("MOVS on MMIO needs guest memory access")
            rsi = state.get(RSI)
            from_mmio = translate(rsi, False) == access.gpa
            ram = _PageTranslations(translate, write=from_mmio)
            for i in range(count):
                src, dst = (rsi + i * step) & address_mask, (rdi + i * step) & address_mask
                if from_mmio:
                    self.ram_write(ram.gpa(dst), size, self.read(access.gpa + i * step, size))
                else:
                    self.write(access.gpa + i * step, size, self.ram_read(ram.gpa(src), size))
            state.values[RSI] = (rsi + count * step) & address_mask
        state.values[RDI] = (rdi + count * step) & address_mask
        if rep:
            state.values[RCX] = (state.get(RCX) & ~address_mask) | (total - count)
        return total == count


_STRING_OPCODES = frozenset({0xA4, 0xA5, 0xAA, 0xAB})   # MOVS, STOS
_STRING_SIZES = {f"{op}{suffix}": size for op in ("stos", "movs") for suffix, size in (("b", 1), ("w", 2), ("d", 4), ("q", 8))}


class _PageTranslations:
    """The RAM side of MOVS: each guest page translated once (the string may cross pages)."""

    def __init__(self, translate: Translate, write: bool) -> None:
        self.translate, self.write = translate, write
        self._pages: dict[int, int] = {}

    def gpa(self, gva: int) -> int:
        page = gva & ~(PAGE - 1)
        if page not in self._pages:
            self._pages[page] = self.translate(page, self.write) & ~(PAGE - 1)
        return self._pages[page] | (gva & (PAGE - 1))


def _register(reg_name: str) -> tuple[int, int, int]:
    try:
        return _REGISTERS[reg_name]
    except KeyError:   # segment, SSE, control registers...
        raise MmioUnsupported(f"register {reg_name} cannot take part in MMIO emulation") from None


class _RegisterState:
    """Register reads batched on demand, writes collected and flushed once."""

    def __init__(self, cpu: CpuAccess) -> None:
        self.cpu = cpu
        self.values: dict[int, int] = {}
        self._dirty: set[int] = set()

    def get(self, name: int) -> int:
        if name not in self.values:
            (self.values[name],) = self.cpu.get_registers([name])
        return self.values[name]

    def get_reg(self, reg_name: str) -> int:
        hv, shift, width = _register(reg_name)
        return (self.get(hv) >> shift) & _mask(width)

    def set_reg(self, reg_name: str, value: int) -> None:
        hv, shift, width = _register(reg_name)
        value &= _mask(width)
        if width == 4 and shift == 0:
            new = value  # 32-bit writes zero-extend
        elif width == 8:
            new = value
        else:
            old = self.get(hv)
            new = (old & ~(_mask(width) << shift)) | (value << shift)
        self.values[hv] = new & U64
        self._dirty.add(hv)

    def set_flags(self, flags: int) -> None:
        self.values[RFLAGS] = (self.get(RFLAGS) & ~ARITH_FLAGS) | flags
        self._dirty.add(RFLAGS)

    def flush(self) -> None:
        self._dirty.update({RIP} | ({RSI, RDI, RCX} & set(self.values)))
        self.cpu.set_registers({name: self.values[name] for name in self._dirty if name in self.values})
