"""Partition: one partition fd — properties, intercepts, memory, interrupts, VPs."""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mshvstack.abi import ffi, lib
from mshvstack.abi.profiles import AbiProfile
from mshvstack.backend.base import Backend
from mshvstack.backend.handle import FdHandle, FdOwner
from mshvstack.errors import MshvError
from mshvstack.hvcall import calls
from mshvstack.hvcall.call import HvTarget
from mshvstack.partition.memory import GuestMemory, GuestMemoryError, MemoryRegion
from mshvstack.partition.vp import Vp

if TYPE_CHECKING:
    from mshvstack.partition.mshv import Mshv

PAGE = 4096
MAX_VPS = 256


@dataclass(frozen=True)
class PartitionConfig:
    """How to create a partition (MSHV_CREATE_PARTITION v1, or v2 with feature banks)."""

    lapic: bool = True
    x2apic: bool = False
    gpa_super_pages: bool = False
    nested_virtualization: bool = False
    smt_enabled_guest: bool = False
    # Processor features / xsave features to *disable*; setting either selects v2.
    disabled_processor_features: tuple[int, int] | None = None
    disabled_xsave_features: int | None = None

    @property
    def uses_v2(self) -> bool:
        return self.disabled_processor_features is not None or self.disabled_xsave_features is not None

    def pt_flags(self) -> int:
        bits = ((self.lapic, lib.MSHV_PT_BIT_LAPIC), (self.x2apic, lib.MSHV_PT_BIT_X2APIC),
                (self.gpa_super_pages, lib.MSHV_PT_BIT_GPA_SUPER_PAGES),
                (self.nested_virtualization, lib.MSHV_PT_BIT_NESTED_VIRTUALIZATION),
                (self.smt_enabled_guest, lib.MSHV_PT_BIT_SMT_ENABLED_GUEST),
                (self.uses_v2, lib.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES))
        return sum(1 << int(bit) for enabled, bit in bits if enabled)


@dataclass(frozen=True)
class MsiRoute:
    """One MSI routing entry (MSHV_SET_MSI_ROUTING)."""

    gsi: int
    address_lo: int
    data: int

    @classmethod
    def fixed(cls, gsi: int, vector: int, apic_id: int, level: bool = False) -> MsiRoute:
        return cls(gsi, 0xFEE00000 | (apic_id << 12), vector | (int(level) << 15))


