"""Torture tests for exact execution: stops from other threads, timer interrupts
and VMM exits must never re-execute or skip a guest instruction."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from guests import assemble
from simhelpers import ENTRY, PD0, PD3, Guest, advance, expect_io, get_registers, get_registers_call, long_mode_guest, set_registers, set_segment

LAPIC = 1 << lib.MSHV_PT_BIT_LAPIC
R = lib


def _kicker(backend: SimBackend, vp: int, period_s: float) -> tuple[threading.Event, threading.Thread]:
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            time.sleep(period_s)
            backend.kick(vp)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return done, thread


def _run_counting_kicks(g: Guest, until: Callable[[Any], bool]) -> tuple[Any, int]:
    """Run until ``until(message)``; returns the message and how many runs a kick interrupted."""
    kicked = 0
    while True:
        try:
            msg = g.run()
        except ErrnoError as exc:
            assert exc.errno == errno.EINTR
            kicked += 1
            continue
        if until(msg):
            return msg, kicked


def test_kicked_locked_increments_are_exact(tmp_path: Path) -> None:
    """lock inc 2*10^7 times in real mode while another thread kicks every 200 us."""
    count = 20_000_000
    image, _ = assemble(f"mov ${count}, %ecx\n1: lock incl 0x3000\ndec %ecx\njnz 1b\nhlt", tmp_path, origin=0x1000, bits=16)
    backend = SimBackend()
    g = Guest(backend)
    try:
        g.ram[0x1000 : 0x1000 + len(image)] = image
        set_registers(backend, g.vp, {R.HV_X64_REGISTER_RIP: 0x1000, R.HV_X64_REGISTER_RFLAGS: 2})
        done, thread = _kicker(backend, g.vp, 0.0002)
        try:
            msg, kicked = _run_counting_kicks(g, lambda m: m.header.message_type == lib.HVMSG_X64_HALT)
        finally:
            done.set()
            thread.join()
        assert struct.unpack_from("<I", g.ram, 0x3000)[0] == count
        assert kicked >= 100, kicked
    finally:
        g.close()


_TIMER_GUEST = """
    mov $0xFEE00000, %rbx          /* the xAPIC page */
    movl $0xB, 0x3E0(%rbx)         /* divide by 1 */
    movl $0x20040, 0x320(%rbx)     /* periodic, vector 0x40 */
    movl $0x1FF, 0xF0(%rbx)        /* software enable */
    movl $400000, 0x380(%rbx)      /* 0.4 ms at 1 GHz: 2.5 kHz */
    mov ${count}, %ecx
    sti
1:  lock incl 0x5000
    dec %ecx
    jnz 1b
    cli
    movl $0, 0x380(%rbx)           /* stop the timer */
    out %al, $0x10
    hlt
vector_0x40:
    lock incl 0x5008
    movl $0, 0xB0(%rbx)            /* EOI */
    iretq
"""


def _map_xapic(g: Guest) -> None:
    struct.pack_into("<Q", g.ram, PD3 + ((0xFEE00000 - 0xC0000000) >> 21) * 8, 0xFEE00000 | 0x83)


def test_timer_interrupts_do_not_disturb_a_locked_loop(tmp_path: Path) -> None:
    """The same loop with LAPIC timer interrupts at 2.5 kHz: both counters exact."""
    count = 20_000_000
    image, symbols = assemble(_TIMER_GUEST.replace("{count}", str(count)), tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image, {0x40: symbols["vector_0x40"]}, LAPIC)
    try:
        _map_xapic(g)
        expect_io(g.run(), 0x10)
        engine = backend.vp_of(g.vp).engine
        assert engine is not None
        loops, ticks = struct.unpack_from("<II", g.ram, 0x5000)[0], struct.unpack_from("<I", g.ram, 0x5008)[0]
        assert loops == count
        assert ticks == engine.injected and ticks >= 100, (ticks, engine.injected)   # every delivery ran the handler once
    finally:
        g.close()


def test_interrupted_string_instructions_are_exact(tmp_path: Path) -> None:
    """rep movsb and rep stosb of 1 MiB, stopped from another thread every 100 us."""
    source = """
    mov $0x100000, %rsi
    mov $0x200000, %rdi
    mov $0x100000, %rcx
    rep movsb
    out %al, $0x10
    mov $0xAB, %al
    mov $0x300000, %rdi
    mov $0x100000, %rcx
    rep stosb
    out %al, $0x11
    hlt
