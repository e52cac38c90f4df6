"""Simulator features a VMM builds devices on: dirty logging, irqfd,
ioeventfd, host code patching, page faults, parallel VPs, rep semantics."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from guests import assemble
from simhelpers import Guest, advance, expect_io, get_registers, get_registers_call, hvcall, long_mode_guest, payload, set_property, set_registers

LAPIC = 1 << lib.MSHV_PT_BIT_LAPIC


def _guest(tmp_path: Path, source: str, vectors: tuple[int, ...] = ()) -> tuple[SimBackend, Guest]:
    image, symbols = assemble(source, tmp_path)
    backend = SimBackend()
    return backend, long_mode_guest(backend, image, {v: symbols[f"vector_{v:#x}"] for v in vectors}, LAPIC)


def _bitmap(backend: SimBackend, g: Guest, base: int, count: int, op: int, kind: int) -> int:
    bits = ffi.new("unsigned char[]", (count + 7) // 8)
    req = ffi.new("struct mshv_gpap_access_bitmap *")
    req.access_type, req.access_op, req.page_count, req.gpap_base = kind, op, count, base
    req.bitmap_ptr = int(ffi.cast("uintptr_t", bits))
    backend.ioctl(g.part, lib.MSHV_GET_GPAP_ACCESS_BITMAP, req)
    return int.from_bytes(bytes(ffi.buffer(bits)), "little")


def test_dirty_log_sees_guest_writes(tmp_path: Path) -> None:
    backend, g = _guest(tmp_path, "movl $1, 0xc000\nout %al, $0x10\nmovl $2, 0xd010\nmovl $3, 0xc004\nout %al, $0x11\nhlt")
    try:
        dirty, clear = lib.MSHV_GPAP_ACCESS_TYPE_DIRTY, lib.MSHV_GPAP_ACCESS_OP_CLEAR
        set_property(backend, g, lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1)
        _bitmap(backend, g, 0, 16, clear, dirty)  # start clean
        advance(backend, g, expect_io(g.run(), 0x10).header)
        assert _bitmap(backend, g, 0, 16, clear, dirty) == 1 << 0xC
        advance(backend, g, expect_io(g.run(), 0x11).header)
        assert _bitmap(backend, g, 0, 16, clear, dirty) == (1 << 0xC) | (1 << 0xD)
        assert _bitmap(backend, g, 0, 16, clear, dirty) == 0
        assert struct.unpack_from("<III", g.ram, 0xC000)[0] == 1 and g.ram[0xC004] == 3 and g.ram[0xD010] == 2
    finally:
        g.close()


def test_gpap_bitmap_validation() -> None:
    backend = SimBackend()
    g = Guest(backend)
    try:
        req = ffi.new("struct mshv_gpap_access_bitmap *")
        req.access_type, req.page_count, req.bitmap_ptr = 2, 1, 8
        with pytest.raises(ErrnoError) as info:
            backend.ioctl(g.part, lib.MSHV_GET_GPAP_ACCESS_BITMAP, req)
        assert info.value.errno == errno.EINVAL
        req.access_type, req.page_count = 0, 0
        with pytest.raises(ErrnoError):
            backend.ioctl(g.part, lib.MSHV_GET_GPAP_ACCESS_BITMAP, req)
    finally:
        g.close()


def _route(backend: SimBackend, g: Guest, gsi: int, vector: int, level: bool = False) -> None:
    raw = ffi.new("char[]", ffi.sizeof("struct mshv_user_irq_table") + ffi.sizeof("struct mshv_user_irq_entry"))
    table = ffi.cast("struct mshv_user_irq_table *", raw)
    table.nr = 1
    table.entries[0].gsi = gsi
    table.entries[0].address_lo = 0xFEE00000  # APIC id 0, physical
    table.entries[0].data = vector | (int(level) << 15)
    backend.ioctl(g.part, lib.MSHV_SET_MSI_ROUTING, table)


def test_irqfd_injects_routed_msi_and_resamples_on_eoi(tmp_path: Path) -> None:
    source = """
    sti
    hlt
    cli
    out %al, $0x11
    hlt
vector_0x44:
    out %al, $0x10
    mov $0x40000070, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
