"""The partition's guest-physical address map, as the hypervisor keeps it.

Regions are host memory of this process (the userspace_addr of
MSHV_SET_GUEST_MEMORY), viewed zero-copy.  Every access is bounds-checked:
a GPA outside every region is reported, never turned into a host access.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

from mshvstack.abi import ffi, lib

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class GpaUnmapped(Exception):
    """A guest-physical access hit no mapped region."""

    def __init__(self, gpa: int, write: bool) -> None:
        super().__init__(f"GPA {gpa:#x} is not mapped ({'write' if write else 'read'})")
        self.gpa = gpa
        self.write = write


@dataclass
class Region:
    guest_pfn: int
    pages: int
    userspace_addr: int
    writable: bool
    executable: bool
    view: memoryview = field(repr=False)
    # Access tracking (HVCALL_GET_GPA_PAGES_ACCESS_STATES): one byte per page,
    # bit 0 accessed, bit 1 dirty.
    access: bytearray = field(repr=False, default_factory=bytearray)
    # Pages write-protected for dirty tracking (indexes within the region).
    write_protected: set[int] = field(repr=False, default_factory=set)

    @property
    def gpa(self) -> int:
        return self.guest_pfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.pages << PAGE_SHIFT

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


def host_view(address: int, size: int) -> memoryview:
    """A writable memoryview over ``size`` bytes of this process at ``address``."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class GpaMap:
    """Mapped regions of one partition, sorted by guest frame.

    Read from every thread (each VP, the VMM, devices) without a lock: the
    list is never changed in place but replaced whole, so a reader sees the
    map before or after a change.  The lock orders the writers (a leaf)."""

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._lock = threading.Lock()

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def overlaps_guest(self, guest_pfn: int, pages: int) -> bool:
        return any(r.guest_pfn < guest_pfn + pages and guest_pfn < r.guest_pfn + r.pages for r in self._regions)

    def overlaps_user(self, address: int, size: int) -> bool:
        return any(r.userspace_addr < address + size and address < r.userspace_addr + r.size for r in self._regions)

    def add(self, guest_pfn: int, pages: int, userspace_addr: int, writable: bool, executable: bool) -> Region:
        region = Region(guest_pfn, pages, userspace_addr, writable, executable,
                        host_view(userspace_addr, pages << PAGE_SHIFT), bytearray(pages))
        with self._lock:
            self._regions = sorted([*self._regions, region], key=lambda r: r.guest_pfn)
        return region

    def containing_pfn(self, guest_pfn: int) -> Region | None:
        """The region whose frames include ``guest_pfn`` (the driver's region_by_gfn)."""
        return next((r for r in self._regions if r.guest_pfn <= guest_pfn < r.guest_pfn + r.pages), None)

    def containing_user(self, address: int) -> Region | None:
        return next((r for r in self._regions if r.userspace_addr <= address < r.userspace_addr + r.size), None)

    def remove(self, region: Region) -> None:
        with self._lock:
            remaining = [r for r in self._regions if r is not region]
            if len(remaining) == len(self._regions):
                raise ValueError(f"GPA {region.gpa:#x}: not a mapped region")
            self._regions = remaining
        region.view.release()

    def lookup(self, gpa: int) -> Region | None:
        for region in self._regions:
            if region.contains(gpa):
                return region
        return None

    def _chunks(self, gpa: int, size: int, write: bool):  # type: ignore[no-untyped-def]
        done = 0
        while done < size:
            region = self.lookup(gpa + done)
            if region is None:
                raise GpaUnmapped(gpa + done, write)
            offset = gpa + done - region.gpa
            n = min(size - done, region.size - offset)
            yield region, offset, done, n
            done += n

    def read(self, gpa: int, size: int) -> bytes:
        for region in self._regions:   # the common case first: one region holds it all
            offset = gpa - region.gpa
            if 0 <= offset and offset + size <= region.size:
                return region.view[offset : offset + size].tobytes()
        out = bytearray(size)
        for region, offset, done, n in self._chunks(gpa, size, False):
            out[done : done + n] = region.view[offset : offset + n]
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        for region, offset, done, n in self._chunks(gpa, len(data), True):
            region.view[offset : offset + n] = data[done : done + n]
            first, last = offset >> PAGE_SHIFT, (offset + n - 1) >> PAGE_SHIFT
            for page in range(first, last + 1):
                region.access[page] |= 0b11

    def fetch_or(self, gpa: int, mask: int) -> int:
        """Set ``mask``'s bits in the byte at ``gpa`` with one locked instruction (the guest
        clears bits there with its own): the byte as it was.  GpaUnmapped outside RAM."""
        for region in self._regions:
            offset = gpa - region.gpa
            if 0 <= offset < region.size:
                with ffi.from_buffer(region.view) as host:   # the view stays exported until done
                    old = int(lib.mshvstack_fetch_or_u8(host + offset, mask))
                region.access[offset >> PAGE_SHIFT] |= 0b11
                return old
        raise GpaUnmapped(gpa, True)

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (1 << 64) - 1).to_bytes(8, "little"))

    def mark_access(self, gpa: int, dirty: bool) -> None:
        region = self.lookup(gpa)
        if region is not None:
            region.access[(gpa - region.gpa) >> PAGE_SHIFT] |= 0b11 if dirty else 0b01