"""
    image, _ = assemble(source, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)
    extra = ffi.new("char[]", 0x300000 + 0x1000)
    try:
        base = (int(ffi.cast("uintptr_t", extra)) + 0xFFF) & ~0xFFF
        region = ffi.new("struct mshv_user_mem_region *")
        region.size, region.guest_pfn, region.flags, region.userspace_addr = 0x300000, 0x100, 3, base
        backend.ioctl(g.part, lib.MSHV_SET_GUEST_MEMORY, region)
        struct.pack_into("<Q", g.ram, PD0 + 8, 0x200000 | 0x83)   # map 2-4 MiB too
        memory = ffi.buffer(ffi.cast("char *", base), 0x300000)
        source_bytes = os.urandom(0x100000)
        memory[0:0x100000] = source_bytes
        done, thread = _kicker(backend, g.vp, 0.0001)
        try:
            msg, kicked_copy = _run_counting_kicks(g, lambda m: m.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT)
            io = expect_io(msg, 0x10)
            assert (io.rcx, io.rsi, io.rdi) == (0, 0x200000, 0x300000)
            assert memory[0x100000:0x200000] == source_bytes
            advance(backend, g, io.header)
            msg, kicked_fill = _run_counting_kicks(g, lambda m: m.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT)
            io = expect_io(msg, 0x11)
            assert (io.rcx, io.rdi) == (0, 0x400000)
            assert memory[0x200000:0x300000] == b"\xab" * 0x100000
        finally:
            done.set()
            thread.join()
        assert kicked_copy + kicked_fill >= 20, (kicked_copy, kicked_fill)
    finally:
        g.close()


def test_sti_shadow_and_pending_interrupt(tmp_path: Path) -> None:
    """An interrupt pending while IF=0 is taken after the instruction that follows STI."""
    source = """
    mov $0xFEE00000, %rbx
    movl $0x1FF, 0xF0(%rbx)
    movl $0x40041, 0x300(%rbx)     /* self-IPI, vector 0x41, while IF=0 */
    movl $0, 0x5000
    sti
    movl $1, 0x5000                /* in the STI shadow: runs before the interrupt */
    movl $2, 0x5000
    out %al, $0x10
    hlt
vector_0x41:
    mov 0x5000, %eax
    mov %eax, 0x5008
    movl $0, 0xB0(%rbx)
    iretq
