"""What a live migration's destination holds, page by page, for pre-copy where the
partition cannot track dirty pages (the simulator beyond its tracking limit).

A page must go again when its content differs from what was sent: comparing
with the copy of what was sent (never with an earlier reading) is exact
whoever wrote the page (a VP, the VMM, a device's DMA), and a page that was
changed and changed back needs nothing.  It costs a copy of guest RAM and one
memcmp over it per pass (about 0.1 s for 512 MiB here).
"""

from __future__ import annotations

from mshvstack.partition.memory import GuestMemory
from mshvstack.snapshot.pages import differing_pages, pointer


class SentCopy:
    """Every page of ``memory`` as the destination has it: zero until sent."""

    def __init__(self, memory: GuestMemory) -> None:
        self._regions = []
        for region in memory.regions:
            copy = bytearray(region.size)
            self._regions.append((region.gpa, region.size, copy, pointer(region.host), pointer(copy)))

    def record(self, gpa: int, data: bytes) -> None:
        """``data`` went to the destination at ``gpa``."""
        for start, size, copy, _host, _copied in self._regions:
            if start <= gpa and gpa + len(data) <= start + size:
                copy[gpa - start : gpa - start + len(data)] = data
                return
        raise ValueError(f"GPA {gpa:#x} is not in guest RAM")

    def changed(self) -> set[int]:
        """The GPAs of the pages whose content is not what the destination has."""
        return {start + offset for start, size, _copy, host, copied in self._regions
                for offset in differing_pages(host, copied, size)}
