"""Raw-ioctl helpers for simulator tests (what a VMM does, without layers)."""

from __future__ import annotations

import mmap
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend


def hvcall(backend: SimBackend, fd: int, code: int, inp: Any, out: Any = None, reps: int = 0, in_size: int | None = None) -> Any:
    call = ffi.new("struct mshv_root_hvcall *")
    call.code = code
    call.reps = reps
    call.in_sz = in_size if in_size is not None else ffi.sizeof(inp[0])
    call.in_ptr = int(ffi.cast("uintptr_t", inp))
    if out is not None:
        call.out_sz = ffi.sizeof(out[0]) if not isinstance(out, ffi.CData) or ffi.typeof(out).kind == "pointer" else len(out)
        call.out_ptr = int(ffi.cast("uintptr_t", out))
    backend.ioctl(fd, lib.MSHV_ROOT_HVCALL, call)
    return call


def set_registers(backend: SimBackend, vp_fd: int, values: dict[int, int]) -> None:
    n = len(values)
    size = ffi.sizeof("struct hv_input_set_vp_registers") + n * ffi.sizeof("struct hv_register_assoc")
    raw = ffi.new("char[]", size)
    inp = ffi.cast("struct hv_input_set_vp_registers *", raw)
    for i, (name, value) in enumerate(values.items()):
        inp.elements[i].name = name
        inp.elements[i].value.reg64 = value
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_SET_VP_REGISTERS, n, size, int(ffi.cast("uintptr_t", raw))
    backend.ioctl(vp_fd, lib.MSHV_ROOT_HVCALL, call)


def set_segment(backend: SimBackend, vp_fd: int, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
    size = ffi.sizeof("struct hv_input_set_vp_registers") + ffi.sizeof("struct hv_register_assoc")
    raw = ffi.new("char[]", size)
    inp = ffi.cast("struct hv_input_set_vp_registers *", raw)
    inp.elements[0].name = name
    if name in (lib.HV_X64_REGISTER_GDTR, lib.HV_X64_REGISTER_IDTR):
        table = inp.elements[0].value.table
        table.base, table.limit = base, limit
    else:
        seg = inp.elements[0].value.segment
        seg.base, seg.limit, seg.selector, seg.attributes = base, limit, selector, attributes
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_SET_VP_REGISTERS, 1, size, int(ffi.cast("uintptr_t", raw))
    backend.ioctl(vp_fd, lib.MSHV_ROOT_HVCALL, call)


def get_registers_call(names: list[int]) -> tuple[Any, Any]:
    """An MSHV_ROOT_HVCALL for HVCALL_GET_VP_REGISTERS, and the buffers it points to."""
    size = ffi.sizeof("struct hv_input_get_vp_registers") + 4 * len(names)
    raw = ffi.new("char[]", size)
    inp = ffi.cast("struct hv_input_get_vp_registers *", raw)
    for i, name in enumerate(names):
        inp.names[i] = name
    out = ffi.new("union hv_register_value[]", len(names))
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_GET_VP_REGISTERS, len(names), size, int(ffi.cast("uintptr_t", raw))
    call.out_sz, call.out_ptr = ffi.sizeof(out), int(ffi.cast("uintptr_t", out))
    return call, (raw, out)


def get_registers(backend: SimBackend, vp_fd: int, names: list[int]) -> list[int]:
    call, (_raw, out) = get_registers_call(names)
    backend.ioctl(vp_fd, lib.MSHV_ROOT_HVCALL, call)
    return [int(out[i].reg64) for i in range(len(names))]


class Guest:
    """A partition with one VP and RAM at GPA 0, built with raw ioctls."""

    def __init__(self, backend: SimBackend, ram_size: int = 0x10000, pt_flags: int = 0) -> None:
        self.backend = backend
        self.dev = backend.open()
        arg = ffi.new("struct mshv_create_partition *")
        arg.pt_flags = pt_flags
        self.part = backend.ioctl(self.dev, lib.MSHV_CREATE_PARTITION, arg)
        backend.ioctl(self.part, lib.MSHV_INITIALIZE_PARTITION, 0)
        self.ram = mmap.mmap(-1, ram_size)
        region = ffi.new("struct mshv_user_mem_region *")
        region.size = ram_size
        region.guest_pfn = 0
        region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.ram)))
        region.flags = (1 << lib.MSHV_SET_MEM_BIT_WRITABLE) | (1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE)
        backend.ioctl(self.part, lib.MSHV_SET_GUEST_MEMORY, region)
        vp = ffi.new("struct mshv_create_vp *")
        self.vp = backend.ioctl(self.part, lib.MSHV_CREATE_VP, vp)
        # A VP starts at the reset vector (CS base 0xFFFF0000); these guests live low.
        set_segment(backend, self.vp, lib.HV_X64_REGISTER_CS, 0, 0xFFFF, 0, 0x9B)

    def run(self) -> Any:
        # The message owns the buffer the run fills: a cast of the run argument would
        # not keep it alive, and the next allocation of its size reused it.
        msg = ffi.new("struct hv_message *")
        self.backend.ioctl(self.vp, lib.MSHV_RUN_VP, ffi.cast("struct mshv_run_vp *", msg))
        return msg

    def close(self) -> None:
        for fd in (self.vp, self.part, self.dev):
            self.backend.close(fd)
        self.ram.close()