"""
    image, symbols = assemble(source, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image, {0x41: symbols["vector_0x41"]}, LAPIC)
    try:
        _map_xapic(g)
        expect_io(g.run(), 0x10)
        assert struct.unpack_from("<I", g.ram, 0x5008)[0] == 1
    finally:
        g.close()


def test_registers_keep_full_width_in_every_mode(tmp_path: Path) -> None:
    wide = 0x1122334455667788
    for cr0, cs_attributes in ((0x60000010, 0x9B), (0x60000011, 0xC09B)):
        backend = SimBackend()
        g = Guest(backend)
        try:
            g.ram[0x1000:0x1004] = bytes.fromhex("90e610f4")   # nop; out %al, $0x10; hlt
            set_segment(backend, g.vp, R.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF if cr0 & 1 else 0xFFFF, 0x08 if cr0 & 1 else 0, cs_attributes)
            set_registers(backend, g.vp, {R.HV_X64_REGISTER_CR0: cr0, R.HV_X64_REGISTER_RIP: 0x1000,
                                          R.HV_X64_REGISTER_RAX: wide, R.HV_X64_REGISTER_R9: wide ^ 1})
            io = expect_io(g.run(), 0x10)
            assert io.rax == wide
            advance(backend, g, io.header)
            assert g.run().header.message_type == lib.HVMSG_X64_HALT
            assert get_registers(backend, g.vp, [R.HV_X64_REGISTER_RAX, R.HV_X64_REGISTER_R9]) == [wide, wide ^ 1]
        finally:
            g.close()


def test_vp_starts_in_the_architectural_reset_state() -> None:
    backend = SimBackend()
    g = Guest(backend)
    try:
        arg = ffi.new("struct mshv_create_vp *")
        arg.vp_index = 1
        fresh = backend.ioctl(g.part, lib.MSHV_CREATE_VP, arg)
        try:
            call, (raw, out) = get_registers_call([R.HV_X64_REGISTER_CS, R.HV_X64_REGISTER_RIP, R.HV_X64_REGISTER_CR0])
            ffi.cast("struct hv_input_get_vp_registers *", raw).vp_index = 1
            backend.ioctl(fresh, lib.MSHV_ROOT_HVCALL, call)
            cs = out[0].segment
            assert (cs.selector, cs.base, cs.limit, cs.attributes) == (0xF000, 0xFFFF0000, 0xFFFF, 0x9B)
            assert int(out[1].reg64) == 0xFFF0 and int(out[2].reg64) == 0x60000010
        finally:
            backend.close(fresh)
    finally:
        g.close()


def test_machine_check_banks_agree_with_mcg_cap(tmp_path: Path) -> None:
    source = """
    mov $0x179, %ecx
    rdmsr
    mov %eax, %ebx                 /* bank count */
    mov $0x400, %ecx
    mov $-1, %eax
    mov $-1, %edx
    wrmsr                          /* MC0_CTL */
    mov $0x401, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr                          /* clear MC0_STATUS */
    rdmsr
    out %al, $0x10
    hlt
"""
    image, _ = assemble(source, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)
    try:
        io = expect_io(g.run(), 0x10)
        banks = get_registers(backend, g.vp, [R.HV_X64_REGISTER_RBX])[0]
        assert banks >= 1 and io.rax == 0
    finally:
        g.close()


_USER_GUEST = """
    /* TSS at 0x6000: RSP0 = 0xE000, IST1 = 0xD000; descriptor at GDT+0x28 */
    movq $0xE000, 0x6004
    movq $0xD000, 0x6024
    mov $0x28, %ax
    ltr %ax
    mov $0xC0000080, %ecx          /* EFER.SCE */
    rdmsr
    or $1, %eax
    wrmsr
    mov $0xC0000081, %ecx          /* STAR: syscall CS 0x08, sysret base 0x10 */
    xor %eax, %eax
    mov $0x00100008, %edx
    wrmsr
    mov $0xC0000082, %ecx          /* LSTAR */
    lea syscall_entry(%rip), %rax
    xor %edx, %edx
    wrmsr
    mov $0xC0000084, %ecx          /* SFMASK: IF */
    mov $0x200, %eax
    wrmsr
    mov $0xC0000102, %ecx          /* KERNEL_GS_BASE, swapped in on entry */
    mov $0x5550000, %eax
    wrmsr
    pushq $0x1B                    /* user SS */
    pushq $0xC000                  /* user RSP */
    pushq $0x202                   /* RFLAGS */
    pushq $0x23                    /* user CS */
    lea user(%rip), %rax
    push %rax
    iretq
user:
    mov $0x1234, %rdi
    syscall
    int $0x80                      /* a DPL3 gate: the stack switches to RSP0 */
    mov 0x40000000, %rax           /* not present: #PF from CPL3 on IST1 */
    hlt
