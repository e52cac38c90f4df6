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


def get_registers(backend: SimBackend, vp_fd: int, names: list[int]) -> list[int]:
    size = ffi.sizeof("struct hv_input_get_vp_registers") + 4 * len(names)
    raw = ffi.new("char[]", size)
    inp = ffi.cast("struct hv_input_get_vp_registers *", raw)
    for i, name in enumerate(names):
        inp.names[i] = name
    out = ffi.new("union hv_register_value[]", len(names))
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_GET_VP_REGISTERS, len(names), size, int(ffi.cast("uintptr_t", raw))
    call.out_sz, call.out_ptr = ffi.sizeof(out), int(ffi.cast("uintptr_t", out))
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

    def run(self) -> Any:
        run = ffi.new("struct mshv_run_vp *")
        self.backend.ioctl(self.vp, lib.MSHV_RUN_VP, run)
        return ffi.cast("struct hv_message *", run)

    def close(self) -> None:
        for fd in (self.vp, self.part, self.dev):
            self.backend.close(fd)
        self.ram.close()