"""
    backend, g = _guest(tmp_path, source, (0x44,))
    efd, resample = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        _route(backend, g, 7, 0x44, level=True)
        irq = ffi.new("struct mshv_user_irqfd *")
        irq.fd, irq.resamplefd, irq.gsi, irq.flags = efd, resample, 7, 1 << lib.MSHV_IRQFD_BIT_RESAMPLE
        backend.ioctl(g.part, lib.MSHV_IRQFD, irq)
        threading.Timer(0.05, os.eventfd_write, args=(efd, 1)).start()
        advance(backend, g, expect_io(g.run(), 0x10).header)
        expect_io(g.run(), 0x11)
        assert os.eventfd_read(resample) == 1  # the guest's EOI resampled the level irqfd
    finally:
        g.close()
        os.close(efd)
        os.close(resample)


def test_ioeventfd_takes_matching_mmio_writes_without_exit(tmp_path: Path) -> None:
    source = "mov $0xd0000040, %rbx\nmovl $7, (%rbx)\nmovl $8, (%rbx)\nhlt"
    backend, g = _guest(tmp_path, source)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        io = ffi.new("struct mshv_user_ioeventfd *")
        io.fd, io.addr, io.len, io.datamatch = efd, 0xD0000040, 4, 7
        io.flags = 1 << lib.MSHV_IOEVENTFD_BIT_DATAMATCH
        backend.ioctl(g.part, lib.MSHV_IOEVENTFD, io)
        msg = g.run()  # the first write rang the doorbell; the second (8) exits
        assert msg.header.message_type == lib.HVMSG_UNMAPPED_GPA
        assert payload(msg, "struct hv_x64_memory_intercept_message").guest_physical_address == 0xD0000040
        assert os.eventfd_read(efd) == 1
    finally:
        g.close()
        os.close(efd)


def test_host_rewrite_of_guest_code_takes_effect(tmp_path: Path) -> None:
    backend, g = _guest(tmp_path, "mov $1, %eax\nout %eax, $0x10\njmp _start")
    try:
        io = expect_io(g.run(), 0x10)
        assert io.rax == 1
        g.ram[0x2001] = 2  # mov $2, %eax: patched through the host's mapping
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x2000})
        assert expect_io(g.run(), 0x10).rax == 2
    finally:
        g.close()


def test_page_fault_reaches_guest_with_error_code_and_cr2(tmp_path: Path) -> None:
    source = """
    movl $5, 0x40000123        /* not mapped by the page tables */
    hlt
vector_0xe:
    pop %rax                   /* error code */
    out %eax, $0x10
    mov %cr2, %rax
    out %eax, $0x11
    hlt
