"""Guest code that changes at an address already run must run as it is now.

Code changes at an address that already ran (module memory freed and
reused, a page remapped, code patched by the guest through any mapping or
by the host): the old translation must never run again (Unicorn kept it
when the new code was stored through a no-execute mapping, as Linux loads
modules), and the new code must be decoded again for the instructions the
hypervisor must see (IN/OUT, CPUID, MSRs, HLT, VMCALL): the intercept the
VMM sees is the new instruction's, never the old one's, and a special
instruction in the new code is never run by Unicorn itself.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from mshvstack.abi import lib
from mshvstack.backend.sim import SimBackend

from guests import assemble
from simhelpers import PD0, Guest, advance, get_registers, long_mode_guest, payload, set_registers

RAM = 0x40000
PT = 0x10000                          # 4 KiB page table for VA 0x200000-0x3FFFFF
PAGE_A, PAGE_B, PAGE_C = 0x20000, 0x21000, 0x22000
CODE = 0x200000                       # -> PAGE_A (executable)
CODE_NEXT = 0x201000                  # -> PAGE_C (executable)
ALIAS = 0x210000                      # -> PAGE_A, writable, no-execute
NX = 1 << 63
EFER_NXE = 1 << 11

# mov $1, %eax; out %eax, $0x10; ret  (the OUT at CODE + 5)
OLD = bytes.fromhex("b801000000" "e710" "c3")
# mov $2, %eax; mov $3, %edx (at CODE + 5, where the old OUT was); out %eax, $0x11; ret
NEW_OVER_OLD = bytes.fromhex("b802000000" "ba03000000" "e711" "c3")
# nop; mov $0x40000000, %eax (CODE + 5 is inside it); cpuid; mov %ebx, %eax; out %eax, $0x11; ret
NEW_CPUID = bytes.fromhex("90" "b800000040" "0fa2" "89d8" "e711" "c3")
HV_VENDOR = int.from_bytes(b"Micr", "little")


def _exit(msg: Any) -> tuple[str, int, int]:
    """What the VMM saw: ("io", port, RIP), ("halt", 0, 0) or (message type, 0, 0)."""
    kind = int(msg.header.message_type)
    if kind == lib.HVMSG_X64_IO_PORT_INTERCEPT:
        io = payload(msg, "struct hv_x64_io_port_intercept_message")
        return "io", int(io.port_number), int(io.header.rip)
    if kind == lib.HVMSG_X64_HALT:
        return "halt", 0, 0
    return hex(kind), 0, 0


def _guest(tmp_path: Path, source: str) -> tuple[SimBackend, Guest]:
    """A long-mode guest with 4 KiB pages at CODE (PAGE_A), CODE_NEXT (PAGE_C) and
    ALIAS (PAGE_A again, no-execute); PAGE_A, PAGE_B, PAGE_C hold HLT and OLD at 0."""
    image, _ = assemble(source, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image, ram_size=RAM)
    ram = g.ram
    struct.pack_into("<Q", ram, PD0 + 8, PT | 3)
    struct.pack_into("<Q", ram, PT + ((CODE - 0x200000) >> 12) * 8, PAGE_A | 3)
    struct.pack_into("<Q", ram, PT + ((CODE_NEXT - 0x200000) >> 12) * 8, PAGE_C | 3)
    struct.pack_into("<Q", ram, PT + ((ALIAS - 0x200000) >> 12) * 8, PAGE_A | 3 | NX)
    for page in (PAGE_A, PAGE_B, PAGE_C):
        ram[page : page + 0x1000] = b"\xf4" * 0x1000
    ram[PAGE_A : PAGE_A + len(OLD)] = OLD
    efer, = get_registers(backend, g.vp, [lib.HV_X64_REGISTER_EFER])
    set_registers(backend, g.vp, {lib.HV_X64_REGISTER_EFER: efer | EFER_NXE})
    return backend, g


def _io(backend: SimBackend, g: Guest, expected: tuple[str, int, int], rax: int | None = None,
        rdx: int | None = None) -> None:
    """Run to the next exit, check it is ``expected`` (and RAX/RDX), step over the OUT."""
    msg = g.run()
    assert _exit(msg) == expected
    io = payload(msg, "struct hv_x64_io_port_intercept_message")
    if rax is not None:
        assert io.rax & 0xFFFFFFFF == rax, hex(io.rax)
    if rdx is not None:
        value, = get_registers(backend, g.vp, [lib.HV_X64_REGISTER_RDX])
        assert value & 0xFFFFFFFF == rdx, hex(value)
    advance(backend, g, io.header)


def _copy_new_code(new: bytes, target: int) -> str:
    """Guest code that copies ``new`` (in the image, at new_code) to ``target``."""
    return f"""
    lea new_code(%rip), %rsi
    mov ${target:#x}, %rdi
    mov ${len(new)}, %ecx
    rep movsb
    """


def _image_tail(new: bytes) -> str:
    return "new_code:\n    .byte " + ", ".join(f"{b:#x}" for b in new) + "\n"


@pytest.mark.parametrize("target", [ALIAS, CODE], ids=["through-an-alias", "through-the-same-mapping"])
def test_guest_rewrite_over_an_old_special_runs_the_new_code(tmp_path: Path, target: int) -> None:
    """The new code has an instruction where the old OUT was: the OUT must not be
    emulated there (it was: port 0x10 at CODE + 5, then RIP + 2 inside the mov)."""
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    {_copy_new_code(NEW_OVER_OLD, target)}
    call *%rbx
    out %al, $0x1F
    hlt
    {_image_tail(NEW_OVER_OLD)}
    """
    backend, g = _guest(tmp_path, source)
    try:
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        _io(backend, g, ("io", 0x11, CODE + 10), rax=2, rdx=3)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()


def test_guest_rewrite_with_a_new_special_hooks_it(tmp_path: Path) -> None:
    """The new code's CPUID and OUT are at addresses the old code had no special
    instruction at: the hypervisor must answer the CPUID and the VMM see the OUT
    (unscanned, Unicorn ran both itself and the VMM saw port 0x1F next)."""
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    {_copy_new_code(NEW_CPUID, ALIAS)}
    call *%rbx
    out %al, $0x1F
    hlt
    {_image_tail(NEW_CPUID)}
    """
    backend, g = _guest(tmp_path, source)
    try:
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        _io(backend, g, ("io", 0x11, CODE + 10), rax=HV_VENDOR)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()


@pytest.mark.parametrize("stores", [0, 3000], ids=["code-page", "code-page-turned-data"])
def test_code_page_turned_data_is_retired_and_guarded_again(tmp_path: Path, stores: int) -> None:
    """PAGE_A ran code, then takes many stores as data: the engine retires it (its
    stores stop taking the checked path), and when its code runs again it is
    claimed and guarded again, so a rewrite after that runs as rewritten.  All in
    one run, with no exit between: a page left unguarded would take the rewrite
    as plain stores and run the old translation (EAX 1 at the OUT, not 2)."""
    old, new = bytes.fromhex("b801000000" "c3"), bytes.fromhex("b802000000" "c3")   # mov $1 (or $2), %eax; ret
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    mov ${stores}, %ecx
    mov ${ALIAS + 0x800:#x}, %rdi
    test %ecx, %ecx
    jz 2f
1:  mov %rcx, (%rdi)
    dec %ecx
    jnz 1b
2:  call *%rbx
    {_copy_new_code(new, ALIAS)}
    call *%rbx
    out %eax, $0x1F
    hlt
    {_image_tail(new)}
    """
    backend, g = _guest(tmp_path, source)
    try:
        g.ram[PAGE_A : PAGE_A + len(old)] = old
        assert _exit(msg := g.run())[:2] == ("io", 0x1F)
        assert payload(msg, "struct hv_x64_io_port_intercept_message").rax & 0xFFFFFFFF == 2
        engine = backend.vp_of(g.vp).engine
        assert engine is not None and engine.pages_retired == (1 if stores else 0)
        assert struct.unpack_from("<Q", g.ram, PAGE_A + 0x800)[0] == (1 if stores else int.from_bytes(b"\xf4" * 8, "little"))
    finally:
        g.close()


_FLUSHES = {
    "invlpg": "invlpg (%rbx)",
    "cr3": "mov %cr3, %rax\n    mov %rax, %cr3",
    "cr4-pge": "mov %cr4, %rax\n    xor $0x80, %rax\n    mov %rax, %cr4\n    xor $0x80, %rax\n    mov %rax, %cr4",
}


@pytest.mark.parametrize("flush", list(_FLUSHES), ids=list(_FLUSHES))
@pytest.mark.parametrize("new", [NEW_OVER_OLD, NEW_CPUID], ids=["over-the-old-special", "new-specials"])
def test_remapped_code_page_runs_the_new_code(tmp_path: Path, flush: str, new: bytes) -> None:
    """CODE is remapped from PAGE_A to PAGE_B (other code) and the TLB flushed."""
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    movq ${PAGE_B | 3:#x}, {PT + ((CODE - 0x200000) >> 12) * 8:#x}
    {_FLUSHES[flush]}
    call *%rbx
    out %al, $0x1F
    hlt
    """
    backend, g = _guest(tmp_path, source)
    try:
        g.ram[PAGE_B : PAGE_B + len(new)] = new
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        if new is NEW_OVER_OLD:
            _io(backend, g, ("io", 0x11, CODE + 10), rax=2, rdx=3)
        else:
            _io(backend, g, ("io", 0x11, CODE + 10), rax=HV_VENDOR)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()


# A block from CODE + 0xFF0 into the next page: mov $1, %eax; 11 nops | then on PAGE_C:
HEAD = bytes.fromhex("b801000000") + b"\x90" * 11
TAIL_OLD = bytes.fromhex("ba07000000" "e710" "c3")        # mov $7, %edx; out %eax, $0x10; ret
TAIL_NEW = bytes.fromhex("e712" "909090" "e710" "c3")     # out %eax, $0x12 (where the mov was); 3 nops; out %eax, $0x10; ret


def test_host_rewrite_of_the_second_page_of_a_block(tmp_path: Path) -> None:
    """The VMM rewrites, between runs, the part of a block that lies on the page
    after the one it starts on: the new OUT there must be seen."""
    source = f"""
    mov ${CODE + 0xFF0:#x}, %rbx
1:  call *%rbx
    jmp 1b
    """
    backend, g = _guest(tmp_path, source)
    try:
        g.ram[PAGE_A + 0xFF0 : PAGE_A + 0x1000] = HEAD
        g.ram[PAGE_C : PAGE_C + len(TAIL_OLD)] = TAIL_OLD
        _io(backend, g, ("io", 0x10, CODE_NEXT + 5), rax=1, rdx=7)
        g.ram[PAGE_C : PAGE_C + len(TAIL_NEW)] = TAIL_NEW
        _io(backend, g, ("io", 0x12, CODE_NEXT), rax=1)
        _io(backend, g, ("io", 0x10, CODE_NEXT + 5), rax=1)
    finally:
        g.close()


# A page of new code: NEW_OVER_OLD at 0x40, HLT around it.
_NEW_PAGE = bytes(b"\xf4" * 0x40) + NEW_OVER_OLD + bytes(b"\xf4" * (0x100 - 0x40 - len(NEW_OVER_OLD)))


@pytest.mark.parametrize("mapping", ["alias", "same-address"])
def test_code_copied_over_through_a_no_execute_mapping_runs_the_new_code(tmp_path: Path, mapping: str) -> None:
    """Code ran at CODE + 0x40; new code is copied over the page (from offset 0)
    through a writable, no-execute mapping: ALIAS, or CODE itself made
    no-execute for the copy and executable again after (as Linux loads a module
    into the memory, and at the address, of one freed).  Unicorn dropped only
    the translations of the first bytes stored and then let the mapping's
    stores run unchecked: the old code at 0x40 ran (its mov $1, %eax: RAX 1)."""
    pte = PT + ((CODE - 0x200000) >> 12) * 8
    if mapping == "alias":
        before, target, after = "", ALIAS, ""
    else:
        before = f"movq ${PAGE_A | 3:#x}, %rax\n    bts $63, %rax\n    mov %rax, {pte:#x}\n    invlpg (%rbx)"
        target = CODE
        after = f"movq ${PAGE_A | 3:#x}, {pte:#x}\n    invlpg (%rbx)"
    source = f"""
    mov ${CODE:#x}, %rbx
    lea 0x40(%rbx), %rbp
    call *%rbp
    {before}
    {_copy_new_code(_NEW_PAGE, target)}
    {after}
    call *%rbp
    out %al, $0x1F
    hlt
    {_image_tail(_NEW_PAGE)}
    """
    backend, g = _guest(tmp_path, source)
    try:
        g.ram[PAGE_A : PAGE_A + 0x1000] = b"\xf4" * 0x1000
        g.ram[PAGE_A + 0x40 : PAGE_A + 0x40 + len(OLD)] = OLD
        _io(backend, g, ("io", 0x10, CODE + 0x45), rax=1)
        _io(backend, g, ("io", 0x11, CODE + 0x4A), rax=2, rdx=3)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()


def test_code_written_through_an_alias_made_writable_before_it_ran(tmp_path: Path) -> None:
    """The alias was stored through before the code was first translated (its TLB
    entry already took stores unchecked): the rewrite through it must still drop
    the translation."""
    source = f"""
    mov ${CODE:#x}, %rbx
    {_copy_new_code(OLD, ALIAS).replace("new_code", "old_code")}
    call *%rbx
    {_copy_new_code(NEW_OVER_OLD, ALIAS)}
    call *%rbx
    out %al, $0x1F
    hlt
    {_image_tail(NEW_OVER_OLD)}
    {_image_tail(OLD).replace("new_code", "old_code")}
    """
    backend, g = _guest(tmp_path, source)
    try:
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        _io(backend, g, ("io", 0x11, CODE + 10), rax=2, rdx=3)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()


def test_host_rewrite_while_the_code_page_is_mapped_elsewhere(tmp_path: Path) -> None:
    """CODE ran from PAGE_A, then from PAGE_B; the VMM rewrites PAGE_A; CODE maps
    PAGE_A again.  Dropping translations through CODE's mapping of the moment
    dropped PAGE_B's and kept PAGE_A's stale one."""
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    movq ${PAGE_B | 3:#x}, {PT:#x}
    invlpg (%rbx)
    call *%rbx
    out %al, $0x1E
back:
    movq ${PAGE_A | 3:#x}, {PT:#x}
    invlpg (%rbx)
    call *%rbx
    out %al, $0x1F
    hlt
    """
    image, symbols = assemble(source, tmp_path)
    backend, g = _guest(tmp_path, source)
    try:
        g.ram[PAGE_B : PAGE_B + 3] = bytes.fromhex("e613c3")   # out %al, $0x13; ret
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        _io(backend, g, ("io", 0x13, CODE))
        g.ram[PAGE_A : PAGE_A + len(NEW_OVER_OLD)] = NEW_OVER_OLD
        _io(backend, g, ("io", 0x1E, symbols["back"] - 2))
        _io(backend, g, ("io", 0x11, CODE + 10), rax=2, rdx=3)
    finally:
        g.close()



def test_code_changed_back_after_an_overlapping_block_ran(tmp_path: Path) -> None:
    """In one run: OLD runs from CODE; other code replaces it and runs from
    CODE + 5 (a block of its own, with a mov where OLD's OUT was); OLD comes
    back and runs from CODE.  The block at CODE has the bytes it was scanned
    with, but what was last decoded at CODE + 5 is the mov: OLD's OUT must
    still be seen (it was run by Unicorn itself, and port 0x1F seen next)."""
    other = bytes.fromhex("b802000000" "ba03000000" "c3")   # mov $2, %eax; mov $3, %edx; ret
    source = f"""
    mov ${CODE:#x}, %rbx
    call *%rbx
    {_copy_new_code(other, CODE)}
    lea 5(%rbx), %rax
    call *%rax
    {_copy_new_code(OLD, CODE).replace("new_code", "old_code")}
    call *%rbx
    out %al, $0x1F
    hlt
    {_image_tail(other)}
    {_image_tail(OLD).replace("new_code", "old_code")}
    """
    backend, g = _guest(tmp_path, source)
    try:
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1)
        _io(backend, g, ("io", 0x10, CODE + 5), rax=1, rdx=3)
        assert _exit(g.run())[:2] == ("io", 0x1F)
    finally:
        g.close()