# ---- a long-mode guest set up by the host (paging, GDT, IDT), as VMMs do
import struct  # noqa: E402

ENTRY = 0x2000
IDT, GDT, PML4, PDPT, PD0, PD3 = 0x3000, 0x4000, 0x8000, 0x9000, 0xA000, 0xB000
STACK = 0xF000


def long_mode_guest(backend: SimBackend, image: bytes, gates: dict[int, int] | None = None, pt_flags: int = 1,
                    ram_size: int = 0x10000) -> Guest:
    """RAM from GPA 0 (64 KiB unless ``ram_size``) identity mapped (2 MiB page),
    0xD0000000 mapped to a GPA with no RAM; IDT gates for ``gates`` (vector ->
    handler address)."""
    g = Guest(backend, ram_size=ram_size, pt_flags=pt_flags)
    ram = g.ram
    ram[ENTRY : ENTRY + len(image)] = image
    struct.pack_into("<Q", ram, PML4, PDPT | 3)
    struct.pack_into("<Q", ram, PDPT, PD0 | 3)
    struct.pack_into("<Q", ram, PDPT + 3 * 8, PD3 | 3)
    struct.pack_into("<Q", ram, PD0, 0x83)
    struct.pack_into("<Q", ram, PD3 + 0x80 * 8, 0xD0000000 | 0x83)
    struct.pack_into("<QQQ", ram, GDT, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    for vector, handler in (gates or {}).items():
        low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((handler >> 16) & 0xFFFF) << 48
        struct.pack_into("<QQ", ram, IDT + vector * 16, low, handler >> 32)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_GDTR, GDT, 23, 0, 0)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_IDTR, IDT, 0xFFF if gates else 0, 0, 0)
    set_segment(backend, g.vp, lib.HV_X64_REGISTER_CS, 0, 0xFFFFFFFF, 0x08, 0xA09B)
    for seg in (lib.HV_X64_REGISTER_SS, lib.HV_X64_REGISTER_DS, lib.HV_X64_REGISTER_ES):
        set_segment(backend, g.vp, seg, 0, 0xFFFFFFFF, 0x10, 0xC093)
    set_registers(backend, g.vp, {
        lib.HV_X64_REGISTER_CR3: PML4, lib.HV_X64_REGISTER_CR4: 1 << 5,
        lib.HV_X64_REGISTER_EFER: (1 << 8) | (1 << 10), lib.HV_X64_REGISTER_CR0: 0x80000011,
        lib.HV_X64_REGISTER_RIP: ENTRY, lib.HV_X64_REGISTER_RSP: STACK, lib.HV_X64_REGISTER_RFLAGS: 2,
    })
    return g


def payload(msg: Any, ctype: str) -> Any:
    """A copy of the message's payload: a pointer into msg would not keep msg alive
    (expect_io(g.run(), ...) drops it at once, and its memory is soon reused)."""
    assert ffi.sizeof(ctype) <= ffi.sizeof(msg.u)
    copy = ffi.new(f"{ctype} *")
    ffi.memmove(copy, ffi.addressof(msg.u), ffi.sizeof(ctype))
    return copy


def expect_io(msg: Any, port: int) -> Any:
    assert msg.header.message_type == lib.HVMSG_X64_IO_PORT_INTERCEPT, hex(msg.header.message_type)
    io = payload(msg, "struct hv_x64_io_port_intercept_message")
    assert io.port_number == port, hex(io.port_number)
    return io


def advance(backend: SimBackend, g: Guest, header: Any, **regs: int) -> None:
    values = {lib.HV_X64_REGISTER_RIP: header.rip + header.instruction_length}
    values.update({getattr(lib, f"HV_X64_REGISTER_{k.upper()}"): v for k, v in regs.items()})
    set_registers(backend, g.vp, values)


def install_intercept(backend: SimBackend, g: Guest, kind: int, access: int = 0, parameter: int = 0) -> None:
    inp = ffi.new("struct hv_input_install_intercept *")
    inp.intercept_type, inp.access_type = kind, access
    inp.intercept_parameter.as_uint64 = parameter
    hvcall(backend, g.part, lib.HVCALL_INSTALL_INTERCEPT, inp)


def set_property(backend: SimBackend, g: Guest, code: int, value: int) -> None:
    inp = ffi.new("struct hv_input_set_partition_property *")
    inp.property_code, inp.property_value = code, value
    hvcall(backend, g.part, lib.HVCALL_SET_PARTITION_PROPERTY, inp)
