"""A long-mode guest built from guests/hvprobe.S runs on the simulator.

It reads the Hyper-V CPUID leaves, writes and reads synthetic MSRs, makes a
hypercall through the hypercall page, touches unmapped MMIO, and waits in
`sti; hlt` for a SynIC message that the test posts with post-message-direct.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from guests import build_guest
from simhelpers import Guest, hvcall, set_registers, set_segment

ENTRY = 0x2000
IDT, GDT, PML4, PDPT, PD0, PD3 = 0x3000, 0x4000, 0x8000, 0x9000, 0xA000, 0xB000
STACK = 0xF000
SINT_VECTOR = 0x50


def _long_mode_guest(backend: SimBackend, image: bytes, handler: int) -> Guest:
    g = Guest(backend, ram_size=0x10000, pt_flags=1 << lib.MSHV_PT_BIT_LAPIC)
    ram = g.ram
    ram[ENTRY : ENTRY + len(image)] = image
    # Identity map 0-2 MiB, and 0xD0000000 (2 MiB page) to a GPA with no RAM.
    struct.pack_into("<Q", ram, PML4, PDPT | 3)
    struct.pack_into("<Q", ram, PDPT, PD0 | 3)
    struct.pack_into("<Q", ram, PDPT + 3 * 8, PD3 | 3)
    struct.pack_into("<Q", ram, PD0, 0x83)
    struct.pack_into("<Q", ram, PD3 + 0x80 * 8, 0xD0000000 | 0x83)
    # GDT: null, 64-bit code (0x08), data (0x10).
    struct.pack_into("<QQQ", ram, GDT, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    # IDT gate for the SINT vector: present 64-bit interrupt gate, selector 0x08.
    low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((handler >> 16) & 0xFFFF) << 48
    struct.pack_into("<QQ", ram, IDT + SINT_VECTOR * 16, low, handler >> 32)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_GDTR, GDT, 23, 0, 0)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_IDTR, IDT, 0xFFF, 0, 0)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, 0x08, 0xA09B)
    for seg in (lib.HV_X64_REGISTER_SS, lib.HV_X64_REGISTER_DS, lib.HV_X64_REGISTER_ES):
        set_segment(backend, g.vp, seg, 0, 0xFFFFFFFF, 0x10, 0xC093)
    set_registers(backend, g.vp, {
        lib.HV_X64_REGISTER_CR3: PML4, lib.HV_X64_REGISTER_CR4: 1 << 5,
        lib.HV_X64_REGISTER_EFER: (1 << 8) | (1 << 10), lib.HV_X64_REGISTER_CR0: 0x80000011,
        lib.HV_X64_REGISTER_RIP: ENTRY, lib.HV_X64_REGISTER_RSP: STACK, lib.HV_X64_REGISTER_RFLAGS: 2,
    })
    return g


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
    g = _long_mode_guest(backend, image, symbols["sint_handler"])
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
