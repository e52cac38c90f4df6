"""The simulated /dev/mshv: the mshv_root driver's ioctls on the same structs.

    from mshvstack.backend.sim import SimBackend
    backend = SimBackend(profile="newest")
    fd = backend.open()          # then MSHV_CREATE_PARTITION etc., unchanged

Validation follows the driver (mshv_abi.md sections 1-3): the same bad input
gets the same errno.  Behind it, hypervisor.py models the hypervisor and a
CPU engine (Unicorn) executes the guest.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.abi.profiles import AbiProfile
from mshvstack.abi.profiles import profile as lookup_profile
from mshvstack.backend.ioctls import FdKind, explain, request_name, requests_for
from mshvstack.backend.sim import vpstate
from mshvstack.backend.sim.engines.unicorn import tsc_hz
from mshvstack.backend.sim.eventfds import IrqfdWorker, MsiRoute, NotAnEventfd, eventfd_context
from mshvstack.backend.sim.faults import FaultPlan
from mshvstack.backend.sim.hypervisor import Doorbell, SimPartition, VpExists
from mshvstack.backend.sim.memory import PAGE_SHIFT, PAGE_SIZE
from mshvstack.backend.sim.usercopy import (
    UserFault,
    access_ok,
    address_of,
    copy_from_user,
    copy_to_user,
    owned_size,
    user_range_writable,
)
from mshvstack.backend.sim.vp import Kicked, SimVp
from mshvstack.backend.sim.vpstate import StateBlob, VpStateError
from mshvstack.errors import ErrnoError

__all__ = ["SimBackend"]

MAX_VPS = 256
MAX_GSIS = 4096
MAX_HVCALL_BYTES = 4096
DEPOSIT_RETRIES = 64   # the newest driver's deposit-and-retry loop, bounded here
# HV_{GET,SET}_VP_STATE_BATCH_SIZE: the pfns that fit in one hypercall input page.
VP_STATE_PAGE_LIMIT = (4096 - ffi.sizeof("struct hv_input_get_vp_state")) // ffi.sizeof("uint64_t")


class _Fail(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


# The struct each ioctl's argument points at, and whether the driver copies it in
# (MSHV_RUN_VP's struct mshv_run_vp is only written, after the call: nothing to copy).
_ARG_STRUCTS: dict[str, tuple[str | None, bool]] = {
    "MSHV_CREATE_PARTITION": ("struct mshv_create_partition", True),
    "MSHV_ROOT_HVCALL": ("struct mshv_root_hvcall", True),
    "MSHV_INITIALIZE_PARTITION": (None, False),
    "MSHV_CREATE_VP": ("struct mshv_create_vp", True),
    "MSHV_SET_GUEST_MEMORY": ("struct mshv_user_mem_region", True),
    "MSHV_IRQFD": ("struct mshv_user_irqfd", True),
    "MSHV_IOEVENTFD": ("struct mshv_user_ioeventfd", True),
    "MSHV_SET_MSI_ROUTING": ("struct mshv_user_irq_table", True),   # the header; entries follow
    "MSHV_GET_GPAP_ACCESS_BITMAP": ("struct mshv_gpap_access_bitmap", True),
    "MSHV_RUN_VP": (None, False),
    "MSHV_GET_VP_STATE": ("struct mshv_get_set_vp_state", True),
    "MSHV_SET_VP_STATE": ("struct mshv_get_set_vp_state", True),
}


class _UserArg:
    """An ioctl argument as the driver handles it: the caller's address, and the
    struct copied in with copy_from_user (EFAULT for NULL or unmapped memory)."""

    def __init__(self, arg: Any, ctype: str | None, copy_in: bool) -> None:
        self.caller = arg
        self.owned = owned_size(arg)
        self.kernel: Any = None
        if ctype:
            self.kernel = self.copy_in(ctype) if copy_in else ffi.new(f"{ctype} *")

    @functools.cached_property
    def address(self) -> int:
        """The caller's address (a cast costs a microsecond: only copies that need checking ask)."""
        return address_of(self.caller)

    def copy_in(self, ctype: str, offset: int = 0, count: int = 1) -> Any:
        """copy_from_user of ``count`` ``ctype``s at ``offset`` bytes into the argument."""
        size = ffi.sizeof(ctype) * count
        copy = ffi.new(f"{ctype}[]", count) if count != 1 else ffi.new(f"{ctype} *")
        if offset + size <= self.owned:
            ffi.memmove(copy, ffi.cast("char *", self.caller) + offset, size)
            return copy
        try:
            data = copy_from_user(self.address + offset, size)
        except UserFault:
            raise _Fail(errno.EFAULT) from None
        ffi.memmove(copy, data, size)
        return copy

    def copy_out(self, data: bytes, offset: int = 0) -> None:
        """copy_to_user at ``offset`` bytes into the argument."""
        if offset + len(data) <= self.owned:
            ffi.memmove(ffi.cast("char *", self.caller) + offset if offset else self.caller, data, len(data))
            return
        _copy_to(self.address + offset, data)


