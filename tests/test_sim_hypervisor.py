"""Guest-facing hypervisor behaviour on the simulator: intercepts, LAPIC,
SynIC, register page, translation, faults.  Each guest is a short assembly
snippet assembled with binutils at test time."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from guests import assemble
from simhelpers import PD3, Guest, advance, expect_io, get_registers, hvcall, install_intercept, long_mode_guest, payload, set_property, set_registers

LAPIC = 1 << lib.MSHV_PT_BIT_LAPIC


def _guest(tmp_path: Path, source: str, vectors: tuple[int, ...] = (), pt_flags: int = LAPIC) -> tuple[SimBackend, Guest, dict[str, int]]:
    image, symbols = assemble(source, tmp_path)
    backend = SimBackend()
    gates = {v: symbols[f"vector_{v:#x}"] for v in vectors}
    return backend, long_mode_guest(backend, image, gates, pt_flags), symbols


def test_register_page_is_live_and_writable(tmp_path: Path) -> None:
    backend, g, _ = _guest(tmp_path, "mov $0x1111, %eax\nout %eax, $0x10\nout %eax, $0x11\nhlt")
    try:
        page_mem = backend.mmap(g.vp, 4096, lib.MSHV_VP_MMAP_OFFSET_REGISTERS * 4096)
        page = ffi.from_buffer("struct hv_vp_register_page *", page_mem)
        io = expect_io(g.run(), 0x10)
        assert page.isvalid == 1
        assert (page.rax, page.rip) == (0x1111, io.header.rip)
        assert page.cs.selector == 0x08 and page.efer & (1 << 10)
        intercept = ffi.from_buffer("struct hv_message *", backend.mmap(g.vp, 4096, 4096))
        assert intercept.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT
        # Emulate through the page: new RAX and RIP, marked dirty.
        page.rax = 0x2222
        page.rip = io.header.rip + io.header.instruction_length
        page.dirty = (1 << lib.HV_X64_REGISTER_CLASS_GENERAL) | (1 << lib.HV_X64_REGISTER_CLASS_IP)
        io = expect_io(g.run(), 0x11)
        assert io.rax == 0x2222
        # Without the dirty bit, a page write is ignored.
        page.rax = 0x3333
        advance(backend, g, io.header)
        assert g.run().header.message_type == lib.HVMSG_X64_HALT
        assert get_registers(backend, g.vp, [lib.HV_X64_REGISTER_RAX]) == [0x2222]
    finally:
        g.close()


X2APIC_ON = """
    mov $0x1b, %ecx
    rdmsr
    or $0xc00, %eax            /* APIC global enable + x2APIC */
    wrmsr
"""


def test_lapic_timer_eoi_and_self_ipi(tmp_path: Path) -> None:
    source = X2APIC_ON + """
    mov $0x832, %ecx           /* LVT timer: vector 0x40, one-shot */
    mov $0x40, %eax
    xor %edx, %edx
    wrmsr
    mov $0x83e, %ecx           /* divide by 1 */
    mov $0xb, %eax
    wrmsr
    mov $0x838, %ecx           /* initial count: 1 ms at 1 GHz */
    mov $1000000, %eax
    wrmsr
    sti
    hlt
    out %al, $0x21
    mov $0x830, %ecx           /* ICR: self IPI, vector 0x41 */
    mov $0x40041, %eax
    xor %edx, %edx
    wrmsr
    nop
    nop
    cli
    out %al, $0x23
    hlt
vector_0x40:
    out %al, $0x20
    mov $0x80b, %ecx           /* x2APIC EOI */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
