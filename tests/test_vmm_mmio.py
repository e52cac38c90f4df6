"""MMIO instruction emulation against an independent model (hypothesis).

Instructions are encoded here by hand (a tiny x86 encoder for the forms
drivers use) with random operand sizes, registers, displacements and
values; the emulator decodes them with capstone.  The model computes the
expected bus traffic, register results and flags with plain arithmetic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import lib
from mshvstack.vmm.mmio import FLAG_CF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF, MmioAccess, MmioEmulator, MmioError

RBX = int(lib.HV_X64_REGISTER_RBX)
REG_CODES = {0: "RAX", 1: "RCX", 2: "RDX", 6: "RSI", 7: "RDI", 8: "R8", 9: "R9", 12: "R12", 15: "R15"}
HV = {code: int(getattr(lib, f"HV_X64_REGISTER_{name}")) for code, name in REG_CODES.items()}
RIP, RFLAGS = int(lib.HV_X64_REGISTER_RIP), int(lib.HV_X64_REGISTER_RFLAGS)
MMIO_BASE = 0xD0000000
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: (1 << 64) - 1}


@dataclass
class FakeCpu:
    regs: dict[int, int] = field(default_factory=dict)

    def get_registers(self, names: list[int]) -> list[int]:
        return [self.regs.get(n, 0) for n in names]

    def set_registers(self, values: dict[int, int]) -> None:
        self.regs.update(values)


@dataclass
class FakeBus:
    memory: dict[int, int] = field(default_factory=dict)
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def read(self, gpa: int, size: int) -> int:
        value = self.memory.get(gpa, 0) & MASK[size]
        self.log.append(("r", gpa, size, value))
        return value

    def write(self, gpa: int, size: int, value: int) -> None:
        self.memory[gpa] = value
        self.log.append(("w", gpa, size, value))


def _prefix(size: int, reg: int = 0) -> bytes:
    out = b"\x66" if size == 2 else b""
    rex = 0x40 | (0x08 if size == 8 else 0) | (0x04 if reg >= 8 else 0)
    if rex != 0x40 or (size == 1 and reg in (6, 7)):
        out += bytes([rex])
    return out


def _modrm(reg: int, disp: int) -> bytes:
    return bytes([0x40 | ((reg & 7) << 3) | 3, disp & 0xFF])  # [rbx + disp8]


def _run(code: bytes, regs: dict[int, int], mem: int, disp: int, rflags: int = 0x202) -> tuple[FakeCpu, FakeBus]:
    cpu = FakeCpu({**regs, RBX: MMIO_BASE, RFLAGS: rflags})
    bus = FakeBus({MMIO_BASE + disp: mem})
    MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE + disp, 0x1000, code + b"\x90" * 4, 64))
    assert cpu.regs[RIP] == 0x1000 + len(code)
    return cpu, bus


sizes = st.sampled_from([1, 2, 4, 8])
reg_codes = st.sampled_from(sorted(REG_CODES))
disps = st.integers(0, 0x7F)
u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=200, deadline=None)
@given(size=sizes, reg=reg_codes, disp=disps, value=u64, old=u64)
def test_mov_store_and_load(size: int, reg: int, disp: int, value: int, old: int) -> None:
    opcode_store, opcode_load = (0x88, 0x8A) if size == 1 else (0x89, 0x8B)
    code = _prefix(size, reg) + bytes([opcode_store]) + _modrm(reg, disp)
    cpu, bus = _run(code, {HV[reg]: value}, 0, disp)
    assert bus.log == [("w", MMIO_BASE + disp, size, value & MASK[size])]
    code = _prefix(size, reg) + bytes([opcode_load]) + _modrm(reg, disp)
    cpu, bus = _run(code, {HV[reg]: old}, value, disp)
    loaded = value & MASK[size]
    if size == 4:
        expected = loaded  # 32-bit loads zero-extend
    elif size == 8:
        expected = loaded
    else:
        expected = (old & ~MASK[size]) | loaded
    assert cpu.regs[HV[reg]] == expected


@settings(max_examples=120, deadline=None)
@given(src_size=st.sampled_from([1, 2]), dst_size=st.sampled_from([4, 8]), signed=st.booleans(), reg=reg_codes,
       disp=disps, value=u64)
def test_movzx_movsx(src_size: int, dst_size: int, signed: bool, reg: int, disp: int, value: int) -> None:
    opcode = {(1, False): 0xB6, (2, False): 0xB7, (1, True): 0xBE, (2, True): 0xBF}[(src_size, signed)]
    code = _prefix(dst_size, reg) + bytes([0x0F, opcode]) + _modrm(reg, disp)
    cpu, _bus = _run(code, {}, value, disp)
    loaded = value & MASK[src_size]
    if signed and loaded >> (8 * src_size - 1):
        loaded -= 1 << (8 * src_size)
    assert cpu.regs[HV[reg]] == loaded & MASK[dst_size]


def _flags_logic(result: int, size: int) -> int:
    flags = FLAG_ZF if result == 0 else 0
    flags |= FLAG_SF if result >> (8 * size - 1) else 0
    flags |= FLAG_PF if bin(result & 0xFF).count("1") % 2 == 0 else 0
    return flags


ALU = {"add": (0x01, 0), "or": (0x09, 1), "and": (0x21, 4), "sub": (0x29, 5), "xor": (0x31, 6), "cmp": (0x39, 7)}


def _model(op: str, a: int, b: int, size: int) -> tuple[int, int]:
    bits = 8 * size
    if op in ("and", "or", "xor"):
        r = {"and": a & b, "or": a | b, "xor": a ^ b}[op]
        return r, _flags_logic(r, size)
    signed = lambda v: v - (1 << bits) if v >> (bits - 1) else v  # noqa: E731
    if op == "add":
        exact, wide = a + b, signed(a) + signed(b)
    else:
        exact, wide = a - b, signed(a) - signed(b)
    r = exact & MASK[size]
    flags = _flags_logic(r, size)
    if exact < 0 or exact > MASK[size]:
        flags |= FLAG_CF
    if not -(1 << (bits - 1)) <= wide < (1 << (bits - 1)):
        flags |= FLAG_OF
    return r, flags


@settings(max_examples=250, deadline=None)
@given(op=st.sampled_from(sorted(ALU)), size=st.sampled_from([2, 4, 8]), reg=reg_codes, disp=disps, mem=u64, val=u64,
       imm=st.booleans())
def test_read_modify_write_and_compare(op: str, size: int, reg: int, disp: int, mem: int, val: int, imm: bool) -> None:
    opcode, ext = ALU[op]
    mem &= MASK[size]
    if imm:
        imm8 = val & 0xFF
        code = _prefix(size) + bytes([0x83]) + _modrm(ext, disp) + bytes([imm8])
        operand = (imm8 - 256 if imm8 & 0x80 else imm8) & MASK[size]
        regs = {}
    else:
        code = _prefix(size, reg) + bytes([opcode]) + _modrm(reg, disp)
        operand = val & MASK[size]
        regs = {HV[reg]: val}
    cpu, bus = _run(code, regs, mem, disp)
    result, flags = _model(op, mem, operand, size)
    arith = FLAG_CF | FLAG_PF | FLAG_ZF | FLAG_SF | FLAG_OF
    assert cpu.regs[RFLAGS] & arith == flags
    writes = [e for e in bus.log if e[0] == "w"]
    assert writes == ([] if op == "cmp" else [("w", MMIO_BASE + disp, size, result)])


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([1, 2, 4, 8]), count=st.integers(1, 8), value=u64, rep=st.booleans())
def test_stos(size: int, count: int, value: int, rep: bool) -> None:
    opcode = 0xAA if size == 1 else 0xAB
    code = (b"\xf3" if rep else b"") + _prefix(size) + bytes([opcode])
    rax, rcx, rdi = int(lib.HV_X64_REGISTER_RAX), int(lib.HV_X64_REGISTER_RCX), int(lib.HV_X64_REGISTER_RDI)
    cpu = FakeCpu({rax: value, rcx: count, rdi: MMIO_BASE, RFLAGS: 2})
    bus = FakeBus()
    MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, code, 64))
    n = count if rep else 1
    assert bus.log == [("w", MMIO_BASE + i * size, size, value & MASK[size]) for i in range(n)]
    assert cpu.regs[rdi] == MMIO_BASE + n * size
    assert cpu.regs.get(rcx) == (0 if rep else count)


def test_moffs_and_unsupported_forms() -> None:
    # mov eax, [moffs64] (A1 with a 64-bit absolute address)
    code = b"\xa1" + struct.pack("<Q", MMIO_BASE)
    cpu = FakeCpu({RFLAGS: 2})
    bus = FakeBus({MMIO_BASE: 0x11223344})
    MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, code, 64))
    assert cpu.regs[int(lib.HV_X64_REGISTER_RAX)] == 0x11223344
    with pytest.raises(MmioError):
        MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, b"\x0f\x0b", 64))  # ud2
    with pytest.raises(MmioError):
        MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, b"", 64))


@pytest.mark.parametrize("code, what", [
    (b"\x8e\x00", "mov es, [rax]"),
    (b"\x8e\x10", "mov ss, [rax]"),
    (b"\xf3\x0f\x10\x00", "movss xmm0, [rax]"),
    (b"\xf2\x0f\x10\x00", "movsd xmm0, [rax] (SSE2, not the string op)"),
    (b"\xf3\x0f\x16\x00", "movshdup xmm0, [rax]"),
    (b"\x0f\x28\x08", "movaps xmm1, [rax]"),
    (b"\x0f\x22\x00", "mov cr0, rax (no memory operand)"),
])
def test_instructions_it_cannot_perform_are_unsupported_not_a_crash(code: bytes, what: str) -> None:
    from mshvstack.vmm.mmio import MmioUnsupported

    bus = FakeBus()
    cpu = FakeCpu({RFLAGS: 2, int(lib.HV_X64_REGISTER_RAX): MMIO_BASE})
    with pytest.raises(MmioUnsupported):
        MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, code, 64))
    assert RIP not in cpu.regs, what   # the instruction did not complete


@settings(max_examples=30, deadline=None)
@given(size=st.sampled_from([1, 8]), count=st.integers(4097, 1 << 63), value=u64)
def test_rep_stos_with_a_huge_count_is_done_in_bounded_steps(size: int, count: int, value: int) -> None:
    from mshvstack.vmm.mmio import STRING_BATCH

    code = b"\xf3" + _prefix(size) + bytes([0xAA if size == 1 else 0xAB])
    rax, rcx, rdi = int(lib.HV_X64_REGISTER_RAX), int(lib.HV_X64_REGISTER_RCX), int(lib.HV_X64_REGISTER_RDI)
    cpu = FakeCpu({rax: value, rcx: count, rdi: MMIO_BASE, RFLAGS: 2, RIP: 0x1000})
    bus = FakeBus()
    MmioEmulator(bus.read, bus.write).emulate(cpu, MmioAccess(MMIO_BASE, 0x1000, code, 64))
    assert len(bus.log) == STRING_BATCH
    assert cpu.regs[rcx] == count - STRING_BATCH and cpu.regs[rdi] == MMIO_BASE + STRING_BATCH * size
    assert cpu.regs[RIP] == 0x1000   # still on the instruction: the guest resumes it
