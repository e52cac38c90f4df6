"""The simulator answers like the driver, path by path: bad caller pointers are
EFAULT (never a crash), and each errno below is the one the upstream driver
(mshv_root_main.c, mshv_eventfd.c) returns for that input, in the order it
checks, with the 6.15 driver's differences where its profile is chosen."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import SimBackend
from mshvstack.backend.sim.usercopy import owned_size
from mshvstack.errors import ErrnoError

from simhelpers import Guest, set_registers

KERNEL_ADDRESS = 0xFFFF_8000_0000_0000
CLOSED_FD = 65_000   # a number no test opens (a closed low number is soon reused by the next dup)


def _errno(backend: SimBackend, fd: int, request: int, arg: Any) -> int:
    with pytest.raises(ErrnoError) as info:
        backend.ioctl(fd, request, arg)
    return info.value.errno


# Reserved with no access for the whole run: a freed area could be mapped again by the time it
# is used (the first MSHV_RUN_VP creates the engine, whose allocations may land there).
_NO_ACCESS = mmap.mmap(-1, 1 << 20, prot=0)


def _no_access_address() -> int:
    """An address the process cannot touch: copy_to_user and copy_from_user fault there."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(_NO_ACCESS))) + (1 << 19)


def _unmapped_address() -> int:
    """An address in no mapping (one that was mapped a moment ago): use it at once."""
    area = mmap.mmap(-1, 1 << 20)
    address = int(ffi.cast("uintptr_t", ffi.from_buffer(area)))
    area.close()
    return address + (1 << 19)


@pytest.fixture(params=["newest", "6.15"])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    g = Guest(SimBackend(profile=request.param))
    yield g
    g.close()


@pytest.fixture
def newest() -> Iterator[Guest]:
    g = Guest(SimBackend())
    yield g
    g.close()


# ---- bad pointers: EFAULT, never SIGSEGV
@pytest.mark.parametrize("bad", [0, KERNEL_ADDRESS, "no access"])
def test_every_struct_argument_is_copied_in_with_efault(guest: Guest, bad: Any) -> None:
    address = _no_access_address() if bad == "no access" else bad
    b = guest.backend
    for fd, request in ((guest.dev, lib.MSHV_CREATE_PARTITION), (guest.part, lib.MSHV_CREATE_VP),
                        (guest.part, lib.MSHV_SET_GUEST_MEMORY), (guest.part, lib.MSHV_IRQFD),
                        (guest.part, lib.MSHV_IOEVENTFD), (guest.part, lib.MSHV_SET_MSI_ROUTING),
                        (guest.part, lib.MSHV_GET_GPAP_ACCESS_BITMAP), (guest.part, lib.MSHV_ROOT_HVCALL),
                        (guest.vp, lib.MSHV_GET_VP_STATE), (guest.vp, lib.MSHV_SET_VP_STATE),
                        (guest.vp, lib.MSHV_ROOT_HVCALL)):
        assert _errno(b, fd, request, address) == errno.EFAULT, hex(request)


def test_run_vp_copies_the_message_out_after_the_run(newest: Guest) -> None:
    """The guest runs (here: to an exit at an unmapped GPA) and only then is the
    message copied: EFAULT, the message lost, as on the driver."""
    assert _errno(newest.backend, newest.vp, lib.MSHV_RUN_VP, 0) == errno.EFAULT


@pytest.mark.parametrize("bad", [0, KERNEL_ADDRESS, "no access"])
def test_a_cast_pointer_is_checked_like_an_address(newest: Guest, bad: Any) -> None:
    """Only memory cffi owns skips copy_to_user's check: a pointer cast from a bad
    address is a bad address, whatever its C type."""
    address = _no_access_address() if bad == "no access" else bad
    arg = ffi.cast("struct mshv_run_vp *", address)
    assert owned_size(arg) == 0
    assert _errno(newest.backend, newest.vp, lib.MSHV_RUN_VP, arg) == errno.EFAULT