vector_0x41:
    out %al, $0x22
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
"""
    backend, g, _ = _guest(tmp_path, source, (0x40, 0x41))
    try:
        start = time.monotonic()
        for port in (0x20, 0x21, 0x22, 0x23):
            io = expect_io(g.run(), port)
            advance(backend, g, io.header)
        assert time.monotonic() - start >= 0.001
        assert g.run().header.message_type == lib.HVMSG_X64_HALT
        assert g.backend.vp_of(g.vp).lapic.isr == 0  # both EOIs taken
    finally:
        g.close()


def test_xapic_self_ipi_is_taken_once_after_the_store(tmp_path: Path) -> None:
    """A store to the xAPIC ICR makes an interrupt deliverable mid-block: the CPU
    must not replay the store or the instructions before it, must take the
    interrupt exactly once, and soon (the guest spins with IF=1 until it has)."""
    source = """
    xor %r12d, %r12d
    xor %r13d, %r13d
    mov $0xfee00000, %ebx      /* xAPIC page */
    sti
    jmp 1f
1:
    inc %r13d                  /* same block as the store: counts replays */
    movl $0x40041, 0x300(%rbx) /* ICR: self IPI, vector 0x41 */
2:
    test %r12d, %r12d
    jz 2b
    cli
    mov %r13d, %eax
    out %eax, $0x11
    mov %r12d, %eax
    out %eax, $0x10
    hlt
vector_0x41:
    inc %r12d
    movl $0, 0xb0(%rbx)        /* EOI */
    iretq
"""
    backend, g, _ = _guest(tmp_path, source, (0x41,))
    watchdog = threading.Timer(10, backend.kick, (g.vp,))  # a stop that never comes fails instead of hanging
    watchdog.start()
    try:
        struct.pack_into("<Q", g.ram, PD3 + 0x1F7 * 8, 0xFEE00000 | 0x83)  # map the xAPIC page
        replays = expect_io(g.run(), 0x11)
        assert replays.rax == 1
        advance(backend, g, replays.header)
        assert expect_io(g.run(), 0x10).rax == 1
        assert backend.vp_of(g.vp).lapic.isr == 0
    finally:
        watchdog.cancel()
        g.close()


def test_assert_virtual_interrupt_wakes_halted_vp(tmp_path: Path) -> None:
    source = "sti\nhlt\ncli\nout %al, $0x11\nhlt\nvector_0x30:\nout %al, $0x10\niretq"
    backend, g, _ = _guest(tmp_path, source, (0x30,))
    try:
        def fire() -> None:
            inp = ffi.new("struct hv_input_assert_virtual_interrupt *")
            inp.control.bits.interrupt_type = lib.HV_X64_INTERRUPT_TYPE_FIXED
            inp.vector, inp.dest_addr = 0x30, 0
            hvcall(backend, g.part, lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp)
        threading.Timer(0.05, fire).start()
        io = expect_io(g.run(), 0x10)
        advance(backend, g, io.header)
        expect_io(g.run(), 0x11)
        bad = ffi.new("struct hv_input_assert_virtual_interrupt *")
        bad.vector = 3  # below 16: not a valid fixed vector
        with pytest.raises(ErrnoError):
            hvcall(backend, g.part, lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT, bad)
    finally:
        g.close()


SYNIC_ON = """
    mov $0x40000083, %ecx      /* SIMP at 0x7000 */
    mov $0x7001, %eax
    xor %edx, %edx
    wrmsr
    mov $0x40000082, %ecx      /* SIEFP at 0x6000 */
    mov $0x6001, %eax
    wrmsr
    mov $0x40000093, %ecx      /* SINT3 -> vector 0x51 */
    mov $0x51, %eax
    wrmsr
    mov $0x40000080, %ecx      /* SCONTROL */
    mov $1, %eax
    wrmsr
"""


def _signal(backend: SimBackend, g: Guest, sint: int, flag: int) -> int:
    inp = ffi.new("struct hv_input_signal_event_direct *")
    inp.target_vp, inp.target_sint, inp.flag_number = 0, sint, flag
    out = ffi.new("struct hv_output_signal_event_direct *")
    hvcall(backend, g.part, lib.HVCALL_SIGNAL_EVENT_DIRECT, inp, out)
    return int(out.newly_signaled)


def test_signal_event_direct_sets_flag_and_interrupts(tmp_path: Path) -> None:
    source = SYNIC_ON + """
    out %al, $0x10
    sti
    hlt
    cli
    hlt
