"""The guest's physical memory map (e820 / PVH memmap), shared by the loaders."""

from __future__ import annotations

from mshvstack.partition.memory import GuestMemory

RAM, RESERVED = 1, 2
LOW_RAM_END = 0x9FC00
BIOS_AREA = (0xE0000, 0x20000)   # ACPI tables live here


def memory_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(start, size, type) entries: low RAM, the BIOS area reserved, RAM from 1 MiB."""
    entries = [(0, LOW_RAM_END, RAM), (LOW_RAM_END, 0xA0000 - LOW_RAM_END, RESERVED), (BIOS_AREA[0], BIOS_AREA[1], RESERVED)]
    for region in memory.regions:
        start = max(region.gpa, 0x100000)
        if region.end > start:
            entries.append((start, region.end - start, RAM))
    return entries