def test_owned_size_is_what_cffi_holds_for_the_caller() -> None:
    assert owned_size(ffi.new("struct mshv_run_vp *")) == ffi.sizeof("struct mshv_run_vp")
    assert owned_size(ffi.new("char[]", 300)) == 300
    assert owned_size(ffi.from_buffer(bytearray(77))) == 77
    assert owned_size(ffi.from_buffer("struct mshv_run_vp *", bytearray(300))) == ffi.sizeof("struct mshv_run_vp")
    assert owned_size(0) == owned_size(None) == owned_size(0x1000) == 0


def _hvcall_arg(in_ptr: int, out_ptr: int = 0, out_sz: int = 0, code: int = int(lib.HVCALL_GET_PARTITION_PROPERTY)) -> Any:
    call = ffi.new("struct mshv_root_hvcall *")
    call.code, call.in_sz, call.in_ptr = code, ffi.sizeof("struct hv_input_get_partition_property"), in_ptr
    call.out_ptr, call.out_sz = out_ptr, out_sz
    return call


def test_nested_pointers_are_efault(guest: Guest) -> None:
    b = guest.backend
    good_in = ffi.new("struct hv_input_get_partition_property *")
    good_in.property_code = lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS
    in_ptr = int(ffi.cast("uintptr_t", good_in))
    for bad in (_no_access_address(), KERNEL_ADDRESS):
        assert _errno(b, guest.part, lib.MSHV_ROOT_HVCALL, _hvcall_arg(bad)) == errno.EFAULT
        assert _errno(b, guest.part, lib.MSHV_ROOT_HVCALL, _hvcall_arg(in_ptr, bad, 8)) == errno.EFAULT
        bitmap = ffi.new("struct mshv_gpap_access_bitmap *")
        bitmap.access_type, bitmap.access_op, bitmap.page_count, bitmap.bitmap_ptr = 0, 0, 8, bad
        assert _errno(b, guest.part, lib.MSHV_GET_GPAP_ACCESS_BITMAP, bitmap) == errno.EFAULT
        assert _errno(b, guest.part, lib.MSHV_SET_MSI_ROUTING, bad) == errno.EFAULT
    # A routing table header whose entries would lie on a page the caller cannot read.
    import ctypes

    pages = mmap.mmap(-1, 2 * 4096)
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(pages)))
    header = base + 4096 - ffi.sizeof("struct mshv_user_irq_table")
    ffi.cast("struct mshv_user_irq_table *", header).nr = 1
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + 4096), 4096, 0) == 0   # PROT_NONE
    try:
        assert _errno(b, guest.part, lib.MSHV_SET_MSI_ROUTING, header) == errno.EFAULT
    finally:
        ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + 4096), 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        pages.close()
    page = mmap.mmap(-1, 4096)
    try:
        state = ffi.new("struct mshv_get_set_vp_state *")
        state.type, state.buf_sz, state.buf_ptr = lib.MSHV_VP_STATE_LAPIC, 4096, _no_access_address() & ~0xFFF
        assert _errno(b, guest.vp, lib.MSHV_GET_VP_STATE, state) == errno.EFAULT
        readonly = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
        state.buf_ptr = int(ffi.cast("uintptr_t", ffi.from_buffer(readonly)))
        assert _errno(b, guest.vp, lib.MSHV_SET_VP_STATE, state) == errno.EFAULT   # pinned for writing, SET too
        readonly.close()
    finally:
        page.close()


def test_guest_memory_that_cannot_be_pinned_is_efault(guest: Guest) -> None:
    import ctypes

    area = mmap.mmap(-1, 16 * 4096)
    try:
        region = ffi.new("struct mshv_user_mem_region *")
        region.size, region.guest_pfn = 16 * 4096, 0x100
        region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(area)))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mprotect(ctypes.c_void_p(region.userspace_addr + 8 * 4096), 8 * 4096, 0) == 0   # PROT_NONE
        # Half of it cannot be pinned for writing: EFAULT, and the host is not touched.
        assert _errno(guest.backend, guest.part, lib.MSHV_SET_GUEST_MEMORY, region) == errno.EFAULT
        libc.mprotect(ctypes.c_void_p(region.userspace_addr + 8 * 4096), 8 * 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        region.userspace_addr = _unmapped_address() & ~0xFFF
        assert _errno(guest.backend, guest.part, lib.MSHV_SET_GUEST_MEMORY, region) == errno.EINVAL   # not in a VMA
    finally:
        area.close()


# ---- guest memory regions
def _region(area: mmap.mmap, gfn: int, pages: int, offset_pages: int = 0, unmap: bool = False) -> Any:
    region = ffi.new("struct mshv_user_mem_region *")
    region.size, region.guest_pfn = pages * 4096, gfn
    region.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(area))) + offset_pages * 4096
    region.flags = (1 << lib.MSHV_SET_MEM_BIT_WRITABLE) | ((1 << lib.MSHV_SET_MEM_BIT_UNMAP) if unmap else 0)
    return region