vector_0x51:
    mov 0x6300, %eax           /* SINT3 event flags, first dword */
    out %eax, $0x11
    iretq
"""
    backend, g, _ = _guest(tmp_path, source, (0x51,))
    try:
        advance(backend, g, expect_io(g.run(), 0x10).header)
        assert _signal(backend, g, 3, 5) == 1
        assert _signal(backend, g, 3, 5) == 0  # already set: not newly signalled
        io = expect_io(g.run(), 0x11)
        assert io.rax & 0xFFFFFFFF == 1 << 5
    finally:
        g.close()


def test_auto_eoi_sint_leaves_nothing_in_service(tmp_path: Path) -> None:
    """Linux sets AUTO_EOI on the VMBus SINT and never EOIs its vector: a lower
    vector must still get through after the handler returns (found by hv_vmbus)."""
    source = SYNIC_ON.replace("mov $0x51, %eax", "mov $0x200f3, %eax   /* vector 0xf3, auto-EOI */") + """
    out %al, $0x13
    sti
    hlt
    nop
    cli
    out %al, $0x12             /* only if vector 0x30 stayed blocked */
    hlt
vector_0xf3:
    out %al, $0x10
    iretq
vector_0x30:
    out %al, $0x11
    hlt
"""
    backend, g, _ = _guest(tmp_path, source, (0xF3, 0x30))
    try:
        advance(backend, g, expect_io(g.run(), 0x13).header)
        inp = ffi.new("struct hv_input_assert_virtual_interrupt *")
        inp.control.bits.interrupt_type = lib.HV_X64_INTERRUPT_TYPE_FIXED
        inp.vector = 0x30
        hvcall(backend, g.part, lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp)
        assert _signal(backend, g, 3, 1) == 1
        advance(backend, g, expect_io(g.run(), 0x10).header)   # the SINT's vector first (higher priority)
        expect_io(g.run(), 0x11)
    finally:
        g.close()


def _post(backend: SimBackend, g: Guest, sint: int, message_type: int) -> int:
    inp = ffi.new("struct hv_input_post_message_direct *")
    inp.vp_index, inp.sint_index = 0, sint
    msg = ffi.cast("struct hv_message *", inp.message)
    msg.header.message_type, msg.header.payload_size = message_type, 8
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.in_sz, call.in_ptr = lib.HVCALL_POST_MESSAGE_DIRECT, ffi.sizeof(inp[0]), int(ffi.cast("uintptr_t", inp))
    try:
        backend.ioctl(g.part, lib.MSHV_ROOT_HVCALL, call)
    except ErrnoError:
        pass
    return int(call.status)


def test_busy_slot_then_deliverability_notification(tmp_path: Path) -> None:
    source = SYNIC_ON + """
    out %al, $0x10
    movl $0, 0x7300            /* consume SINT3's message */
    mov $0x40000084, %ecx      /* EOM */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    out %al, $0x11
    hlt
"""
    backend, g, _ = _guest(tmp_path, source)
    try:
        advance(backend, g, expect_io(g.run(), 0x10).header)
        assert _post(backend, g, 3, 0x10) == lib.HV_STATUS_SUCCESS
        assert _post(backend, g, 3, 0x11) == lib.HV_STATUS_INSUFFICIENT_BUFFERS
        assert g.ram[0x7300 + 5] & 1  # msg_pending set for the guest
        notify = ffi.new("union hv_deliverability_notifications_register *")
        notify.bits.sints = 1 << 3
        set_registers(backend, g.vp, {lib.HV_REGISTER_DELIVERABILITY_NOTIFICATIONS: int(notify.as_uint64)})
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_SYNIC_SINT_DELIVERABLE
        assert payload(msg, "struct hv_x64_sint_deliverable_message").deliverable_sints == 1 << 3
        assert _post(backend, g, 3, 0x11) == lib.HV_STATUS_SUCCESS
        expect_io(g.run(), 0x11)
    finally:
        g.close()


HYPERCALL_SETUP = """
    mov $0x40000000, %ecx
    mov $1, %eax
    mov $0x81000000, %edx
    wrmsr
    mov $0x40000001, %ecx
    mov $0x5001, %eax
    xor %edx, %edx
    wrmsr
