"""The engine's C core writes IO and hypercall intercept messages and the register
page itself (engines/x86exits.c).  Python's encoder (intercepts.py) is the
reference: at the same stop, for any IO instruction form in every code width and
any intercepted 64-bit hypercall, both must write the same bytes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend, intercepts
from mshvstack.backend.sim.engines.base import Instruction, Special
from mshvstack.backend.sim.vp import SimVp

from simhelpers import ENTRY, Guest, expect_io, install_intercept, long_mode_guest, payload, set_registers, set_segment

R = lib
IMMEDIATE = (0xE4, 0xE5, 0xE6, 0xE7)      # in al/ax,imm8 ; out imm8,al/ax
PORT_IN_DX = (0xEC, 0xED, 0xEE, 0xEF)     # in/out through DX
STRING = (0x6C, 0x6D, 0x6E, 0x6F)         # ins/outs
LEGACY_PREFIXES = (0x66, 0x67, 0xF3, 0xF2, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def io_instructions(draw: st.DrawFn, bits: int) -> bytes:
    prefixes = draw(st.lists(st.sampled_from(LEGACY_PREFIXES), max_size=3, unique=True))
    rex = [draw(st.sampled_from([0x40, 0x48]))] if bits == 64 and draw(st.booleans()) else []
    opcode = draw(st.sampled_from(IMMEDIATE + PORT_IN_DX + STRING))
    immediate = [draw(st.integers(0, 0xFF))] if opcode in IMMEDIATE else []
    return bytes(prefixes + rex + [opcode] + immediate)


def _guest(backend: SimBackend, bits: int, code: bytes) -> tuple[Guest, int]:
    """A guest in ``bits``-wide code with ``code`` at its entry; returns it and the entry's linear address."""
    if bits == 64:
        return long_mode_guest(backend, code), ENTRY
    g = Guest(backend)
    g.ram[0x1000 : 0x1000 + len(code)] = code
    if bits == 32:   # flat protected mode, no paging
        set_segment(backend, g.vp, R.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, 0x08, 0xC09B)
        for name in (R.HV_X64_REGISTER_SS, R.HV_X64_REGISTER_DS, R.HV_X64_REGISTER_ES):
            set_segment(backend, g.vp, name, 0, 0xFFFFFFFF, 0x10, 0xC093)
        set_registers(backend, g.vp, {R.HV_X64_REGISTER_CR0: 0x11})
    set_registers(backend, g.vp, {R.HV_X64_REGISTER_RIP: 0x1000, R.HV_X64_REGISTER_RFLAGS: 2})
    return g, 0x1000


def _reference_message(vp: SimVp, address: int) -> bytes:
    """What Python's encoder writes for the IO instruction the VP stopped at."""
    engine = vp.engine
    assert engine is not None
    template = engine._specials[address]
    rip = vp.reg(R.HV_X64_REGISTER_RIP)
    return intercepts.io_port(vp, Instruction(address, rip, template.length, template.raw, template.kind,
                                              template.mnemonic, template.op_str))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bits=st.sampled_from([16, 32, 64]), rax=U64, rcx=U64, rdx=U64, rsi=U64, rdi=U64)
