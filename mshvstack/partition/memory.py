"""Guest memory: mmap-backed regions addressed by GPA, bounds-checked."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mshvstack.errors import MshvError
from mshvstack.partition._dma import ffi as _dma_ffi
from mshvstack.partition._dma import lib as _dma

PAGE = 4096


class GuestMemoryError(MshvError):
    """A guest-physical access outside the mapped RAM."""


@dataclass
class MemoryRegion:
    """One MSHV_SET_GUEST_MEMORY mapping, owned by its partition."""

    gpa: int
    size: int
    writable: bool
    executable: bool
    host: mmap.mmap = field(repr=False)
    address: int = field(default=0, repr=False)   # where ``host`` is mapped in this process

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


class GuestMemory:
    """Read, write and view guest RAM by GPA across the partition's regions.

    Every access is checked against the regions: a GPA outside RAM raises
    GuestMemoryError and never touches host memory outside a region.
    """

    def __init__(self, written: Callable[[Sequence[tuple[int, int]]], None] | None = None) -> None:
        # Read from every thread without a lock: the list is replaced whole, never changed in place
        # (an in-place sort shows other threads an empty list meanwhile).  The lock orders the
        # writers, the partition's map and unmap, and guards the write log, which every writing
        # thread adds to and the migration takes (a leaf).
        self._regions: list[MemoryRegion] = []
        self._lock = threading.Lock()
        self._written = written   # told the (host address, length) ranges after each write
        self._logged: set[int] | None = None   # pages written through here while logging (migration)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def _add(self, region: MemoryRegion) -> None:
        with self._lock:
            self._regions = sorted([*self._regions, region], key=lambda r: r.gpa)

    def _remove(self, region: MemoryRegion) -> None:
        with self._lock:
            regions = list(self._regions)
            regions.remove(region)
            self._regions = regions

    def region_at(self, gpa: int) -> MemoryRegion:
        for region in self._regions:
            if region.contains(gpa):
                return region
        raise GuestMemoryError(f"GPA {gpa:#x} is not guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy view of [gpa, gpa+length), which must lie in one region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        region = self.region_at(gpa)
        if not region.contains(gpa, length):
            raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} crosses the end of its region at {region.end:#x}")
        offset = gpa - region.gpa
        return memoryview(region.host)[offset : offset + length]

    def _pieces(self, gpa: int, length: int) -> list[tuple[MemoryRegion, int, int]]:
        pieces = []
        done = 0
        while done < length:
            region = self.region_at(gpa + done)
            offset = gpa + done - region.gpa
            n = min(length - done, region.size - offset)
            pieces.append((region, offset, n))
            done += n
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes at [gpa, gpa+length), possibly spanning adjacent regions."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for region in self._regions:   # the common case first: one region holds it all
            offset = gpa - region.gpa
            if 0 <= offset and offset + length <= region.size:
                return region.host[offset : offset + length]
        return b"".join(bytes(r.host[o : o + n]) for r, o, n in self._pieces(gpa, length))

    def log_writes(self, on: bool) -> None:
        """Record the pages the VMM writes (the hypervisor's dirty bitmap sees guest writes only)."""
        with self._lock:
            self._logged = set() if on else None

    def take_logged(self) -> set[int]:
        """GPAs of the pages written since the last call (logging stays on)."""
        with self._lock:
            logged, self._logged = self._logged, set() if self._logged is not None else None
        return logged or set()

    def _log(self, gpa: int, length: int) -> None:
        """Record a write once its bytes are in: a page taken before then is taken again after.
        (Recorded before, a page could be taken and copied, then written, and never sent.)"""
        if self._logged is not None and length:   # not logging (the common case): no lock
            with self._lock:   # else an add to the set the migration just took would be lost
                if self._logged is not None:
                    self._logged.update(range(gpa & ~(PAGE - 1), gpa + length, PAGE))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        for region in self._regions:
            offset = gpa - region.gpa
            if 0 <= offset and offset + length <= region.size:
                region.host[offset : offset + length] = data
                if self._written is not None:
                    self._written(((region.address + offset, length),))
                self._log(gpa, length)
                return
        data = bytes(data)
        pieces = self._pieces(gpa, len(data))  # checks the whole range before writing anything
        done = 0
        for region, offset, n in pieces:
            region.host[offset : offset + n] = data[done : done + n]
            done += n
        if self._written is not None:
            self._written([(region.address + offset, n) for region, offset, n in pieces])
        self._log(gpa, length)

    def wrote(self, gpa: int, length: int) -> None:
        """[gpa, gpa+length), inside one region, was written through a ``view`` (a DMA straight
        into guest RAM, as a disk read's preadv): tell the backend and the write log what
        ``write`` tells them (the simulator's engines drop code translated from those bytes)."""
        self.wrote_ranges(((gpa, length),))

    def wrote_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """``wrote`` for several (gpa, length) ranges, each inside one region: a scattered
        DMA told in one call.  Each range is checked before any is reported."""
        regions = self._regions
        host: list[tuple[int, int]] = []
        for gpa, length in ranges:
            for region in regions:
                offset = gpa - region.gpa
                if 0 <= offset and 0 <= length and offset + length <= region.size:
                    host.append((region.address + offset, length))
                    break
            else:
                raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} is not inside one region")
        if self._written is not None:
            self._written(host)
        if self._logged is not None:
            for gpa, length in ranges:
                self._log(gpa, length)

    def file_io(self, fd: int, file_offset: int, pfns: Sequence[int], first_offset: int, length: int,
                to_file: bool) -> bool:
        """A device's DMA between a file and a guest buffer named by frame numbers (the
        transfer ``first_offset`` bytes into ``pfns[0]``), with no copy in between: the
        pages read from the file (zeros past its end) or written to it, in one call.

        False when the frames do not all lie in one region (nothing moved: the caller
        takes the view path); GuestMemoryError when there are too few frames for
        ``length``; OSError when the file refuses.  Whatever landed in guest RAM is
        reported as ``wrote`` reports it, also after a failed read."""
        if not length:
            return True
        if not 0 <= first_offset < PAGE:
            raise GuestMemoryError(f"buffer offset {first_offset:#x} is not inside its first page")
        pages = (first_offset + length + PAGE - 1) // PAGE
        if len(pfns) < pages:
            raise GuestMemoryError(f"{len(pfns)} frames for a {length}-byte transfer at offset {first_offset:#x}")
        frames = pfns[:pages]
        lowest, highest = min(frames) * PAGE, (max(frames) + 1) * PAGE
        region = next((r for r in self._regions if r.gpa <= lowest and highest <= r.end), None)
        if region is None:
            return False
        iov = _dma_ffi.new("struct iovec[]", pages)
        counts = _dma_ffi.new("uint32_t *")
        error = _dma_ffi.new("int *")
        with _dma_ffi.from_buffer(region.host, require_writable=not to_file) as host:   # held for the call
            base = int(_dma_ffi.cast("uintptr_t", host))
            status = _dma.dma_file(fd, int(to_file), file_offset, length, host, region.size, region.gpa // PAGE,
                                   _dma_ffi.new("uint64_t[]", frames), pages, first_offset, iov, counts, error)
        if status == _dma.DMA_OUTSIDE:   # (the frames were checked above: a host bug)
            raise GuestMemoryError("DMA frames outside the region that holds them")
        if not to_file and counts[0]:
            flat = _dma_ffi.unpack(_dma_ffi.cast("uint64_t *", iov), 2 * counts[0])   # (address, length) pairs
            offsets = list(zip([address - base for address in flat[0::2]], flat[1::2]))
            if self._written is not None:
                self._written([(region.address + offset, size) for offset, size in offsets])
            if self._logged is not None:
                for offset, size in offsets:
                    self._log(region.gpa + offset, size)
        if status == _dma.DMA_IO_ERROR:
            raise OSError(error[0], "guest DMA: the file refused")
        return True

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & ((1 << 64) - 1)).to_bytes(8, "little"))
