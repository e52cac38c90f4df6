"""rust-vmm's run-code scenario, through raw ioctls on the simulator."""

from __future__ import annotations

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend

from simhelpers import Guest, get_registers, set_registers, set_segment

# mov dx,0x3f8; add al,bl; add al,'0'; out dx,al; mov al,0x0a; out dx,al; hlt
REAL_MODE_CODE = bytes.fromhex("baf80300d80430eeb00aeef4")


def test_real_mode_io_then_halt() -> None:
    backend = SimBackend()
    g = Guest(backend)
    try:
        g.ram[0x1000 : 0x1000 + len(REAL_MODE_CODE)] = REAL_MODE_CODE
        set_segment(backend, g.vp, lib.HV_X64_REGISTER_CS, 0, 0xFFFF, 0, 0x9B)
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RAX: 2,
                                      lib.HV_X64_REGISTER_RBX: 2, lib.HV_X64_REGISTER_RFLAGS: 2})
        seen = []
        for _ in range(3):
            msg = g.run()
            if msg.header.message_type == lib.HVMSG_X64_HALT:
                break
            assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT
            io = ffi.cast("struct hv_x64_io_port_intercept_message *", ffi.addressof(msg.u))
            assert io.port_number == 0x3F8
            assert io.header.intercept_access_type == lib.HV_INTERCEPT_ACCESS_WRITE
            assert io.access_info.bits.access_size == 1
            assert io.header.instruction_length == 1
            seen.append(chr(io.rax & 0xFF))
            set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: io.header.rip + io.header.instruction_length})
        assert seen == ["4", "\n"]
        assert msg.header.message_type == lib.HVMSG_X64_HALT
        rip, = get_registers(backend, g.vp, [lib.HV_X64_REGISTER_RIP])
        assert rip == 0x1000 + len(REAL_MODE_CODE)
    finally:
        g.close()