"""
    backend, g = _guest(tmp_path, source, (0xE,))
    try:
        io = expect_io(g.run(), 0x10)
        assert io.rax & 0xFF == 0b10  # not present, write, supervisor
        advance(backend, g, io.header)
        assert expect_io(g.run(), 0x11).rax & 0xFFFFFFFF == 0x40000123
    finally:
        g.close()


def test_vps_run_in_parallel_threads(tmp_path: Path) -> None:
    image, _ = assemble("mov $200000, %ecx\n1: dec %ecx\njnz 1b\nout %al, $0x10\nhlt", tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)
    try:
        vp = ffi.new("struct mshv_create_vp *")
        vp.vp_index = 1
        second = backend.ioctl(g.part, lib.MSHV_CREATE_VP, vp)
        for fd in (second,):
            for name in ("CR3", "CR4", "EFER", "CR0", "RIP", "RSP", "RFLAGS"):
                value, = get_registers(backend, g.vp, [getattr(lib, f"HV_X64_REGISTER_{name}")])
                set_registers(backend, fd, {getattr(lib, f"HV_X64_REGISTER_{name}"): value})
        results: dict[int, int] = {}

        def run(fd: int) -> None:
            run_arg = ffi.new("struct mshv_run_vp *")
            backend.ioctl(fd, lib.MSHV_RUN_VP, run_arg)
            msg = ffi.cast("struct hv_message *", run_arg)
            results[fd] = payload(msg, "struct hv_x64_io_port_intercept_message").header.vp_index

        threads = [threading.Thread(target=run, args=(fd,)) for fd in (g.vp, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == {g.vp: 0, second: 1}
        backend.close(second)
    finally:
        g.close()


def test_partial_reps_report_progress() -> None:
    backend = SimBackend()
    g = Guest(backend)
    try:
        names = [lib.HV_X64_REGISTER_RAX, lib.HV_X64_REGISTER_RBX, lib.HV_X64_REGISTER_RCX]
        backend.faults.partial_reps(lib.HVCALL_GET_VP_REGISTERS, completed=1)
        call, _keep = get_registers_call(names)
        with pytest.raises(ErrnoError):
            backend.ioctl(g.vp, lib.MSHV_ROOT_HVCALL, call)
        assert (call.reps, call.status) == (1, lib.HV_STATUS_TIME_OUT)
        backend.faults.fail_hvcall(lib.HVCALL_GET_VP_REGISTERS, lib.HV_STATUS_ACCESS_DENIED, times=1)
        call, _keep = get_registers_call(names)
        with pytest.raises(ErrnoError) as info:
            backend.ioctl(g.vp, lib.MSHV_ROOT_HVCALL, call)
        assert info.value.errno == errno.EIO and call.status == lib.HV_STATUS_ACCESS_DENIED
    finally:
        g.close()


def test_output_copied_on_failure_only_under_6_15() -> None:
    for profile, copied in (("6.15", True), ("newest", False)):
        backend = SimBackend(profile=profile)
        g = Guest(backend)
        try:
            backend.faults.fail_hvcall(lib.HVCALL_GET_PARTITION_PROPERTY, lib.HV_STATUS_ACCESS_DENIED)
            inp = ffi.new("struct hv_input_get_partition_property *")
            out = ffi.new("struct hv_output_get_partition_property *")
            out.property_value = 0xAA
            with pytest.raises(ErrnoError):
                hvcall(backend, g.part, lib.HVCALL_GET_PARTITION_PROPERTY, inp, out)
            assert (out.property_value != 0xAA) == copied
        finally:
            g.close()


def test_vp_cpuid_values_and_gpa_access() -> None:
    backend = SimBackend(profile="azure")
    g = Guest(backend)
    try:
        raw = ffi.new("char[]", ffi.sizeof("struct hv_input_get_vp_cpuid_values") + ffi.sizeof("struct hv_cpuid_leaf_info"))
        inp = ffi.cast("struct hv_input_get_vp_cpuid_values *", raw)
        inp.cpuid_leaf_info[0].eax = 0x40000000
        out = ffi.new("union hv_output_get_vp_cpuid_values *")
        hvcall(backend, g.vp, lib.HVCALL_GET_VP_CPUID_VALUES, raw, out, reps=1, in_size=len(ffi.buffer(raw)))
        assert struct.pack("<III", out.ebx, out.ecx, out.edx) == b"Microsoft Hv"
        w = ffi.new("struct hv_input_write_gpa *")
        w.base_gpa, w.byte_count = 0x1230, 4
        ffi.memmove(w.data, b"\x01\x02\x03\x04", 4)
        hvcall(backend, g.vp, lib.HVCALL_WRITE_GPA, w, ffi.new("struct hv_output_write_gpa *"))
        assert bytes(g.ram[0x1230:0x1234]) == b"\x01\x02\x03\x04"
        r = ffi.new("struct hv_input_read_gpa *")
        r.base_gpa, r.byte_count = 0x1231, 2
        rout = ffi.new("struct hv_output_read_gpa *")
        hvcall(backend, g.vp, lib.HVCALL_READ_GPA, r, rout)
        assert bytes(rout.data)[:2] == b"\x02\x03"
        r.base_gpa = 0x80000000
        hvcall(backend, g.vp, lib.HVCALL_READ_GPA, r, rout)
        assert rout.access_result.result_code == lib.HV_ACCESS_GPA_UNMAPPED
    finally:
        g.close()


# (opcode bytes, port, size, write, string, rep) for every port-I/O form in real mode
_IO_FORMS = st.sampled_from([
    ("e4{port:02x}", True, 1, False, False, False), ("e5{port:02x}", True, 2, False, False, False),
    ("e6{port:02x}", True, 1, True, False, False), ("e7{port:02x}", True, 2, True, False, False),
    ("66e7{port:02x}", True, 4, True, False, False), ("ec", False, 1, False, False, False),
    ("ed", False, 2, False, False, False), ("ee", False, 1, True, False, False), ("66ef", False, 4, True, False, False),
    ("6c", False, 1, False, True, False), ("f36e", False, 1, True, True, True), ("f366 6f".replace(" ", ""), False, 4, True, True, True),
])


@settings(max_examples=40, deadline=None)
@given(form=_IO_FORMS, port=st.integers(0, 0xFF), dx=st.integers(0, 0xFFFF), rax=st.integers(0, 0xFFFF))
def test_io_intercept_encoding(form: tuple[str, bool, int, bool, bool, bool], port: int, dx: int, rax: int) -> None:
    template, immediate, size, write, string, rep = form
    code = bytes.fromhex(template.format(port=port))
    backend = SimBackend()
    g = Guest(backend, ram_size=0x4000)
    try:
        g.ram[0x1000 : 0x1000 + len(code)] = code
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RDX: dx,
                                      lib.HV_X64_REGISTER_RAX: rax, lib.HV_X64_REGISTER_RFLAGS: 2,
                                      lib.HV_X64_REGISTER_RCX: 3})
        msg = g.run()
        io = expect_io(msg, port if immediate else dx)
        assert io.header.instruction_length == len(code) == io.instruction_byte_count
        assert bytes(io.instruction_bytes)[: len(code)] == code
        assert io.access_info.bits.access_size == size
        assert io.access_info.bits.string_op == string and io.access_info.bits.rep_prefix == rep
        assert io.header.intercept_access_type == (lib.HV_INTERCEPT_ACCESS_WRITE if write else lib.HV_INTERCEPT_ACCESS_READ)
        assert io.rax == rax and io.header.rip == 0x1000 and io.rcx == 3
    finally:
        g.close()


def test_consecutive_page_faults_each_reach_the_guest(tmp_path: Path) -> None:
    """A handled exception must not turn the next one into a double fault."""
    source = """
    movl $1, 0x200000          /* PD0[1] not present: #PF, the handler maps it */
    out %al, $0x10
    movl $3, 0x400000          /* PD0[2]: a second #PF */
    out %al, $0x11
    ud2                        /* and a #UD after them */
    hlt