def test_unmap_rules(guest: Guest) -> None:
    newest = guest.backend.profile.name == "newest"
    area = mmap.mmap(-1, 64 * 4096)
    b = guest.backend
    try:
        b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x100, 16))
        # A frame inside the region but not its start: EINVAL (the paranoia check), in both.
        assert _errno(b, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x104, 16, unmap=True)) == errno.EINVAL
        # Where no region is: ENOENT in the newest driver, EINVAL in 6.15.
        missing = _errno(b, guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x900, 16, unmap=True))
        assert missing == (errno.ENOENT if newest else errno.EINVAL)
        b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x100, 16, unmap=True))
    finally:
        area.close()


def test_overlap_rules(guest: Guest) -> None:
    newest = guest.backend.profile.name == "newest"
    area = mmap.mmap(-1, 64 * 4096)
    b = guest.backend
    try:
        b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x104, 4, offset_pages=40))
        # A new region enclosing the old one: the newest driver checks the interval (EEXIST);
        # 6.15 looked up only the new region's first and last frame and let it through.
        enclosing = _region(area, 0x100, 16)
        if newest:
            assert _errno(b, guest.part, lib.MSHV_SET_GUEST_MEMORY, enclosing) == errno.EEXIST
        else:
            b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, enclosing)
            b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, 0x100, 16, unmap=True))
        # The same user pages at other guest frames: allowed by the newest driver, EEXIST in 6.15.
        alias = _region(area, 0x800, 4, offset_pages=40)
        if newest:
            b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, alias)
        else:
            assert _errno(b, guest.part, lib.MSHV_SET_GUEST_MEMORY, alias) == errno.EEXIST
    finally:
        for gfn, offset in ((0x800, 40), (0x104, 40)):
            try:
                b.ioctl(guest.part, lib.MSHV_SET_GUEST_MEMORY, _region(area, gfn, 4, offset_pages=offset, unmap=True))
            except ErrnoError:
                pass
        area.close()


# ---- eventfds are identified by their context
def _irqfd(fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None) -> Any:
    arg = ffi.new("struct mshv_user_irqfd *")
    arg.fd, arg.gsi = fd, gsi
    flags = (1 << lib.MSHV_IRQFD_BIT_DEASSIGN) if deassign else 0
    if resamplefd is not None:
        arg.resamplefd, flags = resamplefd, flags | (1 << lib.MSHV_IRQFD_BIT_RESAMPLE)
    arg.flags = flags
    return arg


def _level_route(guest: Guest, gsi: int) -> None:
    table = ffi.new("char[]", ffi.sizeof("struct mshv_user_irq_table") + ffi.sizeof("struct mshv_user_irq_entry"))
    t = ffi.cast("struct mshv_user_irq_table *", table)
    t.nr = 1
    t.entries[0].gsi, t.entries[0].address_lo, t.entries[0].data = gsi, 0xFEE00000, 0x30 | (1 << 15)
    guest.backend.ioctl(guest.part, lib.MSHV_SET_MSI_ROUTING, t)