class Partition(FdOwner):
    """A partition created by Mshv.create_partition; owns its fd and memory."""

    def __init__(self, mshv: Mshv, fd: int, config: PartitionConfig) -> None:
        self.mshv = mshv
        self.backend: Backend = mshv.backend
        self.profile: AbiProfile = mshv.profile
        self._handle = FdHandle(self.backend, fd, "partition")
        self.config = config
        self.memory = GuestMemory(written=lambda ranges: self.backend.host_wrote(self.fd, ranges))
        self.vps: dict[int, Vp] = {}
        self.initialized = False
        self._target = HvTarget(self._handle, self.profile)

    @property
    def hv(self) -> HvTarget:
        """Where this partition's hypercalls go (for mshvstack.hvcall.calls)."""
        return self._target

    # ---- lifecycle
    def initialize(self) -> None:
        """MSHV_INITIALIZE_PARTITION (after early properties, before VPs)."""
        self.backend.ioctl(self.fd, lib.MSHV_INITIALIZE_PARTITION, 0)
        self.initialized = True

    def pause(self) -> None:
        """Freeze partition time and stop its VPs from running (time freeze property)."""
        self.set_property(lib.HV_PARTITION_PROPERTY_TIME_FREEZE, 1)
        for vp in self.vps.values():
            vp.kick()

    def resume(self) -> None:
        self.set_property(lib.HV_PARTITION_PROPERTY_TIME_FREEZE, 0)

    # ---- properties and intercepts
    def get_property(self, code: int) -> int:
        return calls.get_partition_property(self._target, code)

    def set_property(self, code: int, value: int) -> None:
        calls.set_partition_property(self._target, code, value)

    def install_intercept(self, intercept_type: int, access: int = 0, parameter: int = 0) -> None:
        calls.install_intercept(self._target, intercept_type, access, parameter)

    # ---- memory
    def map_memory(self, gpa: int, size: int, writable: bool = True, executable: bool = True) -> MemoryRegion:
        """Back [gpa, gpa+size) with fresh anonymous memory (MSHV_SET_GUEST_MEMORY)."""
        if gpa % PAGE or size <= 0 or size % PAGE:
            raise GuestMemoryError(f"guest memory must be page aligned and non-empty: gpa {gpa:#x}, size {size:#x}")
        host = mmap.mmap(-1, size)
        region = MemoryRegion(gpa, size, writable, executable, host, _mmap_address(host))
        try:
            self._set_memory(region, unmap=False)
        except BaseException:
            host.close()
            raise
        self.memory._add(region)
        return region

    def unmap_memory(self, region: MemoryRegion) -> None:
        self._set_memory(region, unmap=True)
        self.memory._remove(region)
        region.host.close()

    def _set_memory(self, region: MemoryRegion, unmap: bool) -> None:
        fd = self.fd   # first: a closed partition's regions are closed too
        arg = ffi.new("struct mshv_user_mem_region *")
        arg.size, arg.guest_pfn = region.size, region.gpa // PAGE
        arg.userspace_addr = region.address
        flags = 0
        if region.writable:
            flags |= 1 << lib.MSHV_SET_MEM_BIT_WRITABLE
        if region.executable:
            flags |= 1 << lib.MSHV_SET_MEM_BIT_EXECUTABLE
        if unmap:
            flags |= 1 << lib.MSHV_SET_MEM_BIT_UNMAP
        arg.flags = flags
        self.backend.ioctl(fd, lib.MSHV_SET_GUEST_MEMORY, arg)

    def dirty_pages(self, gpa: int, size: int, clear: bool = True) -> list[int]:
        """GPAs of pages written since the last clear (needs the access-tracking property)."""
        count = (size + PAGE - 1) // PAGE
        bitmap = ffi.new("unsigned char[]", (count + 7) // 8)
        req = ffi.new("struct mshv_gpap_access_bitmap *")
        req.access_type = lib.MSHV_GPAP_ACCESS_TYPE_DIRTY
        req.access_op = lib.MSHV_GPAP_ACCESS_OP_CLEAR if clear else lib.MSHV_GPAP_ACCESS_OP_SET
        req.page_count, req.gpap_base = count, gpa // PAGE
        req.bitmap_ptr = int(ffi.cast("uintptr_t", bitmap))
        self.backend.ioctl(self.fd, lib.MSHV_GET_GPAP_ACCESS_BITMAP, req)
        bits = int.from_bytes(bytes(ffi.buffer(bitmap)), "little")
        return [gpa + i * PAGE for i in range(count) if bits >> i & 1]

    def enable_dirty_tracking(self, enabled: bool = True) -> None:
        self.set_property(lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, int(enabled))

    # ---- interrupts
    def set_msi_routing(self, routes: Iterable[MsiRoute]) -> None:
        routes = list(routes)
        raw = ffi.new("char[]", ffi.sizeof("struct mshv_user_irq_table") + len(routes) * ffi.sizeof("struct mshv_user_irq_entry"))
        table = ffi.cast("struct mshv_user_irq_table *", raw)
        table.nr = len(routes)
        for i, route in enumerate(routes):
            entry = table.entries[i]
            entry.gsi, entry.address_lo, entry.data = route.gsi, route.address_lo, route.data
        self.backend.ioctl(self.fd, lib.MSHV_SET_MSI_ROUTING, table)

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Signalling ``eventfd`` injects the MSI routed at ``gsi``."""
        arg = ffi.new("struct mshv_user_irqfd *")
        arg.fd, arg.gsi = eventfd, gsi
        if resample_fd is not None:
            arg.resamplefd, arg.flags = resample_fd, 1 << lib.MSHV_IRQFD_BIT_RESAMPLE
        self.backend.ioctl(self.fd, lib.MSHV_IRQFD, arg)

    def remove_irqfd(self, eventfd: int, gsi: int) -> None:
        arg = ffi.new("struct mshv_user_irqfd *")
        arg.fd, arg.gsi, arg.flags = eventfd, gsi, 1 << lib.MSHV_IRQFD_BIT_DEASSIGN
        self.backend.ioctl(self.fd, lib.MSHV_IRQFD, arg)

    def ioeventfd(self, eventfd: int, address: int, length: int = 0, datamatch: int | None = None, remove: bool = False) -> None:
        """Guest MMIO writes to ``address`` signal ``eventfd`` instead of exiting."""
        arg = ffi.new("struct mshv_user_ioeventfd *")
        arg.fd, arg.addr, arg.len = eventfd, address, length
        flags = 0
        if datamatch is not None:
            arg.datamatch, flags = datamatch, 1 << lib.MSHV_IOEVENTFD_BIT_DATAMATCH
        if remove:
            flags |= 1 << lib.MSHV_IOEVENTFD_BIT_DEASSIGN
        arg.flags = flags
        self.backend.ioctl(self.fd, lib.MSHV_IOEVENTFD, arg)

    def assert_interrupt(self, vector: int, apic_id: int = 0, interrupt_type: int = 0, level: bool = False) -> None:
        calls.assert_virtual_interrupt(self._target, vector, apic_id, interrupt_type, level)

    # ---- VPs
    def create_vp(self, index: int) -> Vp:
        """MSHV_CREATE_VP: a new VP fd with its register page mapped."""
        if not 0 <= index < MAX_VPS:
            raise MshvError(f"VP index {index} out of range 0..{MAX_VPS - 1}")
        arg = ffi.new("struct mshv_create_vp *")
        arg.vp_index = index
        fd = self.backend.ioctl(self.fd, lib.MSHV_CREATE_VP, arg)
        vp = Vp(self, index, fd)
        self.vps[index] = vp
        return vp

    def close(self) -> None:
        """Close VPs, the partition fd (which unmaps everything), then the memory."""
        for vp in self.vps.values():
            vp.close()
        self.vps.clear()
        self._handle.close()
        for region in self.memory.regions:
            self.memory._remove(region)
            region.host.close()

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mmap_address(host: mmap.mmap) -> int:
    """The address of an mmap's memory (ctypes, so no lasting buffer export)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(host))