syscall_entry:
    mov %rcx, %rbx                 /* RCX: the user's return address */
    swapgs
    mov $0xC0000101, %ecx
    rdmsr                          /* GS base after swapgs */
    mov %eax, %esi
    mov %cs, %eax
    mov %rax, 0x5100               /* recorded for the host: CS, user RIP, GS base */
    mov %rbx, 0x5108
    mov %rsi, 0x5110
    swapgs
    mov %rbx, %rcx
    sysretq
vector_0x80:
    mov %rsp, %rbx
    mov 8(%rsp), %rdx              /* the interrupted CS */
    out %al, $0x11
    iretq
vector_0xe:
    pop %rax                       /* error code */
    mov %rsp, %rbx
    mov 8(%rsp), %rdx              /* the interrupted CS */
    out %al, $0x12
    hlt
"""


@pytest.mark.parametrize("attempt", range(5))   # it once failed one run in five (see the test below)
def test_user_mode_syscall_interrupts_and_faults(tmp_path: Path, attempt: int) -> None:
    """iretq to CPL3, syscall/sysret with swapgs, int n from CPL3 through a DPL3
    gate on the TSS's RSP0 stack, and, after that handler exited to the VMM and
    returned to user mode, a #PF from CPL3 through an IST gate."""
    image, symbols = assemble(_USER_GUEST, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)
    try:
        ram = g.ram
        from simhelpers import GDT, IDT, PDPT, PML4
        struct.pack_into("<QQQQQQ", ram, GDT, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF,
                         0x00CFF2000000FFFF, 0x00AFFA000000FFFF, 0)            # + user data 0x18, user code 0x20
        tss_low = 0x67 | (0x6000 & 0xFFFFFF) << 16 | 0x89 << 40
        struct.pack_into("<QQ", ram, GDT + 0x28, tss_low, 0)
        for vector, ist, dpl in ((0x80, 0, 3), (0xE, 1, 0)):
            handler = symbols[f"vector_{vector:#x}"]
            attributes = 0x8E00 | dpl << 13 | ist
            low = (handler & 0xFFFF) | (0x08 << 16) | (attributes << 32) | ((handler >> 16) & 0xFFFF) << 48
            struct.pack_into("<QQ", ram, IDT + vector * 16, low, handler >> 32)
        for table in (PML4, PDPT, PD0):       # user-accessible identity map
            struct.pack_into("<Q", ram, table, struct.unpack_from("<Q", ram, table)[0] | 4)
        set_segment(backend, g.vp, R.HV_X64_REGISTER_GDTR, GDT, 0x37, 0, 0)
        set_segment(backend, g.vp, R.HV_X64_REGISTER_IDTR, IDT, 0xFFF, 0, 0)
        io = expect_io(g.run(), 0x11)
        cs, user_rip, gs_base = struct.unpack_from("<QQQ", ram, 0x5100)
        assert cs == 0x08 and gs_base == 0x5550000
        assert user_rip > symbols["user"] and io.header.execution_state.bits.cpl == 0
        rsp, interrupted_cs = get_registers(backend, g.vp, [R.HV_X64_REGISTER_RBX, R.HV_X64_REGISTER_RDX])
        assert interrupted_cs == 0x23 and 0xE000 - 0x40 <= rsp < 0xE000
        set_registers(backend, g.vp, {R.HV_X64_REGISTER_RIP: io.header.rip + io.header.instruction_length})
        fault = expect_io(g.run(), 0x12)   # iretq to user, then the not-present load
        rsp, interrupted_cs, error_code = get_registers(backend, g.vp, [R.HV_X64_REGISTER_RBX, R.HV_X64_REGISTER_RDX,
                                                                         R.HV_X64_REGISTER_RAX])
        assert interrupted_cs == 0x23 and 0xD000 - 0x40 <= rsp < 0xD000   # from CPL3, on IST1
        assert error_code == 0x4 and fault.header.execution_state.bits.cpl == 0   # U/S set, not present, a read
        cr2, = get_registers(backend, g.vp, [R.HV_X64_REGISTER_CR2])
        assert cr2 == 0x40000000
    finally:
        g.close()