"""


def test_hypercall_intercept_reaches_the_vmm(tmp_path: Path) -> None:
    source = HYPERCALL_SETUP + """
    mov $0x5c, %ecx
    mov $0x6000, %edx
    xor %r8d, %r8d
    mov $0x5000, %rax
    call *%rax
    out %eax, $0x10
    hlt
"""
    backend, g, _ = _guest(tmp_path, source)
    try:
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_HYPERCALL)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_HYPERCALL_INTERCEPT
        hc = payload(msg, "struct hv_x64_hypercall_intercept_message")
        assert (hc.rcx & 0xFFFF, hc.rdx) == (lib.HVCALL_POST_MESSAGE, 0x6000)
        assert hc.header.rip == 0x5000
        # The VMM completes the call: status in RAX, RIP past the vmcall.
        advance(backend, g, hc.header, rax=lib.HV_STATUS_SUCCESS)
        io = expect_io(g.run(), 0x10)
        assert io.rax == lib.HV_STATUS_SUCCESS
    finally:
        g.close()


def test_cpuid_intercept_and_registered_result(tmp_path: Path) -> None:
    source = """
    mov $0x40000000, %eax
    cpuid
    out %eax, $0x10
    mov %ebx, %eax
    out %eax, $0x11
    mov $0x1234, %eax
    cpuid
    hlt
"""
    backend, g, _ = _guest(tmp_path, source)
    try:
        result = ffi.new("struct hv_input_register_intercept_result *")
        result.intercept_type = lib.HV_INTERCEPT_TYPE_X64_CPUID
        cpuid = result.parameters.cpuid
        cpuid.input.eax = 0x40000000
        cpuid.result.ebx, cpuid.result.ebx_mask = 0x41414141, 0xFFFFFFFF
        hvcall(backend, g.part, lib.HVCALL_REGISTER_INTERCEPT_RESULT, result)
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_X64_CPUID, parameter=0x1234)
        io = expect_io(g.run(), 0x10)
        assert io.rax & 0xFFFFFFFF == 0x40000006  # max Hyper-V leaf
        advance(backend, g, io.header)
        io = expect_io(g.run(), 0x11)
        assert io.rax & 0xFFFFFFFF == 0x41414141
        advance(backend, g, io.header)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_X64_CPUID_INTERCEPT
        assert payload(msg, "struct hv_x64_cpuid_intercept_message").rax == 0x1234
    finally:
        g.close()


def test_native_msrs_run_in_the_engine_until_intercepted(tmp_path: Path) -> None:
    """FS_BASE is the engine's own (Linux writes it at every context switch): it runs
    without a stop, until the VMM intercepts it, from then on even where it ran before."""
    source = """
    mov $0xC0000100, %ecx
    mov $0x1234, %eax
    xor %edx, %edx
    wrmsr
    rdmsr
    out %eax, $0x10
    mov $0x5678, %eax
    wrmsr
    rdmsr
    out %eax, $0x11
    jmp 0b