def _copy_to(address: int, data: bytes) -> None:
    try:
        copy_to_user(address, data)
    except UserFault:
        raise _Fail(errno.EFAULT) from None


def _copy_from(address: int, size: int) -> bytes:
    try:
        return copy_from_user(address, size)
    except UserFault:
        raise _Fail(errno.EFAULT) from None


@dataclass
class _Fd:
    kind: FdKind
    partition: SimPartition | None = None
    vp: SimVp | None = None
    irqfd: IrqfdWorker | None = None
    routes: dict[int, _Route] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.routes = _ROUTES[self.kind]   # looked up once: an Enum's hash is Python code, and ioctl runs per exit


def _user_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = line.split(None, 1)[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _in_vma(address: int) -> bool:
    return any(start <= address < end for start, end in _user_ranges())


class SimBackend:
    """A Backend whose fds are simulated mshv_root files."""

    name = "sim"

    def __init__(self, profile: str | AbiProfile = "newest") -> None:
        self.profile = lookup_profile(profile) if isinstance(profile, str) else profile
        self.faults = FaultPlan()
        self._fds: dict[int, _Fd] = {}
        self._lock = threading.Lock()   # the fd table's writers (a leaf: nothing is called with it held)

    # ---- fds: real, unique numbers (a /dev/null open) so they never collide
    def _new_fd(self, entry: _Fd) -> int:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            self._fds[fd] = entry
        return fd

    def _entry(self, fd: int) -> _Fd:
        entry = self._fds.get(fd)   # one dict read: atomic under the GIL (writers take the lock)
        if entry is None:
            raise _Fail(errno.EBADF)
        return entry

    def open(self) -> int:
        return self._new_fd(_Fd(FdKind.DEVICE))

    def close(self, fd: int) -> None:
        with self._lock:
            entry = self._fds.pop(fd, None)
        if entry is None:
            raise ErrnoError(errno.EBADF, "close", "not an fd of this backend")
        os.close(fd)
        if entry.kind is FdKind.PARTITION and entry.partition is not None:
            if entry.irqfd is not None:
                entry.irqfd.close()
            entry.partition.close()

    def mmap(self, fd: int, length: int, offset: int) -> memoryview:
        try:
            entry = self._entry(fd)
        except _Fail as exc:
            raise ErrnoError(exc.err, "mmap", "bad file descriptor") from None
        if entry.kind is not FdKind.VP or entry.vp is None:
            raise ErrnoError(errno.ENODEV, "mmap", "only VP fds can be mapped")
        page = offset // PAGE_SIZE
        if offset % PAGE_SIZE or length <= 0 or length > PAGE_SIZE:
            raise ErrnoError(errno.EINVAL, "mmap", "VP pages are one page at a page-aligned offset")
        if page == lib.MSHV_VP_MMAP_OFFSET_REGISTERS:
            return memoryview(entry.vp.register_page)[:length]
        if page == lib.MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE:
            return memoryview(entry.vp.intercept_page)[:length]
        if page == lib.MSHV_VP_MMAP_OFFSET_GHCB:
            raise ErrnoError(errno.ENODEV, "mmap", "this VP has no GHCB page (not an SNP partition)")
        raise ErrnoError(errno.EINVAL, "mmap", "offset is not a VP page (registers 0, intercept message 1, GHCB 2)")

    # ---- ioctl
    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        entry = self._fds.get(fd)   # (_entry, inline: ioctl runs per VP exit)
        if entry is None:
            # An open fd of something else (a file, /dev/null) does not know the request: ENOTTY.
            err = errno.ENOTTY if _is_open(fd) else errno.EBADF
            raise ErrnoError(err, request_name(request), explain(request_name(request), err))
        route = entry.routes.get(request)
        name = route.name if route is not None else request_name(request, entry.kind)
        try:
            if route is None or (route.device_hvcall and not self.profile.device_hvcalls):
                # (kernels before the /dev/mshv passthrough, 6.15, do not know MSHV_ROOT_HVCALL there)
                raise _Fail(errno.ENOTTY)
            if self.faults.ioctl_rules:
                injected = self.faults.ioctl_errno(name)
                if injected is not None:
                    raise _Fail(injected)
            return int(route.handler(self, entry, _UserArg(arg, route.ctype, route.copy_in)))
        except _Fail as exc:
            raise ErrnoError(exc.err, name, explain(name, exc.err)) from None

    # -- /dev/mshv
    def _create_partition(self, entry: _Fd, arg: _UserArg) -> int:
        v1 = arg.kernel
        flags = int(v1.pt_flags)
        if flags & ~self.profile.pt_flags_mask or v1.pt_isolation >= lib.MSHV_PT_ISOLATION_COUNT:
            raise _Fail(errno.EINVAL)
        fbanks, xsave = (0, 0), 0
        if flags & (1 << lib.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES):
            v2 = arg.copy_in("struct mshv_create_partition_v2")   # the driver copies the v2 struct again
            if v2.pt_flags != v1.pt_flags or v2.pt_isolation != v1.pt_isolation:
                raise _Fail(errno.EINVAL)   # changed between the copies
            if v2.pt_num_cpu_fbanks != lib.MSHV_NUM_CPU_FEATURES_BANKS or any(v2.pt_rsvd) or any(v2.pt_rsvd1):
                raise _Fail(errno.EINVAL)
            fbanks, xsave = (int(v2.pt_cpu_fbanks[0]), int(v2.pt_cpu_fbanks[1])), int(v2.pt_disabled_xsave)
        hv_flags = int(lib.HV_PARTITION_CREATION_FLAG_EXO_PARTITION | lib.HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED)
        for bit, hv in ((lib.MSHV_PT_BIT_LAPIC, lib.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED),
                        (lib.MSHV_PT_BIT_X2APIC, lib.HV_PARTITION_CREATION_FLAG_X2APIC_CAPABLE),
                        (lib.MSHV_PT_BIT_GPA_SUPER_PAGES, lib.HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED),
                        (lib.MSHV_PT_BIT_NESTED_VIRTUALIZATION, lib.HV_PARTITION_CREATION_FLAG_NESTED_VIRTUALIZATION_CAPABLE),
                        (lib.MSHV_PT_BIT_SMT_ENABLED_GUEST, lib.HV_PARTITION_CREATION_FLAG_SMT_ENABLED_GUEST)):
            if flags & (1 << bit):
                hv_flags |= int(hv)
        partition = SimPartition(hv_flags, fbanks, xsave)
        return self._new_fd(_Fd(FdKind.PARTITION, partition, irqfd=IrqfdWorker(partition)))

    # -- partition fd
    def _initialize(self, entry: _Fd, arg: _UserArg) -> int:
        assert entry.partition is not None
        entry.partition.initialized = True
        return 0

    def _create_vp(self, entry: _Fd, arg: _UserArg) -> int:
        partition = entry.partition
        assert partition is not None
        index = int(arg.kernel.vp_index)
        if index >= MAX_VPS:
            raise _Fail(errno.EINVAL)
        try:
            vp = partition.create_vp(index)
        except VpExists:
            raise _Fail(errno.EEXIST) from None
        if vp is None:
            raise _Fail(_status_errno(int(lib.HV_STATUS_INVALID_PARTITION_STATE)))   # HvCreateVp refuses
        return self._new_fd(_Fd(FdKind.VP, partition, vp))

    def _set_guest_memory(self, entry: _Fd, arg: _UserArg) -> int:
        partition = entry.partition
        assert partition is not None
        region = arg.kernel
        size, gfn, uaddr, flags = int(region.size), int(region.guest_pfn), int(region.userspace_addr), int(region.flags)
        if not size or size % mmap.PAGESIZE or uaddr % mmap.PAGESIZE or flags & ~lib.MSHV_SET_MEM_FLAGS_MASK or any(region.rsvd):
            raise _Fail(errno.EINVAL)
        pages = size >> PAGE_SHIFT
        if flags & (1 << lib.MSHV_SET_MEM_BIT_UNMAP):
            outcome = partition.remove_region(gfn, pages, uaddr)
            if outcome == "missing":
                raise _Fail(self.profile.missing_unmap_errno)
            if outcome == "mismatch":
                raise _Fail(errno.EINVAL)
            return 0
        if not access_ok(uaddr, size) or not _in_vma(uaddr):
            raise _Fail(errno.EINVAL)   # access_ok, then vma_lookup of the first byte
        # 6.15 looks up only the new region's first and last frame and byte in the old regions.
        endpoints_only = self.profile.overlap_endpoints_only
        if partition.overlaps(gfn, pages, uaddr, endpoints_only):
            raise _Fail(errno.EEXIST)
        if not user_range_writable(uaddr, size):
            raise _Fail(errno.EFAULT)   # the pages cannot be pinned (FOLL_WRITE)
        if not partition.initialized:
            # HvMapGpaPages on a partition not yet initialized; the driver frees the region again.
            raise _Fail(_status_errno(int(lib.HV_STATUS_INVALID_PARTITION_STATE)))
        writable = bool(flags & (1 << lib.MSHV_SET_MEM_BIT_WRITABLE))
        executable = bool(flags & (1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE))
        if not partition.add_region(gfn, pages, uaddr, writable, executable, endpoints_only):
            raise _Fail(errno.EEXIST)   # mapped meanwhile by another thread
        return 0

    def _irqfd(self, entry: _Fd, arg: _UserArg) -> int:
        req = arg.kernel
        flags = int(req.flags)
        if flags & ~lib.MSHV_IRQFD_FLAGS_MASK:
            raise _Fail(errno.EINVAL)
        gsi = int(req.gsi)
        worker = entry.irqfd
        assert worker is not None
        context = _eventfd(int(req.fd))
        if flags & (1 << lib.MSHV_IRQFD_BIT_DEASSIGN):
            worker.deassign(context, gsi)
            return 0
        resamplefd = None
        if flags & (1 << lib.MSHV_IRQFD_BIT_RESAMPLE):
            resamplefd = int(req.resamplefd)
            _eventfd(resamplefd)
            if self.profile.resample_checked_first:
                raise _Fail(errno.EINVAL)   # 6.15 tested the route's trigger mode before looking the route up
        if worker.bound(context):
            raise _Fail(errno.EBUSY)   # this eventfd (or a dup of it) is bound already, to any GSI
        if resamplefd is not None:
            route = worker.routes.get(gsi)
            if route is None or not route.level_triggered:
                raise _Fail(errno.EINVAL)
        worker.assign(int(req.fd), context, gsi, resamplefd)
        return 0

    def _ioeventfd(self, entry: _Fd, arg: _UserArg) -> int:
        req = arg.kernel
        flags, length, address = int(req.flags), int(req.len), int(req.addr)
        if flags & ~lib.MSHV_IOEVENTFD_FLAGS_MASK or any(req.rsvd):
            raise _Fail(errno.EINVAL)
        if flags & (1 << lib.MSHV_IOEVENTFD_BIT_PIO):
            raise _Fail(errno.EOPNOTSUPP)
        partition = entry.partition
        assert partition is not None
        matching = int(req.datamatch) if flags & (1 << lib.MSHV_IOEVENTFD_BIT_DATAMATCH) else None
        if flags & (1 << lib.MSHV_IOEVENTFD_BIT_DEASSIGN):
            gone = partition.remove_doorbell(_eventfd(int(req.fd)), address, length, matching)
            if gone is None:
                raise _Fail(errno.ENOENT)
            os.close(gone.fd)
            return 0
        if length not in (0, 1, 2, 4, 8) or address + length > (1 << 64) - 1:
            raise _Fail(errno.EINVAL)
        context = _eventfd(int(req.fd))
        doorbell = Doorbell(address, length, os.dup(int(req.fd)), context, matching)
        if not partition.add_doorbell(doorbell):
            os.close(doorbell.fd)
            raise _Fail(errno.EEXIST)
        return 0

    def _msi_routing(self, entry: _Fd, arg: _UserArg) -> int:
        table = arg.kernel
        count = int(table.nr)
        if count > MAX_GSIS or table.rsvd:
            raise _Fail(errno.EINVAL)
        entries = arg.copy_in("struct mshv_user_irq_entry", ffi.sizeof("struct mshv_user_irq_table"), count) if count else []
        routes: dict[int, MsiRoute] = {}
        for i in range(count):
            e = entries[i]
            if e.gsi >= MAX_GSIS or e.address_hi or int(e.gsi) in routes:
                raise _Fail(errno.EINVAL)
            routes[int(e.gsi)] = MsiRoute(int(e.address_lo), int(e.data))
        assert entry.irqfd is not None
        entry.irqfd.set_routes(routes)
        return 0

    def _gpap_bitmap(self, entry: _Fd, arg: _UserArg) -> int:
        partition = entry.partition
        assert partition is not None
        req = arg.kernel
        if (req.access_type >= lib.MSHV_GPAP_ACCESS_TYPE_COUNT or req.access_op >= lib.MSHV_GPAP_ACCESS_OP_COUNT
                or any(req.rsvd) or not req.page_count or not req.bitmap_ptr):
            raise _Fail(errno.EINVAL)
        count, base = int(req.page_count), int(req.gpap_base)
        if count > (1 << 40):
            raise _Fail(errno.E2BIG)
        # As the driver does: one rep hypercall whose flags carry the operation.
        dirty = req.access_type == lib.MSHV_GPAP_ACCESS_TYPE_DIRTY
        inp = ffi.new("struct hv_input_get_gpa_pages_access_state *")
        inp.hv_gpa_page_number = base
        flags = inp.flags.bits
        if req.access_op == lib.MSHV_GPAP_ACCESS_OP_CLEAR:
            flags.clear_dirty = 1
            flags.clear_accessed = int(not dirty)
        else:  # the driver's "set" branch, NOOP included (mshv_abi.md 1.2)
            flags.set_accessed = 1
            flags.set_dirty = int(dirty)
        result = partition.hypercall(int(lib.HVCALL_GET_GPA_PAGES_ACCESS_STATES), bytes(ffi.buffer(inp)), count, 0)
        if result.status != 0:
            raise _Fail(_status_errno(result.status))
        bit = 0b10 if dirty else 0b01
        bitmap = bytearray((count + 7) // 8)
        for i, state in enumerate(result.output):
            if state & bit:
                bitmap[i // 8] |= 1 << (i % 8)
        _copy_to(int(req.bitmap_ptr), bytes(bitmap))
        return 0

    def _root_hvcall(self, entry: _Fd, arg: _UserArg) -> int:
        call = arg.kernel
        code = int(call.code)
        on_device = entry.kind is FdKind.DEVICE
        if (call.status or not call.in_ptr or call.in_sz < 8 or call.in_sz > MAX_HVCALL_BYTES or any(call.rsvd)
                or (call.out_ptr and (not call.out_sz or call.out_sz > MAX_HVCALL_BYTES))
                or not self.profile.allows(code, on_device)
                or (code in self.profile.async_hvcalls and entry.kind is not FdKind.PARTITION)):
            raise _Fail(errno.EINVAL)
        data = bytearray(_copy_from(int(call.in_ptr), int(call.in_sz)))
        partition_id = (1 << 64) - 1 if on_device else id(entry.partition)
        data[0:8] = partition_id.to_bytes(8, "little")
        reps = int(call.reps)
        for _attempt in range(DEPOSIT_RETRIES):
            status, output, done = self._issue(entry, code, bytes(data), reps, on_device)
            if status == lib.HV_STATUS_CALL_PENDING and code not in self.profile.async_hvcalls:
                raise _Fail(errno.EBADFD)   # "this shouldn't happen": nothing is copied back
            if status != lib.HV_STATUS_INSUFFICIENT_MEMORY or not self.profile.deposit_retried:
                break
            # The newest driver deposits memory into the partition and issues the call again.
        else:
            raise _Fail(errno.ENOMEM)   # the hypervisor kept asking for memory: the deposit failed
        call.status = status & 0xFFFF
        call.reps = done if reps else 0
        arg.copy_out(bytes(ffi.buffer(call)))   # status and reps go back even when the call failed
        if call.out_ptr and (status == 0 or self.profile.output_copied_on_failure):
            out = output[: int(call.out_sz)].ljust(int(call.out_sz), b"\0")  # the whole output page slice
            _copy_to(int(call.out_ptr), out)
        if status == 0:
            return 0
        if status == lib.HV_STATUS_INSUFFICIENT_MEMORY:
            raise _Fail(errno.EAGAIN)   # 6.15: one page deposited, the caller retries
        raise _Fail(_status_errno(status))

    def _issue(self, entry: _Fd, code: int, data: bytes, reps: int, on_device: bool) -> tuple[int, bytes, int]:
        """One passthrough hypercall: (status, output, reps done)."""
        injected = self.faults.hvcall_status(code)
        limit = self.faults.rep_limit(code)
        if injected is not None:
            status, output, done = injected, b"", 0
        elif on_device:
            status, output, done = self._root_partition_property(data)
        else:
            assert entry.partition is not None
            result = entry.partition.hypercall(code, data, max(reps, 1), 0, rep_count_given=bool(reps))
            status, output, done = result.status, result.output, result.reps
            # hv_do_rep_hypercall (both drivers) re-issues from the completed count while
            # the hypervisor returns success with reps left.
            while reps and status == 0 and done < reps:
                more = entry.partition.hypercall(code, data, reps, done)
                if more.reps <= done:
                    break   # no progress: report what was done
                element = len(more.output) // reps
                output = output[: done * element] + more.output[done * element :]
                status, done = more.status, more.reps
            if limit is not None and reps and limit < done:
                done = limit
                output = output[: len(output) * limit // max(reps, 1)]
                status = int(lib.HV_STATUS_TIME_OUT)
        return status, output, done

    def _root_partition_property(self, data: bytes) -> tuple[int, bytes, int]:
        code = int.from_bytes(data[8:12], "little")
        if code == lib.HV_PARTITION_PROPERTY_VMM_CAPABILITIES:
            return 0, (1).to_bytes(8, "little"), 0
        if code == lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY:
            return 0, tsc_hz().to_bytes(8, "little"), 0
        return int(lib.HV_STATUS_UNKNOWN_PROPERTY), b"", 0

    # -- VP fd
    def _run_vp(self, entry: _Fd, arg: _UserArg) -> int:
        vp = entry.vp
        assert vp is not None
        try:
            message = vp.run()   # a second MSHV_RUN_VP waits for the first, as on the driver's VP mutex
        except Kicked:
            raise _Fail(errno.EINTR) from None
        arg.copy_out(message)   # after the run, as the driver does (struct mshv_run_vp is the message)
        return 0

    def _vp_state(self, entry: _Fd, arg: _UserArg, write: bool) -> int:
        vp = entry.vp
        assert vp is not None
        req = arg.kernel
        kind = int(req.type)
        if kind >= lib.MSHV_VP_STATE_COUNT or any(req.rsvd) or not req.buf_sz or req.buf_sz % PAGE_SIZE or req.buf_ptr % PAGE_SIZE:
            raise _Fail(errno.EINVAL)
        required = vpstate.required_size(vp, StateBlob(kind))
        given = int(req.buf_sz)
        if not access_ok(int(req.buf_ptr), given):
            raise _Fail(errno.EFAULT)
        req.buf_sz = required
        arg.copy_out(bytes(ffi.buffer(ffi.addressof(req, "buf_sz"), ffi.sizeof("uint32_t"))), ffi.offsetof("struct mshv_get_set_vp_state", "buf_sz"))
        if given < required:
            raise _Fail(errno.EINVAL)
        if given // PAGE_SIZE > VP_STATE_PAGE_LIMIT:
            raise _Fail(errno.EINVAL)   # the hypercall's page list holds no more
        user = int(req.buf_ptr)
        if not user_range_writable(user, given):
            raise _Fail(errno.EFAULT)   # pin_user_pages_fast(FOLL_WRITE), for GET and SET alike
        state = StateBlob(kind)
        try:
            if write:
                vpstate.set_state(vp, state, _copy_from(user, given))
            else:
                _copy_to(user, vpstate.get_state(vp, state)[: min(given, required)])
        except VpStateError:
            raise _Fail(errno.EIO) from None   # the hypercall fails (e.g. a SynIC page outside RAM)
        return 0

    def _get_vp_state(self, entry: _Fd, arg: _UserArg) -> int:
        return self._vp_state(entry, arg, write=False)

    def _set_vp_state(self, entry: _Fd, arg: _UserArg) -> int:
        return self._vp_state(entry, arg, write=True)

    # ---- helpers for users of the simulator (tests, the machine)
    def vp_of(self, fd: int) -> SimVp:
        """The simulated VP behind a VP fd (for kicks and inspection)."""
        entry = self._entry(fd)
        if entry.vp is None:
            raise ValueError(f"fd {fd} is not a VP fd")
        return entry.vp

    def engine_time(self) -> dict[str, float]:
        """Seconds every VP's engine ran (of those, in Python scanning new blocks), and the blocks scanned, for --stats."""
        with self._lock:
            engines = [e.vp.engine for e in self._fds.values() if e.vp is not None and e.vp.engine is not None]
        return {"engine_s": sum(e.time.running for e in engines), "block_scan_s": sum(e.time.scanning for e in engines),
                "blocks": float(sum(e.time.blocks for e in engines)),
                "blocks_filtered": float(sum(e.blocks_filtered for e in engines)),
                "blocks_redone": float(sum(e.blocks_redone[0] for e in engines)),
                "blocks_redone_alone": float(sum(e.blocks_redone[1] for e in engines))}

    def host_wrote(self, partition_fd: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Every VP drops its translations of code in the bytes the host wrote."""
        entry = self._fds.get(partition_fd)
        if entry is not None and entry.partition is not None:
            entry.partition.engines.code_written(ranges)

    def kick(self, vp_fd: int, thread_id: int = 0) -> None:
        """What a signal to the thread in MSHV_RUN_VP does on the real driver."""
        self.vp_of(vp_fd).kick()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _eventfd(fd: int) -> int:
    """The eventfd's context, or the driver's errno for an fd that is none (EBADF, EINVAL)."""
    try:
        return eventfd_context(fd)
    except NotAnEventfd as exc:
        raise _Fail(exc.err) from None


def _status_errno(status: int) -> int:
    if status in (lib.HV_STATUS_INVALID_HYPERCALL_CODE, lib.HV_STATUS_INVALID_HYPERCALL_INPUT, lib.HV_STATUS_INVALID_PARAMETER,
                  lib.HV_STATUS_INVALID_PARTITION_ID, lib.HV_STATUS_INVALID_VP_INDEX, lib.HV_STATUS_INVALID_PORT_ID,
                  lib.HV_STATUS_INVALID_CONNECTION_ID, lib.HV_STATUS_INVALID_LP_INDEX, lib.HV_STATUS_INVALID_REGISTER_VALUE):
        return errno.EINVAL
    if status == lib.HV_STATUS_INSUFFICIENT_MEMORY:
        return errno.ENOMEM
    return errno.EIO


_HANDLERS: dict[FdKind, dict[str, Any]] = {
    FdKind.DEVICE: {"MSHV_CREATE_PARTITION": SimBackend._create_partition, "MSHV_ROOT_HVCALL": SimBackend._root_hvcall},
    FdKind.PARTITION: {
        "MSHV_INITIALIZE_PARTITION": SimBackend._initialize,
        "MSHV_CREATE_VP": SimBackend._create_vp,
        "MSHV_SET_GUEST_MEMORY": SimBackend._set_guest_memory,
        "MSHV_IRQFD": SimBackend._irqfd,
        "MSHV_IOEVENTFD": SimBackend._ioeventfd,
        "MSHV_SET_MSI_ROUTING": SimBackend._msi_routing,
        "MSHV_GET_GPAP_ACCESS_BITMAP": SimBackend._gpap_bitmap,
        "MSHV_ROOT_HVCALL": SimBackend._root_hvcall,
    },
    FdKind.VP: {
        "MSHV_RUN_VP": SimBackend._run_vp,
        "MSHV_GET_VP_STATE": SimBackend._get_vp_state,
        "MSHV_SET_VP_STATE": SimBackend._set_vp_state,
        "MSHV_ROOT_HVCALL": SimBackend._root_hvcall,
    },
}


@dataclass(frozen=True)
class _Route:
    """Where one ioctl on one fd kind goes, resolved once (ioctl runs per VP exit)."""

    name: str
    handler: Any
    ctype: str | None
    copy_in: bool
    device_hvcall: bool   # MSHV_ROOT_HVCALL on /dev/mshv: only on kernels with the passthrough


_ROUTES: dict[FdKind, dict[int, _Route]] = {
    kind: {request: _Route(name, _HANDLERS[kind][name], *_ARG_STRUCTS.get(name, (None, False)),
                           device_hvcall=kind is FdKind.DEVICE and name == "MSHV_ROOT_HVCALL")
           for request, name in requests_for(kind).items() if name in _HANDLERS[kind]}
    for kind in FdKind
}
