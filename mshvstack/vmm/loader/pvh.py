"""The PVH boot ABI: an hvm_start_info block for kernels entered at their PVH note."""

from __future__ import annotations

import struct

from mshvstack.partition.memory import GuestMemory
from mshvstack.vmm.loader import LoaderError
from mshvstack.vmm.loader.memmap import memory_map

START_INFO_GPA = 0x6000
MODLIST_GPA = 0x6100
MEMMAP_GPA = 0x6200
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
START_INFO_MAGIC = 0x336EC578


def write_start_info(memory: GuestMemory, cmdline: str, initrd: bytes | None, rsdp: int, kernel_end: int) -> int:
    """Command line, initrd module and memory map for a PVH kernel; returns the block's GPA (for EBX)."""
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > CMDLINE_MAX:
        raise LoaderError(f"--cmdline is {len(encoded)} bytes; at most {CMDLINE_MAX} fit")
    memory.write(CMDLINE_GPA, encoded)
    modules = 0
    if initrd:
        address = (memory.size - len(initrd)) & ~0xFFF
        if address < kernel_end:
            raise LoaderError(f"initrd of {len(initrd) >> 20} MiB does not fit beside the kernel; give the machine more memory")
        memory.write(address, initrd)
        memory.write(MODLIST_GPA, struct.pack("<QQQQ", address, len(initrd), 0, 0))
        modules = 1
    entries = memory_map(memory)
    memory.write(MEMMAP_GPA, b"".join(struct.pack("<QQII", start, size, kind, 0) for start, size, kind in entries))
    memory.write(START_INFO_GPA, struct.pack("<IIIIQQQQII", START_INFO_MAGIC, 1, 0, modules, MODLIST_GPA if modules else 0,
                                             CMDLINE_GPA, rsdp, MEMMAP_GPA, len(entries), 0))
    return START_INFO_GPA
