"""GPADLs: guest page lists assembled from GPADL_HEADER + GPADL_BODY messages.

Each page number is checked against guest RAM; sizes and counts are
bounded so a guest cannot make the host allocate without limit.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.layout import Layout, array
from mshvstack.vmbus.ringcore import HostBuffer, RingLayout, RingRun

PAGE = int(lib.VMBUS_PAGE_SIZE)
MAX_GPADL_PAGES = 65536           # 256 MiB per GPADL
MAX_PENDING_GPADLS = 64
MAX_GPADLS_PER_CHANNEL = 64       # Linux uses 1-3 (ring, netvsc's send and receive buffers)
MAX_GPADLS = 1024                 # per connection
MAX_TOTAL_PAGES = 1 << 20         # every GPADL of a connection together: 4 GiB of guest pages
_U32 = struct.Struct("<I")
_HEADER = ffi.sizeof("struct vmbus_channel_gpadl_header")
_BODY = ffi.sizeof("struct vmbus_channel_gpadl_body")
GPADL_HEADER = Layout("struct vmbus_channel_gpadl_header", "child_relid", "gpadl", "range_buflen", "rangecount")
GPADL_BODY = Layout("struct vmbus_channel_gpadl_body", "gpadl")
GPA_RANGE = Layout("struct vmbus_gpa_range", "byte_count", "byte_offset")
PFN_SIZE = array("struct vmbus_gpa_range", "pfn_array", 1).size


@dataclass(frozen=True)
class Gpadl:
    gpadl_id: int
    relid: int
    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]

    @property
    def pages(self) -> int:
        return len(self.pfns)


@dataclass(frozen=True)
class GpadlState:
    VERSION: ClassVar[int] = 1
    gpadl_id: int
    relid: int
    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...] = field(metadata={"max_items": MAX_GPADL_PAGES})


@dataclass(frozen=True)
class PendingGpadlState:
    """A GPADL whose header came and whose bodies are still due."""

    VERSION: ClassVar[int] = 1
    gpadl_id: int
    relid: int
    range_buflen: int
    rangecount: int
    received: bytes = field(metadata={"max_bytes": 8 + 8 * MAX_GPADL_PAGES})


@dataclass
class _Pending:
    relid: int
    range_buflen: int
    rangecount: int
    data: bytearray = field(default_factory=bytearray)


class GpadlTable:
    """In-progress and established GPADLs of one VMBus connection."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.established: dict[int, Gpadl] = {}
        self._pending: dict[int, _Pending] = {}

    def header(self, message: bytes) -> Gpadl | None:
        """GPADL_HEADER: returns the GPADL when complete, None while bodies are due."""
        if len(message) < _HEADER:
            raise VmbusProtocolError("GPADL_HEADER too short")
        relid, gpadl_id, buflen, count = GPADL_HEADER.unpack_from(message)
        if gpadl_id in self.established or gpadl_id in self._pending:
            raise VmbusProtocolError(f"GPADL {gpadl_id:#x} already exists")
        if count != 1:
            raise VmbusProtocolError(f"GPADL {gpadl_id:#x} with {count} ranges (one range supported)")
        if buflen < 16 or (buflen - 8) % 8 or (buflen - 8) // 8 > MAX_GPADL_PAGES:
            raise VmbusProtocolError(f"GPADL {gpadl_id:#x}: range_buflen {buflen} invalid")
        if len(self._pending) >= MAX_PENDING_GPADLS:
            raise VmbusProtocolError("too many GPADLs in progress")
        pages = (buflen - 8) // 8
        relids = [g.relid for g in self.established.values()] + [p.relid for p in self._pending.values()]
        if relids.count(relid) >= MAX_GPADLS_PER_CHANNEL or len(relids) >= MAX_GPADLS:
            raise VmbusProtocolError(f"GPADL {gpadl_id:#x}: the guest holds too many GPADLs already")
        if self.total_pages() + pages > MAX_TOTAL_PAGES:
            raise VmbusProtocolError(f"GPADL {gpadl_id:#x}: {pages} more pages exceed the {MAX_TOTAL_PAGES}-page limit")
        pending = _Pending(relid, buflen, count)
        pending.data += message[_HEADER : _HEADER + buflen]
        self._pending[gpadl_id] = pending
        return self._complete(gpadl_id)

    def body(self, message: bytes) -> tuple[int, Gpadl | None]:
        """GPADL_BODY: (gpadl id, the GPADL when now complete)."""
        if len(message) < _BODY + 8:
            raise VmbusProtocolError("GPADL_BODY too short")
        (gpadl_id,) = GPADL_BODY.unpack_from(message)
        pending = self._pending.get(gpadl_id)
        if pending is None:
            raise VmbusProtocolError(f"GPADL_BODY for unknown GPADL {gpadl_id:#x}")
        remaining = pending.range_buflen - len(pending.data)
        chunk = message[_BODY:]
        pending.data += chunk[: min(len(chunk) - len(chunk) % 8, remaining)]
        return gpadl_id, self._complete(gpadl_id)

    def _complete(self, gpadl_id: int) -> Gpadl | None:
        pending = self._pending[gpadl_id]
        if len(pending.data) < pending.range_buflen:
            return None
        del self._pending[gpadl_id]
        byte_count, byte_offset = GPA_RANGE.unpack_from(pending.data)
        pages = (pending.range_buflen - GPA_RANGE.size) // PFN_SIZE
        pfns = array("struct vmbus_gpa_range", "pfn_array", pages).unpack_from(pending.data, GPA_RANGE.size)
        gpadl = self._checked(Gpadl(gpadl_id, pending.relid, byte_count, byte_offset, tuple(pfns)))
        self.established[gpadl_id] = gpadl
        return gpadl

    def _checked(self, gpadl: Gpadl) -> Gpadl:
        """``gpadl`` if its byte range fits its pages and every page is guest RAM."""
        if gpadl.byte_offset >= PAGE or gpadl.byte_count == 0 or \
                (gpadl.byte_offset + gpadl.byte_count + PAGE - 1) // PAGE != gpadl.pages:
            raise VmbusProtocolError(f"GPADL {gpadl.gpadl_id:#x}: {gpadl.byte_count} bytes at offset {gpadl.byte_offset} "
                                     f"do not match {gpadl.pages} pages")
        for pfn in gpadl.pfns:
            try:
                self.memory.region_at(pfn * PAGE)
            except GuestMemoryError:
                raise VmbusProtocolError(f"GPADL {gpadl.gpadl_id:#x}: page {pfn:#x} is not guest RAM") from None
        return gpadl

    def total_pages(self) -> int:
        return sum(g.pages for g in self.established.values()) + sum((p.range_buflen - 8) // 8 for p in self._pending.values())

    def abandon(self, gpadl_id: int) -> None:
        self._pending.pop(gpadl_id, None)

    def teardown(self, gpadl_id: int) -> Gpadl:
        try:
            return self.established.pop(gpadl_id)
        except KeyError:
            raise VmbusProtocolError(f"GPADL_TEARDOWN of unknown GPADL {gpadl_id:#x}") from None

    def clear(self) -> None:
        self.established.clear()
        self._pending.clear()

    # ---- snapshots
    def save(self) -> tuple[tuple[GpadlState, ...], tuple[PendingGpadlState, ...]]:
        return (tuple(GpadlState(g.gpadl_id, g.relid, g.byte_count, g.byte_offset, g.pfns) for g in self.established.values()),
                tuple(PendingGpadlState(i, p.relid, p.range_buflen, p.rangecount, bytes(p.data)) for i, p in self._pending.items()))

    def restore(self, established: tuple[GpadlState, ...], pending: tuple[PendingGpadlState, ...]) -> None:
        """Replace the table with saved GPADLs, each checked as one the guest builds
        (page range, RAM, the limits); VmbusProtocolError names the first bad one."""
        self.clear()
        for saved in established:
            if saved.gpadl_id in self.established or not 0 < len(saved.pfns) <= MAX_GPADL_PAGES:
                raise VmbusProtocolError(f"GPADL {saved.gpadl_id:#x} repeated or of {len(saved.pfns)} pages")
            self.established[saved.gpadl_id] = self._checked(
                Gpadl(saved.gpadl_id, saved.relid, saved.byte_count, saved.byte_offset, saved.pfns))
        for part in pending:
            buflen = part.range_buflen
            if part.gpadl_id in self.established or part.gpadl_id in self._pending or part.rangecount != 1 or \
                    buflen < 16 or (buflen - 8) % 8 or (buflen - 8) // 8 > MAX_GPADL_PAGES or len(part.received) >= buflen:
                raise VmbusProtocolError(f"GPADL {part.gpadl_id:#x} in progress is not a valid one")
            self._pending[part.gpadl_id] = _Pending(part.relid, buflen, part.rangecount, bytearray(part.received))
        relids = [g.relid for g in self.established.values()] + [p.relid for p in self._pending.values()]
        if len(relids) > MAX_GPADLS or any(relids.count(r) > MAX_GPADLS_PER_CHANNEL for r in set(relids)) \
                or self.total_pages() > MAX_TOTAL_PAGES:
            raise VmbusProtocolError("the saved GPADLs exceed the per-connection limits")


class GpadlRingMem:
    """One ring (control page + data pages) inside a GPADL, in guest RAM.

    The pages were checked against RAM when the GPADL was built; here each is
    located once in its memory region, and pages that follow each other in
    the same region are one run (Linux allocates its rings contiguously, so a
    ring is usually one run in one mapping).  The ring's C core is given the
    runs as a RingLayout over the regions' mappings.  If the VMM takes the
    memory away, an access raises ValueError, a protocol error for the channel.
    """

    def __init__(self, memory: GuestMemory, pfns: tuple[int, ...]) -> None:
        if len(pfns) < 2:
            raise VmbusProtocolError("a ring needs at least two pages")
        self.memory = memory
        self.pfns = pfns
        self._data_size = (len(pfns) - 1) * PAGE
        self._control = self._locate(pfns[0])
        self._runs: list[tuple[int, Any, int, int]] = []   # (data offset, host mmap, host offset, length)
        for index, pfn in enumerate(pfns[1:]):
            host, offset = self._locate(pfn)
            if self._runs:
                start, last_host, last_offset, length = self._runs[-1]
                if last_host is host and last_offset + length == offset:
                    self._runs[-1] = (start, host, last_offset, length + PAGE)
                    continue
            self._runs.append((index * PAGE, host, offset, PAGE))
        # One run (the usual case): read_data/write_data are one bounds check and one slice.
        self._single = self._runs[0][1:3] if len(self._runs) == 1 else None
        mappings: list[mmap.mmap] = []   # each region's mapping once, the control page's first
        for host in (self._control[0], *(run[1] for run in self._runs)):
            if not any(host is known for known in mappings):
                mappings.append(host)
        number = {id(host): index for index, host in enumerate(mappings)}
        self.buffers: tuple[HostBuffer, ...] = tuple(mappings)
        self.layout = RingLayout(self._data_size, number[id(self._control[0])], self._control[1],
                                 tuple(RingRun(start, length, number[id(host)], offset) for start, host, offset, length in self._runs))

    def _locate(self, pfn: int) -> tuple[Any, int]:
        try:
            region = self.memory.region_at(pfn * PAGE)
        except GuestMemoryError:
            raise VmbusProtocolError(f"ring page {pfn:#x} is not guest RAM") from None
        return region.host, pfn * PAGE - region.gpa

    @property
    def data_size(self) -> int:
        return self._data_size

    # The accesses below are for tests and tools (the ring itself goes through the C core).
    def read_control(self, offset: int) -> int:
        host, base = self._control
        return int(_U32.unpack_from(host, base + offset)[0])

    def write_control(self, offset: int, value: int) -> None:
        host, base = self._control
        _U32.pack_into(host, base + offset, value & 0xFFFFFFFF)

    def _pieces(self, offset: int, length: int) -> list[tuple[Any, int, int, int]]:
        """(host, host offset, done, n) pieces of [offset, offset+length) of the data area."""
        pieces, done = [], 0
        for start, host, host_offset, run in self._runs:
            if done >= length:
                break
            position = offset + done
            if start <= position < start + run:
                n = min(length - done, start + run - position)
                pieces.append((host, host_offset + position - start, done, n))
                done += n
        if done < length:
            raise ValueError(f"ring access {offset:#x}+{length:#x} outside its {self.data_size:#x}-byte data area")
        return pieces

    def read_data(self, offset: int, length: int) -> bytes:
        single = self._single
        if single is not None and 0 <= offset and offset + length <= self.data_size:
            host, base = single
            return bytes(host[base + offset : base + offset + length])
        pieces = self._pieces(offset, length)
        if len(pieces) == 1:
            host, at, _done, n = pieces[0]
            return bytes(host[at : at + n])
        return b"".join(host[at : at + n] for host, at, _done, n in pieces)

    def write_data(self, offset: int, data: bytes | memoryview) -> None:
        single = self._single
        if single is not None and 0 <= offset and offset + len(data) <= self.data_size:
            host, base = single
            host[base + offset : base + offset + len(data)] = data
            return
        view = memoryview(data)
        for host, at, done, n in self._pieces(offset, len(data)):
            host[at : at + n] = view[done : done + n]
