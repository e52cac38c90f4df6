"""Intercept messages byte for byte, and the hypervisor's answers the driver passes on.

Each message is compared whole (all 256 bytes) with one built here field by
field from the architecture: what a real-mode guest's access or fetch means,
not what the simulator happened to compute.
"""

from __future__ import annotations

import errno
import mmap
from typing import Any

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from simhelpers import Guest, get_registers, set_registers, set_segment

CODE = 0x1000
RAM = 0x8000          # GPA 0x8000 and up is unmapped
REAL_MODE_CS = (0, 0xFFFF, 0, 0x9B)


def _expected(kind: int, access: int, rip: int, insn: bytes, gva: int, gpa: int, fetched: bytes) -> bytes:
    """The memory intercept a real-mode VP 0 at CS:RIP = 0:rip sends, every field set here."""
    msg = ffi.new("struct hv_message *")
    msg.header.message_type = kind
    msg.header.payload_size = ffi.sizeof("struct hv_x64_memory_intercept_message")
    body = ffi.cast("struct hv_x64_memory_intercept_message *", ffi.addressof(msg.u))
    header = body.header
    header.vp_index = 0
    header.instruction_length = len(insn)
    header.cr8 = 0
    header.intercept_access_type = access
    state = header.execution_state.bits
    state.cpl, state.cr0_pe, state.cr0_am, state.efer_lma = 0, 0, 0, 0
    header.cs_segment.base, header.cs_segment.limit, header.cs_segment.selector, header.cs_segment.attributes = REAL_MODE_CS
    header.rip, header.rflags = rip, 0x2
    body.cache_type = 0
    body.instruction_byte_count = len(fetched)
    body.memory_access_info.bits.gva_valid = 1
    body.memory_access_info.bits.gva_gpa_valid = 1
    body.guest_virtual_address, body.guest_physical_address = gva, gpa
    ffi.memmove(body.instruction_bytes, fetched, len(fetched))
    return bytes(ffi.buffer(msg))


def _run_real_mode(code: bytes, regs: dict[int, int], ds: tuple[int, int, int, int] = (0, 0xFFFF, 0, 0x93)) -> tuple[bytes, bytes]:
    """Run ``code`` at 0:CODE; the message it stops with, and the 16 bytes at CODE."""
    backend = SimBackend()
    g = Guest(backend, ram_size=RAM)
    try:
        g.ram[CODE:CODE + len(code)] = code
        set_segment(backend, g.vp, lib.HV_X64_REGISTER_DS, *ds)
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: CODE, lib.HV_X64_REGISTER_RFLAGS: 2, **regs})
        msg = g.run()
        return bytes(ffi.buffer(msg)), bytes(g.ram[CODE:CODE + 16])
    finally:
        g.close()


WRITE = int(lib.HV_INTERCEPT_ACCESS_WRITE)
EXECUTE = int(lib.HV_INTERCEPT_ACCESS_EXECUTE)
MOV_WORD_9004 = bytes.fromhex("c70604903412")        # mov word [0x9004], 0x1234
MOV_WORD_BX_10 = bytes.fromhex("c747103412")         # mov word [bx+0x10], 0x1234


@pytest.mark.parametrize("code, regs, ds, linear", [
    # A 16-bit displacement is an offset, not a signed number: DS.base + 0x9004.
    (MOV_WORD_9004, {}, (0, 0xFFFF, 0, 0x93), 0x9004),
    (MOV_WORD_9004, {}, (0x1000, 0xFFFF, 0x100, 0x93), 0xA004),
    # 16-bit effective addresses wrap at 64 KiB: BX 0xfff8 + 0x10 is offset 8.
    (MOV_WORD_BX_10, {lib.HV_X64_REGISTER_RBX: 0xFFF8}, (0x9000, 0xFFFF, 0x900, 0x93), 0x9008),
])
def test_real_mode_write_to_unmapped_gpa(code: bytes, regs: dict[int, int], ds: tuple[int, int, int, int], linear: int) -> None:
    message, fetched = _run_real_mode(code, regs, ds)
    assert message == _expected(lib.HVMSG_UNMAPPED_GPA, WRITE, CODE, code, linear, linear, fetched)


def test_instruction_fetch_from_unmapped_gpa_reports_its_linear_address() -> None:
    jmp = bytes.fromhex("e9fd7f")                      # jmp 0x9000 (from 0x1000)
    message, _ = _run_real_mode(jmp, {})
    assert message == _expected(lib.HVMSG_UNMAPPED_GPA, EXECUTE, 0x9000, b"", 0x9000, 0x9000, b"")


def _register_page(backend: SimBackend, vp: int) -> Any:
    page = backend.mmap(vp, mmap.PAGESIZE, lib.MSHV_VP_MMAP_OFFSET_REGISTERS * mmap.PAGESIZE)
    return ffi.from_buffer("struct hv_vp_register_page *", page)