vector_0xe:
    pop %rax
    mov %cr2, %rax
    shr $21, %rax
    mov %rax, %rbx
    shl $21, %rbx
    or $0x83, %rbx
    mov %rbx, 0xA000(,%rax,8)
    out %al, $0x20
    iretq
vector_0x6:
    out %al, $0x21
    hlt
"""
    backend, g = _guest(tmp_path, source, (0xE, 0x6))
    try:
        extra = mmap.mmap(-1, 0x600000)
        region = ffi.new("struct mshv_user_mem_region *")
        region.size, region.guest_pfn, region.flags = 0x5F0000, 0x10, 3
        region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(extra))) + 0x10000
        backend.ioctl(g.part, lib.MSHV_SET_GUEST_MEMORY, region)
        for port in (0x20, 0x10, 0x20, 0x11, 0x21):
            advance(backend, g, expect_io(g.run(), port).header)
    finally:
        g.close()


def test_guest_enters_long_mode_itself_and_runs_high_half_code(tmp_path: Path) -> None:
    """32-bit protected mode → paging + EFER.LME → far jump to 64-bit code mapped
    at a high virtual address; port I/O there still exits at the instruction."""
    source = """
    .code32
    mov $0x8000, %eax          /* PML4 */
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax             /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax            /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax       /* PG */
    mov %eax, %cr0
    ljmp $0x08, $long64
    .code64
long64:
    movabs $high, %rax
    jmp *%rax
high:
    out %al, $0x10
    hlt