def test_irqfd_rules(guest: Guest) -> None:
    newest = guest.backend.profile.name == "newest"
    b = guest.backend
    efd, resample = os.eventfd(0), os.eventfd(0)
    dup = os.dup(efd)
    read_end, write_end = os.pipe()
    closed = CLOSED_FD
    try:
        assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(closed, 1)) == errno.EBADF
        assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(read_end, 1)) == errno.EINVAL   # a pipe is no eventfd
        b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(efd, 1))
        assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(dup, 2)) == errno.EBUSY   # the same eventfd, any GSI
        # A bad resample fd is reported before the busy check.
        assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(dup, 1, resamplefd=closed)) == errno.EBADF
        b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(efd, 7, deassign=True))   # nothing there: still 0
        b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(dup, 1, deassign=True))   # through the dup
        _level_route(guest, 3)
        if newest:
            b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(efd, 3, resamplefd=resample))
            assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(dup, 3, resamplefd=resample)) == errno.EBUSY
            b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(efd, 3, deassign=True))
        else:   # 6.15 refused every resample irqfd, before looking for a busy one
            assert _errno(b, guest.part, lib.MSHV_IRQFD, _irqfd(efd, 3, resamplefd=resample)) == errno.EINVAL
        b.ioctl(guest.part, lib.MSHV_IRQFD, _irqfd(dup, 5))
    finally:
        for fd in (efd, resample, dup, read_end, write_end):
            os.close(fd)


def _ioeventfd(fd: int, address: int, deassign: bool = False, length: int = 4) -> Any:
    arg = ffi.new("struct mshv_user_ioeventfd *")
    arg.fd, arg.addr, arg.len = fd, address, length
    arg.flags = (1 << lib.MSHV_IOEVENTFD_BIT_DEASSIGN) if deassign else 0
    return arg


def test_ioeventfd_rules(newest: Guest) -> None:
    b, part = newest.backend, newest.part
    efd, other = os.eventfd(0), os.eventfd(0)
    dup = os.dup(efd)
    read_end, write_end = os.pipe()
    closed = CLOSED_FD
    try:
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(efd, 0xD0000000, length=3)) == errno.EINVAL
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(efd, (1 << 64) - 2)) == errno.EINVAL   # wraps
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(closed, 0xD0000000)) == errno.EBADF
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(read_end, 0xD0000000)) == errno.EINVAL
        b.ioctl(part, lib.MSHV_IOEVENTFD, _ioeventfd(efd, 0xD0000000))
        # The same trigger with another eventfd collides: which eventfd does not matter.
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(other, 0xD0000000)) == errno.EEXIST
        # Deassign validates the fd, matches by eventfd (a dup works), and says ENOENT for nothing.
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(closed, 0xD0000000, deassign=True)) == errno.EBADF
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(read_end, 0xD0000000, deassign=True)) == errno.EINVAL
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(other, 0xD0000000, deassign=True)) == errno.ENOENT
        b.ioctl(part, lib.MSHV_IOEVENTFD, _ioeventfd(dup, 0xD0000000, deassign=True))
        assert _errno(b, part, lib.MSHV_IOEVENTFD, _ioeventfd(efd, 0xD0000000, deassign=True)) == errno.ENOENT
    finally:
        for fd in (efd, other, dup, read_end, write_end):
            os.close(fd)


# ---- the VP
def test_vp_state_page_limit_and_size_written_back(newest: Guest) -> None:
    from mshvstack.backend.sim import VP_STATE_PAGE_LIMIT

    assert VP_STATE_PAGE_LIMIT == 507   # (4096 - 40) / 8
    big = mmap.mmap(-1, (VP_STATE_PAGE_LIMIT + 1) * 4096)
    try:
        state = ffi.new("struct mshv_get_set_vp_state *")
        state.type, state.buf_ptr = lib.MSHV_VP_STATE_LAPIC, int(ffi.cast("uintptr_t", ffi.from_buffer(big)))
        state.buf_sz = (VP_STATE_PAGE_LIMIT + 1) * 4096
        assert _errno(newest.backend, newest.vp, lib.MSHV_GET_VP_STATE, state) == errno.EINVAL
        assert state.buf_sz == 4096   # the size it needs was written back first
        state.buf_sz = VP_STATE_PAGE_LIMIT * 4096
        newest.backend.ioctl(newest.vp, lib.MSHV_GET_VP_STATE, state)
    finally:
        del state
        big.close()