@pytest.mark.parametrize("profile", ["newest", "6.15"])
def test_the_register_page_is_published_clean_at_create_vp(profile: str) -> None:
    backend = SimBackend(profile=profile)
    dev = backend.open()
    part = backend.ioctl(dev, lib.MSHV_CREATE_PARTITION, ffi.new("struct mshv_create_partition *"))
    backend.ioctl(part, lib.MSHV_INITIALIZE_PARTITION, 0)
    for index in (0, 1):
        arg = ffi.new("struct mshv_create_vp *")
        arg.vp_index = index
        page = _register_page(backend, backend.ioctl(part, lib.MSHV_CREATE_VP, arg))
        assert (page.version, page.isvalid, page.dirty) == (lib.HV_VP_REGISTER_PAGE_VERSION_1, 1, 0)
        assert (page.rip, page.cs.base, page.cs.selector) == (0xFFF0, 0xFFFF0000, 0xF000)   # the reset state


# ---- hypervisor-decided answers

def _mem_region(ram: mmap.mmap) -> Any:
    region = ffi.new("struct mshv_user_mem_region *")
    region.size = len(ram)
    region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(ram)))
    region.flags = (1 << lib.MSHV_SET_MEM_BIT_WRITABLE) | (1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE)
    return region


@pytest.mark.parametrize("profile", ["newest", "6.15"])
def test_guest_memory_before_initialize_partition_is_refused(profile: str) -> None:
    """HvMapGpaPages on an uninitialized partition: HV_STATUS_INVALID_PARTITION_STATE, EIO."""
    backend = SimBackend(profile=profile)
    dev = backend.open()
    part = backend.ioctl(dev, lib.MSHV_CREATE_PARTITION, ffi.new("struct mshv_create_partition *"))
    ram = mmap.mmap(-1, 0x10000)
    with pytest.raises(ErrnoError) as refused:
        backend.ioctl(part, lib.MSHV_SET_GUEST_MEMORY, _mem_region(ram))
    assert refused.value.errno == errno.EIO
    backend.ioctl(part, lib.MSHV_INITIALIZE_PARTITION, 0)
    backend.ioctl(part, lib.MSHV_SET_GUEST_MEMORY, _mem_region(ram))   # nothing was left mapped


def _deliverability(**fields: int) -> int:
    value = ffi.new("union hv_deliverability_notifications_register *")
    for name, field_value in fields.items():
        setattr(value.bits, name, field_value)
    return int(value.as_uint64)


@pytest.mark.parametrize("value, status", [
    (0, lib.HV_STATUS_SUCCESS),
    (_deliverability(sints=1 << 2), lib.HV_STATUS_SUCCESS),
    (_deliverability(sints=0xFFFF), lib.HV_STATUS_SUCCESS),
    (_deliverability(interrupt_notification=1, interrupt_priority=3), lib.HV_STATUS_SUCCESS),
    (_deliverability(nmi_notification=1), lib.HV_STATUS_INVALID_PARAMETER),     # rust-vmm's 1, on hardware
    (_deliverability(reserved=1), lib.HV_STATUS_INVALID_PARAMETER),
    (1 << 2, lib.HV_STATUS_SUCCESS),                                            # interrupt priority 1
    (1 << 6, lib.HV_STATUS_INVALID_PARAMETER),                                  # first reserved bit
])
def test_deliverability_notifications_register(value: int, status: int) -> None:
    """NMI notifications and reserved bits are refused (rust-vmm's test on hardware sets 1 and
    gets EINVAL); interrupt notification with its priority and the SINT bits (48-63) are taken."""
    backend = SimBackend()
    g = Guest(backend, ram_size=RAM)
    try:
        inp = ffi.new("struct hv_input_set_vp_registers *", {"elements": 1})
        inp.elements[0].name = lib.HV_REGISTER_DELIVERABILITY_NOTIFICATIONS
        inp.elements[0].value.reg64 = value
        size = ffi.sizeof("struct hv_input_set_vp_registers") + ffi.sizeof("struct hv_register_assoc")
        call = ffi.new("struct mshv_root_hvcall *")
        call.code, call.reps, call.in_sz, call.in_ptr = lib.HVCALL_SET_VP_REGISTERS, 1, size, int(ffi.cast("uintptr_t", inp))
        try:
            backend.ioctl(g.vp, lib.MSHV_ROOT_HVCALL, call)
        except ErrnoError as exc:
            assert exc.errno == errno.EINVAL
        assert call.status == status
        expected = value if status == lib.HV_STATUS_SUCCESS else 0
        assert get_registers(backend, g.vp, [lib.HV_REGISTER_DELIVERABILITY_NOTIFICATIONS]) == [expected]
    finally:
        g.close()