"""
    image, symbols = assemble(source, tmp_path, bits=32)
    backend = SimBackend()
    g = long_mode_guest(backend, image, pt_flags=LAPIC)
    try:
        # Also map the code at -2 GiB: PML4[511] -> PDPT2, PDPT2[510] -> PD0 (identity 2 MiB page).
        struct.pack_into("<Q", g.ram, 0x8000 + 511 * 8, 0xC000 | 3)
        struct.pack_into("<Q", g.ram, 0xC000 + 510 * 8, 0xA000 | 3)
        high = symbols["high"] - 0x2000 + 0xFFFFFFFF80002000
        struct.pack_into("<Q", g.ram, 0x2000 + (symbols["long64"] - 0x2000) + 2, high)  # patch movabs target
        from simhelpers import set_segment
        set_segment(backend, g.vp, lib.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, 0x18, 0xC09B)  # 32-bit code
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_CR0: 0x11, lib.HV_X64_REGISTER_EFER: 0,
                                      lib.HV_X64_REGISTER_CR4: 0, lib.HV_X64_REGISTER_RIP: 0x2000})
        struct.pack_into("<QQQQ", g.ram, 0x4000, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF)
        set_segment(backend, g.vp, lib.HV_X64_REGISTER_GDTR, 0x4000, 31, 0, 0)
        io = expect_io(g.run(), 0x10)
        assert io.header.rip == high and io.header.execution_state.bits.efer_lma
        assert io.header.cs_segment.selector == 0x08
    finally:
        g.close()


def test_hypercall_page_overlay_while_low_memory_is_unmapped(tmp_path: Path) -> None:
    """Linux enables the hypercall page at a GPA its page tables do not map at that
    linear address; refreshing translated code must not fault the guest."""
    source = """
    movabs $0xffffffff80000000, %rbx
    lea high(%rip), %rax
    add %rbx, %rax
    jmp *%rax
high:
    movq $0, 0x8000(%rbx)      /* drop the identity map (PML4[0]) */
    mov %cr3, %rax
    mov %rax, %cr3
    mov $0x40000000, %ecx      /* guest OS ID */
    mov $1, %eax
    mov $0x81000000, %edx
    wrmsr
    mov $0x40000001, %ecx      /* hypercall page at GPA 0x5000 */
    mov $0x5001, %eax
    xor %edx, %edx
    wrmsr
    out %al, $0x10
    hlt
"""
    image, _ = assemble(source, tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image, pt_flags=LAPIC)
    try:
        struct.pack_into("<Q", g.ram, 0x8000 + 511 * 8, 0xC000 | 3)   # -2 GiB -> PDPT2
        struct.pack_into("<Q", g.ram, 0xC000 + 510 * 8, 0xA000 | 3)   # PDPT2[510] -> PD0 (0-2 MiB)
        io = expect_io(g.run(), 0x10)
        assert io.header.rip >= 0xFFFFFFFF80000000
        assert g.ram[0x5000:0x5010] != bytes(16), "the hypercall page was not written"
    finally:
        g.close()


def test_a_page_written_at_full_speed_is_tracked_once_protected_again() -> None:
    """Stores to plain RAM bypass the engine's fault hooks (the TLB makes them plain host
    stores); protecting the page again, here a whole one-page region (no region split
    inside Unicorn), must bring its stores back to the dirty log."""
    # Real mode, DS based at the one-page region: mov byte [0],1 ; out 0x10,al ; mov byte [0],2 ; out 0x11,al ; hlt
    code = bytes.fromhex("c606000001" "e610" "c606000002" "e611" "f4")
    backend = SimBackend()
    g = Guest(backend)
    page = mmap.mmap(-1, 0x1000)
    try:
        g.ram[0x1000 : 0x1000 + len(code)] = code
        region = ffi.new("struct mshv_user_mem_region *")
        region.size, region.guest_pfn = 0x1000, 0x20
        region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(page)))
        region.flags = (1 << lib.MSHV_SET_MEM_BIT_WRITABLE) | (1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE)
        backend.ioctl(g.part, lib.MSHV_SET_GUEST_MEMORY, region)
        from simhelpers import set_segment
        set_segment(backend, g.vp, lib.HV_X64_REGISTER_DS, 0x20000, 0xFFFF, 0x2000, 0x93)
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RFLAGS: 2})
        advance(backend, g, expect_io(g.run(), 0x10).header)   # the first store, untracked: a fast TLB entry
        assert page[0] == 1
        dirty, clear = lib.MSHV_GPAP_ACCESS_TYPE_DIRTY, lib.MSHV_GPAP_ACCESS_OP_CLEAR
        set_property(backend, g, lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1)
        _bitmap(backend, g, 0x20, 1, clear, dirty)   # start clean: the page is write-protected
        expect_io(g.run(), 0x11)
        assert page[0] == 2
        assert _bitmap(backend, g, 0x20, 1, clear, dirty) == 1
    finally:
        g.close()
        page.close()
