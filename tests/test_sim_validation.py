"""The simulator returns the driver's errno for each documented bad input."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.errors import ErrnoError

from simhelpers import Guest, hvcall


@pytest.fixture
def guest():  # type: ignore[no-untyped-def]
    g = Guest(SimBackend())
    yield g
    g.close()


def _errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(ErrnoError) as info:
        fn(*args)
    return info.value.errno


def _create(backend: SimBackend, dev: int, flags: int, isolation: int = 0) -> int:
    arg = ffi.new("struct mshv_create_partition *")
    arg.pt_flags, arg.pt_isolation = flags, isolation
    return backend.ioctl(dev, lib.MSHV_CREATE_PARTITION, arg)


def test_create_partition_rejects_unknown_flags_and_isolation() -> None:
    backend = SimBackend()
    dev = backend.open()
    assert _errno(_create, backend, dev, 1 << lib.MSHV_PT_BIT_COUNT) == errno.EINVAL
    assert _errno(_create, backend, dev, 0, lib.MSHV_PT_ISOLATION_COUNT) == errno.EINVAL
    backend.close(_create(backend, dev, 1 << lib.MSHV_PT_BIT_LAPIC))
    backend.close(dev)


def test_v2_flags_refused_by_the_6_15_profile() -> None:
    backend = SimBackend(profile="6.15")
    dev = backend.open()
    assert _errno(_create, backend, dev, 1 << lib.MSHV_PT_BIT_NESTED_VIRTUALIZATION) == errno.EINVAL
    backend.close(dev)


def test_v2_struct_validation() -> None:
    backend = SimBackend()
    dev = backend.open()
    arg = ffi.new("struct mshv_create_partition_v2 *")
    arg.pt_flags = 1 << lib.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES
    arg.pt_num_cpu_fbanks = 1
    assert _errno(backend.ioctl, dev, lib.MSHV_CREATE_PARTITION, arg) == errno.EINVAL
    arg.pt_num_cpu_fbanks = lib.MSHV_NUM_CPU_FEATURES_BANKS
    arg.pt_rsvd1[1] = 1
    assert _errno(backend.ioctl, dev, lib.MSHV_CREATE_PARTITION, arg) == errno.EINVAL
    arg.pt_rsvd1[1] = 0
    backend.close(backend.ioctl(dev, lib.MSHV_CREATE_PARTITION, arg))
    backend.close(dev)


def test_create_vp_limits(guest: Guest) -> None:
    vp = ffi.new("struct mshv_create_vp *")
    vp.vp_index = 256
    assert _errno(guest.backend.ioctl, guest.part, lib.MSHV_CREATE_VP, vp) == errno.EINVAL
    vp.vp_index = 0
    assert _errno(guest.backend.ioctl, guest.part, lib.MSHV_CREATE_VP, vp) == errno.EEXIST


def _region(buf: mmap.mmap, gfn: int, size: int | None = None, flags: int = 0) -> object:
    region = ffi.new("struct mshv_user_mem_region *")
    region.size = len(buf) if size is None else size
    region.guest_pfn = gfn
    region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    region.flags = flags
    return region


def test_set_guest_memory_errors(guest: Guest) -> None:
    b = guest.backend
    buf = mmap.mmap(-1, 0x4000)
    try:
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100, size=0)) == errno.EINVAL
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100, size=0x1800)) == errno.EINVAL
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100, flags=1 << 5)) == errno.EINVAL
        bad = _region(buf, 0x100)
        bad.rsvd[3] = 1
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, bad) == errno.EINVAL
        unaligned = _region(buf, 0x100)
        unaligned.userspace_addr += 8
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, unaligned) == errno.EINVAL
        # Overlap with the guest's RAM at GPA 0..0x10000.
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0xE)) == errno.EEXIST
        b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100))
        unmap = 1 << lib.MSHV_SET_MEM_BIT_UNMAP
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x200, flags=unmap)) == errno.ENOENT
        assert _errno(b.ioctl, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100, size=0x1000, flags=unmap)) == errno.EINVAL
        b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(buf, 0x100, flags=unmap))
    finally:
        buf.close()


def test_unknown_request_is_enotty(guest: Guest) -> None:
    assert _errno(guest.backend.ioctl, guest.vp, lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *")) == errno.ENOTTY
    assert _errno(guest.backend.ioctl, guest.dev, lib.MSHV_RUN_VP, ffi.new("struct mshv_run_vp *")) == errno.ENOTTY


def _prop_input() -> object:
    inp = ffi.new("struct hv_input_get_partition_property *")
    inp.property_code = lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION
    return inp


def test_hvcall_validation(guest: Guest) -> None:
    b = guest.backend
    out = ffi.new("struct hv_output_get_partition_property *")
    hvcall(b, guest.part, lib.HVCALL_GET_PARTITION_PROPERTY, _prop_input(), out)
    assert out.property_value == lib.HV_UNIMPLEMENTED_MSR_ACTION_FAULT
    # Not on the allowlist.
    assert _errno(hvcall, b, guest.part, lib.HVCALL_CREATE_VP, _prop_input()) == errno.EINVAL
    # in_sz out of range.
    assert _errno(hvcall, b, guest.part, lib.HVCALL_GET_PARTITION_PROPERTY, _prop_input(), None, 0, 4) == errno.EINVAL
    assert _errno(hvcall, b, guest.part, lib.HVCALL_GET_PARTITION_PROPERTY, _prop_input(), None, 0, 4097) == errno.EINVAL
    # Async hypercall on a VP fd.
    setp = ffi.new("struct hv_input_set_partition_property *")
    setp.property_code = lib.HV_PARTITION_PROPERTY_TIME_FREEZE
    assert _errno(hvcall, b, guest.vp, lib.HVCALL_SET_PARTITION_PROPERTY, setp) == errno.EINVAL
    hvcall(b, guest.part, lib.HVCALL_SET_PARTITION_PROPERTY, setp)
    # The device fd only passes partition-property reads.
    assert _errno(hvcall, b, guest.dev, lib.HVCALL_SET_PARTITION_PROPERTY, setp) == errno.EINVAL


def test_hvcall_on_device_refused_by_6_15() -> None:
    backend = SimBackend(profile="6.15")
    dev = backend.open()
    assert _errno(hvcall, backend, dev, lib.HVCALL_GET_PARTITION_PROPERTY, _prop_input()) == errno.ENOTTY  # no such request there
    backend.close(dev)


def test_status_and_errno_for_unknown_property(guest: Guest) -> None:
    inp = ffi.new("struct hv_input_get_partition_property *")
    inp.property_code = 0x7FFFFFFF
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.in_sz, call.in_ptr = lib.HVCALL_GET_PARTITION_PROPERTY, ffi.sizeof(inp[0]), int(ffi.cast("uintptr_t", inp))
    with pytest.raises(ErrnoError) as info:
        guest.backend.ioctl(guest.part, lib.MSHV_ROOT_HVCALL, call)
    assert info.value.errno == errno.EIO
    assert call.status == lib.HV_STATUS_UNKNOWN_PROPERTY


def test_msi_routing_validation(guest: Guest) -> None:
    raw = ffi.new("char[]", ffi.sizeof("struct mshv_user_irq_table") + 2 * ffi.sizeof("struct mshv_user_irq_entry"))
    table = ffi.cast("struct mshv_user_irq_table *", raw)
    table.nr = 2
    table.entries[0].gsi = table.entries[1].gsi = 5
    assert _errno(guest.backend.ioctl, guest.part, lib.MSHV_SET_MSI_ROUTING, table) == errno.EINVAL
    table.entries[1].gsi = 4096
    assert _errno(guest.backend.ioctl, guest.part, lib.MSHV_SET_MSI_ROUTING, table) == errno.EINVAL
    table.entries[1].gsi, table.entries[1].address_hi = 6, 1
    assert _errno(guest.backend.ioctl, guest.part, lib.MSHV_SET_MSI_ROUTING, table) == errno.EINVAL
    table.entries[1].address_hi = 0
    guest.backend.ioctl(guest.part, lib.MSHV_SET_MSI_ROUTING, table)


def test_irqfd_and_ioeventfd_validation(guest: Guest) -> None:
    b = guest.backend
    efd = os.eventfd(0)
    try:
        irq = ffi.new("struct mshv_user_irqfd *")
        irq.fd, irq.gsi, irq.flags = efd, 1, 1 << 2
        assert _errno(b.ioctl, guest.part, lib.MSHV_IRQFD, irq) == errno.EINVAL
        irq.flags = 0
        b.ioctl(guest.part, lib.MSHV_IRQFD, irq)
        assert _errno(b.ioctl, guest.part, lib.MSHV_IRQFD, irq) == errno.EBUSY
        irq.fd = 9999
        assert _errno(b.ioctl, guest.part, lib.MSHV_IRQFD, irq) == errno.EBADF
        io = ffi.new("struct mshv_user_ioeventfd *")
        io.fd, io.addr, io.len = efd, 0xD0000000, 4
        io.flags = 1 << lib.MSHV_IOEVENTFD_BIT_PIO
        assert _errno(b.ioctl, guest.part, lib.MSHV_IOEVENTFD, io) == errno.EOPNOTSUPP
        io.flags = 0
        io.len = 3
        assert _errno(b.ioctl, guest.part, lib.MSHV_IOEVENTFD, io) == errno.EINVAL
        io.len = 4
        b.ioctl(guest.part, lib.MSHV_IOEVENTFD, io)
        assert _errno(b.ioctl, guest.part, lib.MSHV_IOEVENTFD, io) == errno.EEXIST
        io.flags = 1 << lib.MSHV_IOEVENTFD_BIT_DEASSIGN
        b.ioctl(guest.part, lib.MSHV_IOEVENTFD, io)
        assert _errno(b.ioctl, guest.part, lib.MSHV_IOEVENTFD, io) == errno.ENOENT
    finally:
        os.close(efd)


def test_vp_state_size_negotiation(guest: Guest) -> None:
    buf = mmap.mmap(-1, 4096)
    req = ffi.new("struct mshv_get_set_vp_state *")
    req.type, req.buf_sz, req.buf_ptr = lib.MSHV_VP_STATE_COUNT, 4096, int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    assert _errno(guest.backend.ioctl, guest.vp, lib.MSHV_GET_VP_STATE, req) == errno.EINVAL
    req.type = lib.MSHV_VP_STATE_LAPIC
    guest.backend.ioctl(guest.vp, lib.MSHV_GET_VP_STATE, req)
    state = ffi.from_buffer("struct hv_local_interrupt_controller_state *", buf)
    assert state.apic_lvt_lint0 == 0x10000
    ffi.release(state)
    buf.close()


def test_vp_mmap_offsets(guest: Guest) -> None:
    b = guest.backend
    assert len(b.mmap(guest.vp, 4096, 0)) == 4096
    assert len(b.mmap(guest.vp, 4096, 4096)) == 4096
    assert _errno(b.mmap, guest.vp, 4096, 2 * 4096) == errno.ENODEV
    assert _errno(b.mmap, guest.vp, 4096, 7 * 4096) == errno.EINVAL


def test_fault_injection(guest: Guest) -> None:
    guest.backend.faults.fail_ioctl("MSHV_RUN_VP", errno.EINTR, times=1)
    assert _errno(guest.run) == errno.EINTR


def test_kick_returns_eintr_from_blocked_run() -> None:
    backend = SimBackend()
    g = Guest(backend, pt_flags=1 << lib.MSHV_PT_BIT_LAPIC)
    try:
        # sti; hlt -- waits for an interrupt that never comes.
        g.ram[0x1000:0x1003] = bytes.fromhex("fbf4f4")
        from simhelpers import set_registers
        set_registers(backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RFLAGS: 2})
        timer = threading.Timer(0.2, backend.kick, args=(g.vp,))
        timer.start()
        start = time.monotonic()
        assert _errno(g.run) == errno.EINTR
        assert time.monotonic() - start >= 0.15
    finally:
        g.close()


@settings(max_examples=60, deadline=None)
@given(code=st.integers(0, 0xFFFF), in_sz=st.integers(0, 5000), status=st.integers(0, 3), rsvd=st.integers(0, 1))
def test_hvcall_fuzz_never_crashes(code: int, in_sz: int, status: int, rsvd: int) -> None:
    backend = SimBackend()
    g = Guest(backend, ram_size=0x2000)
    try:
        buf = ffi.new("char[]", 8192)
        call = ffi.new("struct mshv_root_hvcall *")
        call.code, call.in_sz, call.status, call.in_ptr = code, in_sz, status, int(ffi.cast("uintptr_t", buf))
        call.rsvd[0] = rsvd
        try:
            backend.ioctl(g.part, lib.MSHV_ROOT_HVCALL, call)
        except ErrnoError as exc:
            assert exc.errno in (errno.EINVAL, errno.EIO, errno.ENOMEM)
            valid = status == 0 and 8 <= in_sz <= 4096 and not rsvd
            if not valid:
                assert exc.errno == errno.EINVAL
    finally:
        g.close()
