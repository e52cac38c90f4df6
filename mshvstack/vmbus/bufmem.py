"""A buffer the guest described with a GPADL (netvsc's send and receive buffers).

Linux vmallocs these, so their pages are scattered; pages that follow each
other in guest-physical memory are merged into runs once, at setup, and an
access is split at run boundaries.  Every page was checked against guest RAM
when the GPADL was built; here each access is checked against the buffer's
own length, so no offset the guest names can reach outside it.  Writes go
through GuestMemory.write (the simulator's code coherence and the migration
write log see them).
"""

from __future__ import annotations

import bisect

from mshvstack.abi import lib
from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.gpadl import Gpadl

PAGE = int(lib.VMBUS_PAGE_SIZE)


class BufferMem:
    """Bytes [0, size) of a GPADL's page list, starting at its byte offset."""

    def __init__(self, memory: GuestMemory, gpadl: Gpadl, forbidden: frozenset[int] = frozenset()) -> None:
        self.memory = memory
        self.size = gpadl.byte_count
        starts: list[int] = []
        runs: list[tuple[int, int, int]] = []   # (buffer offset, gpa, length)
        position = 0
        for index, pfn in enumerate(gpadl.pfns):
            if pfn in forbidden:
                raise VmbusProtocolError(f"buffer page {pfn:#x} is one of the channel's ring pages")
            first = gpadl.byte_offset if index == 0 else 0
            length = min(PAGE - first, self.size - position)
            if length <= 0:
                break
            gpa = pfn * PAGE + first
            if runs and runs[-1][1] + runs[-1][2] == gpa:
                start, run_gpa, run_length = runs[-1]
                runs[-1] = (start, run_gpa, run_length + length)
            else:
                starts.append(position)
                runs.append((position, gpa, length))
            position += length
        if position < self.size:
            raise VmbusProtocolError(f"GPADL {gpadl.gpadl_id:#x}: its pages hold {position} of {self.size} bytes")
        self._starts = starts
        self._runs = runs

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(gpa, done, n) pieces of [offset, offset + length)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VmbusProtocolError(f"buffer access {offset:#x}+{length:#x} outside its {self.size:#x} bytes")
        pieces = []
        index = bisect.bisect_right(self._starts, offset) - 1
        done = 0
        while done < length:
            start, gpa, run = self._runs[index]
            skip = offset + done - start
            n = min(length - done, run - skip)
            pieces.append((gpa + skip, done, n))
            done += n
            index += 1
        return pieces

    def read(self, offset: int, length: int) -> bytes:
        try:
            pieces = self._pieces(offset, length)
            if len(pieces) == 1:
                return self.memory.read(pieces[0][0], length)
            return b"".join(self.memory.read(gpa, n) for gpa, _done, n in pieces)
        except GuestMemoryError as exc:
            raise VmbusProtocolError(f"buffer: {exc}") from None

    def write(self, offset: int, data: bytes) -> None:
        try:
            pieces = self._pieces(offset, len(data))
            if len(pieces) == 1:
                self.memory.write(pieces[0][0], data)
                return
            view = memoryview(data)
            for gpa, done, n in pieces:
                self.memory.write(gpa, view[done : done + n])
        except GuestMemoryError as exc:
            raise VmbusProtocolError(f"buffer: {exc}") from None