def test_a_second_run_waits_for_the_first() -> None:
    """MSHV_RUN_VP takes the VP's mutex: a second caller waits, it does not fail."""
    g = Guest(SimBackend())
    try:
        g.ram[0x1000:0x1002] = b"\xeb\xfe"   # jmp $: runs until kicked
        set_registers(g.backend, g.vp, {lib.HV_X64_REGISTER_RIP: 0x1000, lib.HV_X64_REGISTER_RFLAGS: 2})
        results: list[int] = []

        def run() -> None:
            with pytest.raises(ErrnoError) as info:
                g.run()
            results.append(info.value.errno)

        first, second = threading.Thread(target=run), threading.Thread(target=run)
        first.start()
        time.sleep(0.2)
        second.start()
        time.sleep(0.3)
        assert results == [], "the second run must wait, not fail with EBUSY"
        g.backend.kick(g.vp)
        first.join(timeout=10)
        assert results == [errno.EINTR]
        deadline = time.monotonic() + 10
        while second.is_alive():   # now the second runs the guest, until its own kick
            g.backend.kick(g.vp)
            second.join(timeout=0.2)
            assert time.monotonic() < deadline
        assert results == [errno.EINTR, errno.EINTR]
    finally:
        g.close()


# ---- partitions and the passthrough
def test_create_vp_needs_an_initialized_partition_and_initialize_is_idempotent() -> None:
    b = SimBackend()
    dev = b.open()
    part = b.ioctl(dev, lib.MSHV_CREATE_PARTITION, ffi.new("struct mshv_create_partition *"))
    try:
        assert _errno(b, part, lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *")) == errno.EIO
        assert b.ioctl(part, lib.MSHV_INITIALIZE_PARTITION, 0) == 0
        assert b.ioctl(part, lib.MSHV_INITIALIZE_PARTITION, 0) == 0
        b.close(b.ioctl(part, lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *")))
    finally:
        b.close(part)
        b.close(dev)


def test_an_fd_that_is_not_mshv(newest: Guest) -> None:
    with open(os.devnull) as other:
        assert _errno(newest.backend, other.fileno(), lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *")) == errno.ENOTTY
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    assert _errno(newest.backend, closed, lib.MSHV_CREATE_VP, ffi.new("struct mshv_create_vp *")) == errno.EBADF


def _property_call(guest: Guest) -> tuple[Any, Any, Any]:
    inp = ffi.new("struct hv_input_get_partition_property *")
    inp.property_code = lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS
    out = ffi.new("struct hv_output_get_partition_property *")
    call = _hvcall_arg(int(ffi.cast("uintptr_t", inp)), int(ffi.cast("uintptr_t", out)), ffi.sizeof(out[0]))
    return call, inp, out


def test_call_pending_from_a_synchronous_code_is_ebadfd(guest: Guest) -> None:
    guest.backend.faults.fail_hvcall(int(lib.HVCALL_GET_PARTITION_PROPERTY), int(lib.HV_STATUS_CALL_PENDING), times=1)
    call, _inp, _out = _property_call(guest)
    assert _errno(guest.backend, guest.part, lib.MSHV_ROOT_HVCALL, call) == errno.EBADFD
    assert call.status == 0   # nothing was copied back


def test_insufficient_memory_in_the_passthrough(guest: Guest) -> None:
    """The newest driver deposits memory and retries (the caller sees success);
    6.15 deposited a page and returned EAGAIN with the status."""
    guest.backend.faults.fail_hvcall(int(lib.HVCALL_GET_PARTITION_PROPERTY), int(lib.HV_STATUS_INSUFFICIENT_MEMORY), times=1)
    call, _inp, out = _property_call(guest)
    if guest.backend.profile.name == "newest":
        guest.backend.ioctl(guest.part, lib.MSHV_ROOT_HVCALL, call)
        assert call.status == 0 and out.property_value != 0
    else:
        assert _errno(guest.backend, guest.part, lib.MSHV_ROOT_HVCALL, call) == errno.EAGAIN
        assert call.status == lib.HV_STATUS_INSUFFICIENT_MEMORY
        retry, _inp2, out2 = _property_call(guest)   # the caller retries, as 6.15 expected
        guest.backend.ioctl(guest.part, lib.MSHV_ROOT_HVCALL, retry)
        assert retry.status == 0 and out2.property_value != 0


def test_the_device_passthrough_exists_only_in_the_newest_driver(guest: Guest) -> None:
    if guest.backend.profile.name == "newest":
        inp = ffi.new("struct hv_input_get_partition_property *")
        inp.property_code = lib.HV_PARTITION_PROPERTY_VMM_CAPABILITIES
        out = ffi.new("struct hv_output_get_partition_property *")
        call = _hvcall_arg(int(ffi.cast("uintptr_t", inp)), int(ffi.cast("uintptr_t", out)), ffi.sizeof(out[0]))
        guest.backend.ioctl(guest.dev, lib.MSHV_ROOT_HVCALL, call)   # the self allowlist
        refused = _hvcall_arg(int(ffi.cast("uintptr_t", inp)), code=int(lib.HVCALL_INSTALL_INTERCEPT))
        assert _errno(guest.backend, guest.dev, lib.MSHV_ROOT_HVCALL, refused) == errno.EINVAL
    else:
        assert _errno(guest.backend, guest.dev, lib.MSHV_ROOT_HVCALL, 0) == errno.ENOTTY   # before any copy


def test_the_hypercall_layer_retries_a_6_15_eagain() -> None:
    """6.15 answers INSUFFICIENT_MEMORY with a deposit and EAGAIN; its callers issue again."""
    from mshvstack.hvcall import calls
    from mshvstack.partition import Mshv, PartitionConfig

    with Mshv.open(SimBackend(profile="6.15"), "6.15") as mshv, mshv.create_partition(PartitionConfig()) as part:
        mshv.backend.faults.fail_hvcall(int(lib.HVCALL_GET_PARTITION_PROPERTY), int(lib.HV_STATUS_INSUFFICIENT_MEMORY), times=2)
        assert calls.get_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS) != 0


# ---- what the hypervisor decides
def test_rep_counts_must_match_the_kind_of_hypercall(newest: Guest) -> None:
    """A simple hypercall with a rep count, or a rep hypercall without one, is
    HV_STATUS_INVALID_HYPERCALL_INPUT (EINVAL from the driver)."""
    call, _inp, _out = _property_call(newest)
    call.reps = 1   # GET_PARTITION_PROPERTY is a simple call
    assert _errno(newest.backend, newest.part, lib.MSHV_ROOT_HVCALL, call) == errno.EINVAL
    assert call.status == lib.HV_STATUS_INVALID_HYPERCALL_INPUT
    inp = ffi.new("struct hv_input_get_vp_registers *")
    inp.vp_index = 0
    raw = bytes(ffi.buffer(inp)) + int(lib.HV_X64_REGISTER_RAX).to_bytes(4, "little") + bytes(4)
    buf = ffi.from_buffer(bytearray(raw))
    out = ffi.new("char[16]")
    rep = ffi.new("struct mshv_root_hvcall *")
    rep.code, rep.in_sz, rep.in_ptr = lib.HVCALL_GET_VP_REGISTERS, len(raw), int(ffi.cast("uintptr_t", buf))
    rep.out_sz, rep.out_ptr, rep.reps = 16, int(ffi.cast("uintptr_t", out)), 0   # a rep call without a count
    assert _errno(newest.backend, newest.part, lib.MSHV_ROOT_HVCALL, rep) == errno.EINVAL
    assert rep.status == lib.HV_STATUS_INVALID_HYPERCALL_INPUT
    rep.status, rep.reps = 0, 1
    newest.backend.ioctl(newest.part, lib.MSHV_ROOT_HVCALL, rep)
    assert rep.status == 0 and rep.reps == 1


def test_privilege_flags_are_fixed_once_initialized() -> None:
    from mshvstack.hvcall import HvError, calls
    from mshvstack.partition import Mshv, PartitionConfig

    with Mshv.open("sim") as mshv, mshv.create_partition(PartitionConfig()) as part:
        flags = calls.get_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS)
        calls.set_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS, flags)   # before: allowed
        part.initialize()
        with pytest.raises(HvError) as info:
            calls.set_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS, flags)
        assert info.value.status == lib.HV_STATUS_INVALID_PARTITION_STATE