def test_a_run_message_outlives_the_allocations_after_it(tmp_path: Path) -> None:
    """A run's message, and the payload expect_io returns, are still the message after
    the host allocates more (get_registers does).  The user-mode test above once
    resumed at a RIP read from a message already freed and reused by an allocation of
    its size: the guest ran at a garbage RIP (#GP, #DF through an empty IDT, a triple
    fault), or at a small one, about one run in five."""
    image, _ = assemble("out %al, $0x10\nout %al, $0x11\nhlt", tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)

    def reuse_freed_messages() -> None:
        fillers = [ffi.new("struct hv_message *") for _ in range(16)]   # freed blocks of that size are reused first
        for filler in fillers:
            ffi.memmove(filler, b"\xa5" * ffi.sizeof(filler[0]), ffi.sizeof(filler[0]))

    try:
        msg = g.run()
        seen = bytes(ffi.buffer(msg))
        reuse_freed_messages()
        assert bytes(ffi.buffer(msg)) == seen
        io = expect_io(msg, 0x10)
        advance(backend, g, io.header)
        io = expect_io(g.run(), 0x11)   # as the user-mode test does: the message itself is not kept
        reuse_freed_messages()
        assert (io.header.rip, io.header.instruction_length, io.port_number) == (ENTRY + 2, 2, 0x11)
    finally:
        g.close()


def test_a_stop_asked_for_by_an_mmio_store_does_not_replay_it() -> None:
    """An MMIO write whose device asks the engine to stop (the xAPIC does, when the
    write makes an interrupt deliverable): the stop comes after the instruction, which
    runs once.  Unicorn's own exit checks after each memory access restarted it."""
    import ctypes
    import mmap

    from mshvstack.backend.sim.engines.base import StopKind
    from mshvstack.backend.sim.engines.unicorn import UnicornEngine

    ram = mmap.mmap(-1, 0x8000)
    # Real mode at 0x1000: inc word [0x8000] (MMIO: read, then write) ; inc bx ; jmp 0x1000
    code = bytes.fromhex("ff060080") + bytes.fromhex("43") + bytes.fromhex("ebf9")
    ram[0x1000 : 0x1000 + len(code)] = code
    host = ctypes.addressof(ctypes.c_char.from_buffer(ram))

    class Code:
        def translate(self, linear: int) -> int | None:
            return linear

        def read_physical(self, gpa: int, size: int) -> bytes | None:
            return bytes(ram[gpa : gpa + size]) if gpa + size <= len(ram) else None

        def host_address(self, gpa: int) -> int | None:
            return host + gpa if gpa < len(ram) else None

    counter = [0]
    writes: list[int] = []
    engine = UnicornEngine(lambda insn: None, Code(), lambda vector: -1)

    def write(offset: int, size: int, value: int) -> None:
        writes.append(value)
        counter[0] = value
        if len(writes) % 3 == 0:
            engine.cancel()

    try:
        engine.map(0, len(ram), host, True, True)
        engine.map_mmio(0x8000, 0x1000, lambda offset, size: counter[0], write)
        engine.set_segment(lib.HV_X64_REGISTER_CS, 0, 0xFFFF, 0, 0x9B)
        for name in ("DS", "ES", "SS"):
            engine.set_segment(getattr(lib, f"HV_X64_REGISTER_{name}"), 0, 0xFFFF, 0, 0x93)
        engine.set_reg(lib.HV_X64_REGISTER_CR0, 0x10)
        engine.set_reg(lib.HV_X64_REGISTER_RFLAGS, 2)
        engine.set_reg(lib.HV_X64_REGISTER_RIP, 0x1000)
        for stop in range(1, 6):
            assert engine.run().kind is StopKind.CANCELLED
            assert writes == list(range(1, 3 * stop + 1))          # each increment once, none replayed
            assert engine.reg(lib.HV_X64_REGISTER_RBX) == 3 * stop  # the instruction after it ran too
    finally:
        engine.close()