"""
    source = source.replace("    mov $0xC0000100, %ecx", "0:  mov $0xC0000100, %ecx", 1)
    backend, g, _ = _guest(tmp_path, source)
    try:
        io = expect_io(g.run(), 0x10)
        assert io.rax & 0xFFFFFFFF == 0x1234
        advance(backend, g, io.header)
        io = expect_io(g.run(), 0x11)
        assert io.rax & 0xFFFFFFFF == 0x5678
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_X64_MSR_INDEX, lib.HV_INTERCEPT_ACCESS_MASK_WRITE, 0xC0000100)
        advance(backend, g, io.header)
        msg = g.run()   # the first WRMSR again, now intercepted
        assert msg.header.message_type == lib.HVMSG_X64_MSR_INTERCEPT
        intercept = payload(msg, "struct hv_x64_msr_intercept_message")
        assert (intercept.msr_number, intercept.rax & 0xFFFFFFFF) == (0xC0000100, 0x1234)
    finally:
        g.close()


def test_unknown_msr_faults_or_reads_zero(tmp_path: Path) -> None:
    source = """
    mov $0x12345, %ecx
    rdmsr
    out %eax, $0x10
    hlt
vector_0xd:
    out %al, $0x11
    hlt
"""
    backend, g, _ = _guest(tmp_path, source, (0xD,))
    try:
        expect_io(g.run(), 0x11)  # #GP delivered through the guest's IDT
    finally:
        g.close()
    backend, g, _ = _guest(tmp_path, source, (0xD,))
    try:
        set_property(backend, g, lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION,
                     lib.HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO)
        assert expect_io(g.run(), 0x10).rax == 0
    finally:
        g.close()


def test_frequency_msrs_report_the_guest_tsc_rate(tmp_path: Path) -> None:
    """Linux reads these instead of calibrating the TSC against a PIT."""
    from mshvstack.backend.sim.lapic import TIMER_HZ

    source = """
    mov $0x40000003, %eax
    cpuid
    out %eax, $0x10
    mov %edx, %eax
    out %eax, $0x11
    mov $0x40000022, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    out %eax, $0x12
    mov $0x40000023, %ecx
    rdmsr
    out %eax, $0x13
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %rbx
    out %al, $0x14
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %rbx, %rax
    out %eax, $0x15
    hlt
"""
    backend, g, _ = _guest(tmp_path, source)
    try:
        privileges = expect_io(g.run(), 0x10)
        assert privileges.rax & lib.HV_ACCESS_FREQUENCY_MSRS
        advance(backend, g, privileges.header)
        features = expect_io(g.run(), 0x11)
        assert features.rax & lib.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE
        advance(backend, g, features.header)
        tsc_io = expect_io(g.run(), 0x12)
        advance(backend, g, tsc_io.header)
        tsc_hz = get_registers(backend, g.vp, [lib.HV_X64_REGISTER_RAX])[0]
        apic = expect_io(g.run(), 0x13)
        assert apic.rax == TIMER_HZ
        advance(backend, g, apic.header)
        advance(backend, g, expect_io(g.run(), 0x14).header)
        started = time.monotonic()
        time.sleep(0.2)
        elapsed_io = expect_io(g.run(), 0x15)
        seconds = time.monotonic() - started
        measured = get_registers(backend, g.vp, [lib.HV_X64_REGISTER_RAX])[0] / seconds
        assert 0.7 < measured / tsc_hz < 1.3, (measured, tsc_hz)
        advance(backend, g, elapsed_io.header)
    finally:
        g.close()


def test_msr_intercept(tmp_path: Path) -> None:
    source = "mov $0x12345, %ecx\nmov $7, %eax\nmov $9, %edx\nwrmsr\nhlt"
    backend, g, _ = _guest(tmp_path, source)
    try:
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_X64_MSR_INDEX, lib.HV_INTERCEPT_ACCESS_MASK_WRITE, 0x12345)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_X64_MSR_INTERCEPT
        m = payload(msg, "struct hv_x64_msr_intercept_message")
        assert (m.msr_number, m.rax, m.rdx) == (0x12345, 7, 9)
        assert m.header.intercept_access_type == lib.HV_INTERCEPT_ACCESS_WRITE
    finally:
        g.close()


def test_exception_intercept_and_triple_fault(tmp_path: Path) -> None:
    setup = "".join(f"mov ${0x1100 + i:#x}, %r{i}\n" for i in range(8, 16))
    backend, g, symbols = _guest(tmp_path, setup + "mov $0x5555, %rsi\nfault: ud2\nhlt")
    try:
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_EXCEPTION, parameter=6)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_X64_EXCEPTION_INTERCEPT
        m = payload(msg, "struct hv_x64_exception_intercept_message")
        assert m.exception_vector == 6 and m.header.rip == symbols["fault"]
        # Every field the hypervisor defines: all sixteen GPRs, DS and SS, the instruction.
        assert [getattr(m, f"r{i}") for i in range(8, 16)] == [0x1100 + i for i in range(8, 16)] and m.rsi == 0x5555
        assert m.ds_segment.selector == 0x10 and m.ss_segment.selector == 0x10 and m.ss_segment.attributes
        assert m.instruction_byte_count >= 2 and bytes(m.instruction_bytes)[:2] == b"\x0f\x0b"
        assert not m.exception_info.bits.error_code_valid   # #UD pushes none
    finally:
        g.close()
    backend, g, _ = _guest(tmp_path, "ud2\nhlt")  # no IDT: #UD -> #DF -> shutdown
    try:
        assert g.run().header.message_type == lib.HVMSG_UNRECOVERABLE_EXCEPTION
    finally:
        g.close()


def test_intercepted_page_fault_carries_its_error_code_and_address(tmp_path: Path) -> None:
    """A not-present write from CPL0: #PF with error code 2 (W, not P) and the address."""
    backend, g, symbols = _guest(tmp_path, "fault: movl $1, 0x40000000\nhlt")
    try:
        install_intercept(backend, g, lib.HV_INTERCEPT_TYPE_EXCEPTION, parameter=14)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_X64_EXCEPTION_INTERCEPT
        m = payload(msg, "struct hv_x64_exception_intercept_message")
        assert m.exception_vector == 14 and m.header.rip == symbols["fault"]
        assert m.exception_info.bits.error_code_valid and m.error_code == 2
        assert m.exception_parameter == 0x40000000
    finally:
        g.close()


