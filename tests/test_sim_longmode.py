"""A long-mode guest built from guests/hvprobe.S runs on the simulator.

It reads the Hyper-V CPUID leaves, writes and reads synthetic MSRs, makes a
hypercall through the hypercall page, touches unmapped MMIO, and waits in
`sti; hlt` for a SynIC message that the test posts with post-message-direct.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from guests import build_guest
from simhelpers import Guest, hvcall, long_mode_guest, set_registers


def _io(msg):  # type: ignore[no-untyped-def]
    assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT, hex(msg.header.message_type)
    return ffi.cast("struct hv_x64_io_port_intercept_message *", ffi.addressof(msg.u))


def _advance(backend: SimBackend, g: Guest, header, **regs: int) -> None:  # type: ignore[no-untyped-def]
    values = {lib.HV_X64_REGISTER_RIP: header.rip + header.instruction_length}
    values.update({getattr(lib, f"HV_X64_REGISTER_{k.upper()}"): v for k, v in regs.items()})
    set_registers(backend, g.vp, values)


def _post(backend: SimBackend, g: Guest, sint: int, message_type: int, payload: bytes) -> None:
    inp = ffi.new("struct hv_input_post_message_direct *")
    inp.vp_index, inp.sint_index = 0, sint
    msg = ffi.cast("struct hv_message *", inp.message)
    msg.header.message_type = message_type
    msg.header.payload_size = len(payload)
    ffi.memmove(msg.u.payload, payload, len(payload))
    hvcall(backend, g.part, lib.HVCALL_POST_MESSAGE_DIRECT, inp)


def test_hvprobe_guest(tmp_path: Path) -> None:
    image, symbols = build_guest("hvprobe", tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image, {0x50: symbols["sint_handler"]}, pt_flags=1 << lib.MSHV_PT_BIT_LAPIC)
    try:
        io = _io(g.run())
        assert (io.port_number, io.rax & 0xFFFFFFFF) == (0x10, int.from_bytes(b"Micr", "little"))
        assert io.access_info.bits.access_size == 4
        assert io.header.execution_state.bits.efer_lma == 1
        _advance(backend, g, io.header)

        io = _io(g.run())
        assert (io.port_number, io.rax & 0xFFFFFFFF) == (0x11, 0)  # VP index
        _advance(backend, g, io.header)

        io = _io(g.run())  # HvPostMessage without a hypercall intercept
        assert (io.port_number, io.rax & 0xFFFF) == (0x12, lib.HV_STATUS_INVALID_CONNECTION_ID)
        _advance(backend, g, io.header)

        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_UNMAPPED_GPA
        mem = ffi.cast("struct hv_x64_memory_intercept_message *", ffi.addressof(msg.u))
        assert mem.guest_physical_address == 0xD0000000
        assert mem.guest_virtual_address == 0xD0000000
        assert mem.header.intercept_access_type == lib.HV_INTERCEPT_ACCESS_READ
        assert bytes(mem.instruction_bytes)[:2] == b"\x8b\x03"  # mov (%rbx),%eax
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: mem.header.rip + 2, lib.HV_X64_REGISTER_RAX: 0x1234})

        io = _io(g.run())
        assert (io.port_number, io.rax & 0xFFFFFFFF) == (0x13, 0x1234)
        _advance(backend, g, io.header)

        io = _io(g.run())
        assert io.port_number == 0x16  # SynIC enabled, about to wait
        _advance(backend, g, io.header)
        _post(backend, g, 2, 0x1, b"hello")
        # Slot busy now: the next post reports insufficient buffers.
        with pytest.raises(ErrnoError):
            _post(backend, g, 2, 0x2, b"again")

        io = _io(g.run())  # the SINT handler ran and read the slot
        assert (io.port_number, io.rax & 0xFFFFFFFF) == (0x15, 1)
        _advance(backend, g, io.header)

        io = _io(g.run())
        assert io.port_number == 0x14  # iretq returned after the hlt
        _advance(backend, g, io.header)
        assert g.run().header.message_type == lib.HVMSG_X64_HALT
        assert bytes(g.ram[0x7200 + 16 : 0x7200 + 21]) == b"hello"
    finally:
        g.close()


def test_unmapped_gpa_behind_a_non_identity_mapping(tmp_path: Path) -> None:
    """Unicorn reports the physical address of an unmapped access; the message must
    carry it as the GPA and the operand's linear address as the GVA (found by Linux
    touching its I/O APIC through a fixmap address)."""
    from guests import assemble
    from simhelpers import PD3

    image, _ = assemble("mov $0xD0200000, %rbx\nmov $2, %rsi\nmovl %eax, 0x10(%rbx,%rsi,4)\nhlt", tmp_path)
    backend = SimBackend()
    g = long_mode_guest(backend, image)
    try:
        g.ram[PD3 + 0x81 * 8 : PD3 + 0x82 * 8] = (0xD0000000 | 0x83).to_bytes(8, "little")  # VA 0xD0200000 -> GPA 0xD0000000
        msg = g.run()
        assert msg.header.message_type == lib.HVMSG_UNMAPPED_GPA
        mem = ffi.cast("struct hv_x64_memory_intercept_message *", ffi.addressof(msg.u))
        assert mem.guest_physical_address == 0xD0000018
        assert mem.guest_virtual_address == 0xD0200018 and mem.memory_access_info.bits.gva_valid
        assert mem.header.intercept_access_type == lib.HV_INTERCEPT_ACCESS_WRITE
    finally:
        g.close()