def test_core_writes_the_io_intercept_and_register_page_as_the_reference(
        data: st.DataObject, bits: int, rax: int, rcx: int, rdx: int, rsi: int, rdi: int) -> None:
    code = data.draw(io_instructions(bits))
    backend = SimBackend()
    g, address = _guest(backend, bits, code)
    try:
        set_registers(backend, g.vp, {R.HV_X64_REGISTER_RAX: rax, R.HV_X64_REGISTER_RCX: rcx,
                                      R.HV_X64_REGISTER_RDX: rdx, R.HV_X64_REGISTER_RSI: rsi,
                                      R.HV_X64_REGISTER_RDI: rdi})
        opcode = next(b for b in code if b not in LEGACY_PREFIXES and not (bits == 64 and b & 0xF0 == 0x40))
        expected_port = code[-1] if opcode in IMMEDIATE else rdx & 0xFFFF
        io = expect_io(g.run(), expected_port)
        vp = backend._entry(g.vp).vp
        assert vp is not None and vp.engine is not None
        written = bytes(vp.intercept_page[:256])
        assert written == _reference_message(vp, address)
        assert io.instruction_byte_count == len(code) and bytes(io.instruction_bytes)[: len(code)] == code
        assert io.rax == rax and io.rsi == rsi and io.rdi == rdi
        page = bytes(vp.register_page[:])
        vp.regs.write_page()
        assert page == bytes(vp.register_page[:])
    finally:
        g.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instruction=st.sampled_from([bytes.fromhex("0f01c1"), bytes.fromhex("0f01d9")]),   # vmcall, vmmcall
       code=st.sampled_from([lib.HVCALL_POST_MESSAGE, lib.HVCALL_SIGNAL_EVENT]), control=U64,
       rax=U64, rbx=U64, rdx=U64, r8=U64, rsi=U64, rdi=U64)
def test_core_writes_the_hypercall_intercept_and_register_page_as_the_reference(
        instruction: bytes, code: int, control: int, rax: int, rbx: int, rdx: int, r8: int, rsi: int, rdi: int) -> None:
    backend = SimBackend()
    g, address = _guest(backend, 64, instruction)
    try:
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_HYPERCALL)
        rcx = control & ~0xFFFF | code
        set_registers(backend, g.vp, {R.HV_X64_REGISTER_RAX: rax, R.HV_X64_REGISTER_RBX: rbx, R.HV_X64_REGISTER_RCX: rcx,
                                      R.HV_X64_REGISTER_RDX: rdx, R.HV_X64_REGISTER_R8: r8, R.HV_X64_REGISTER_RSI: rsi,
                                      R.HV_X64_REGISTER_RDI: rdi})
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_HYPERCALL_INTERCEPT
        call = payload(msg, "struct hv_x64_hypercall_intercept_message")
        assert (call.rax, call.rbx, call.rcx, call.rdx, call.r8, call.rsi, call.rdi) == (rax, rbx, rcx, rdx, r8, rsi, rdi)
        vp = backend._entry(g.vp).vp
        assert vp is not None and vp.engine is not None
        rip = vp.reg(R.HV_X64_REGISTER_RIP)
        reference = intercepts.special(vp, Instruction(address, rip, len(instruction), instruction, Special.VMCALL, "", ""),
                                       (0, 0, 0, 0))
        assert bytes(vp.intercept_page[:256]) == reference
        page = bytes(vp.register_page[:])
        vp.regs.write_page()
        assert page == bytes(vp.register_page[:])
    finally:
        g.close()


def test_the_register_page_the_vmm_writes_reaches_the_engine() -> None:
    """GPRs, RIP and RFLAGS written through the page (dirty classes) are what the guest runs with."""
    # Real mode at 0x1000: out 0x10,al ; mov ax,bx ; out 0x11,al
    code = bytes.fromhex("e61089d8e611")
    backend = SimBackend()
    g, _ = _guest(backend, 16, code)
    try:
        io = expect_io(g.run(), 0x10)
        vp = backend._entry(g.vp).vp
        assert vp is not None
        page = ffi.from_buffer("struct hv_vp_register_page *", vp.register_page)
        page.rbx = 0x5A
        page.rip = io.header.rip + io.header.instruction_length
        page.rflags = 0x202 | 1   # CF set
        page.dirty = (1 << R.HV_X64_REGISTER_CLASS_GENERAL) | (1 << R.HV_X64_REGISTER_CLASS_IP) \
            | (1 << R.HV_X64_REGISTER_CLASS_FLAGS)
        second = expect_io(g.run(), 0x11)
        assert second.rax & 0xFFFF == 0x5A
        assert second.header.rflags & 0x203 == 0x203
        assert page.dirty == 0 and page.rbx == 0x5A and page.rip == second.header.rip
    finally:
        g.close()