def test_translate_virtual_address(tmp_path: Path) -> None:
    backend, g, _ = _guest(tmp_path, "hlt")
    try:
        g.run()
        results = {}
        for gva in (0x2000, 0xD0000000 + 0x5000, 0x40000000):
            inp = ffi.new("struct hv_input_translate_virtual_address *")
            inp.vp_index, inp.gva_page = 0, gva >> 12
            inp.control_flags = lib.HV_TRANSLATE_GVA_VALIDATE_READ
            out = ffi.new("struct hv_output_translate_virtual_address *")
            hvcall(backend, g.part, lib.HVCALL_TRANSLATE_VIRTUAL_ADDRESS, inp, out)
            results[gva] = (int(out.translation_result.bits.result_code), int(out.gpa_page))
        assert results[0x2000] == (lib.HV_TRANSLATE_GVA_SUCCESS, 2)
        assert results[0xD0005000] == (lib.HV_TRANSLATE_GVA_SUCCESS, 0xD0005)
        assert results[0x40000000][0] == lib.HV_TRANSLATE_GVA_PAGE_NOT_PRESENT
    finally:
        g.close()


def test_real_mode_interrupt_through_the_ivt() -> None:
    backend = SimBackend()
    g = Guest(backend, pt_flags=LAPIC)
    try:
        # IVT[0x20] -> 0000:0x1100 ; code at 0x1000: sti; hlt; out 0x11; hlt
        struct.pack_into("<HH", g.ram, 0x20 * 4, 0x1100, 0)
        g.ram[0x1000:0x1006] = bytes.fromhex("fbf4e611f4f4")
        g.ram[0x1100:0x1103] = bytes.fromhex("e610cf")  # out 0x10; iret
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RSP: 0x8000,
                                      lib.HV_X64_REGISTER_RFLAGS: 2})
        inp = ffi.new("struct hv_input_assert_virtual_interrupt *")
        inp.vector = 0x20
        hvcall(backend, g.part, lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp)
        advance(backend, g, expect_io(g.run(), 0x10).header)
        expect_io(g.run(), 0x11)
    finally:
        g.close()


def test_write_to_read_only_memory_is_a_gpa_intercept(tmp_path: Path) -> None:
    import mmap
    backend, g, _ = _guest(tmp_path, "mov $0x10000, %rbx\nmovl $5, (%rbx)\nhlt")
    rom = mmap.mmap(-1, 0x1000)
    try:
        # A read-only region (no WRITABLE flag) right after the guest's RAM.
        region = ffi.new("struct mshv_user_mem_region *")
        region.size, region.guest_pfn = 0x1000, 0x10
        region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(rom)))
        backend.ioctl(g.part, lib.MSHV_SET_GUEST_MEMORY, region)
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_GPA_INTERCEPT
        mem = payload(msg, "struct hv_x64_memory_intercept_message")
        assert mem.guest_physical_address == 0x10000
        assert mem.header.intercept_access_type == lib.HV_INTERCEPT_ACCESS_WRITE
        assert rom[:4] == b"\0\0\0\0"
    finally:
        g.close()
        rom.close()


def test_time_freeze_stops_reference_time(tmp_path: Path) -> None:
    backend, g, _ = _guest(tmp_path, "hlt")
    try:
        set_property(backend, g, lib.HV_PARTITION_PROPERTY_TIME_FREEZE, 1)
        t0, = get_registers(backend, g.vp, [lib.HV_REGISTER_TIME_REF_COUNT])
        time.sleep(0.02)
        t1, = get_registers(backend, g.vp, [lib.HV_REGISTER_TIME_REF_COUNT])
        assert t0 == t1
        set_property(backend, g, lib.HV_PARTITION_PROPERTY_TIME_FREEZE, 0)
        time.sleep(0.02)
        t2, = get_registers(backend, g.vp, [lib.HV_REGISTER_TIME_REF_COUNT])
        assert t2 - t1 >= 150_000  # >= 15 ms in 100 ns units
    finally:
        g.close()


def test_one_router_for_ipis_hypercalls_and_msis() -> None:
    """IPIs (with shorthands and logical destinations), HvAssertVirtualInterrupt and
    irqfd MSIs all reach VPs through the partition's one router."""
    from mshvstack.backend.sim.hypervisor import SimPartition
    from mshvstack.backend.sim.vp import SimVp

    partition = SimPartition(0, (0, 0), 0)
    vps = [SimVp(partition, index) for index in range(3)]
    partition.vps.update({vp.index: vp for vp in vps})
    for vp in vps:   # x2APIC mode: 64-bit ICR writes carry a 32-bit destination, LDRs follow from the APIC ids
        vp.set_reg(lib.HV_X64_REGISTER_APIC_BASE, 0xFEE00000 | (1 << 11) | (1 << 10))

    def pending() -> list[bool]:
        taken = [bool(vp.lapic.irr & (1 << 0x40)) for vp in vps]
        for vp in vps:
            vp.lapic.irr = 0
        return taken

    vps[1].lapic.write_icr64(0x40 | (3 << 18))               # all but self, from VP 1
    assert pending() == [True, False, True]
    vps[0].lapic.write_icr64(0x40 | (1 << 11) | (0b110 << 32))  # logical, cluster 0: VPs 1 and 2
    assert pending() == [False, True, True]
    vps[2].lapic.write_icr64(0x40 | (1 << 18))               # self
    assert pending() == [False, False, True]
    assert partition.route_interrupt(2, 0x40, lib.HV_X64_INTERRUPT_TYPE_FIXED) == [vps[2]]
    assert len(partition.route_interrupt(0b11, 0x40, lib.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY, logical=True)) == 1
    assert pending() == [True, False, True]
    assert partition.route_interrupt(7, 0x40, lib.HV_X64_INTERRUPT_TYPE_FIXED) == []   # no such VP
    for vp in vps:
        vp.close()
