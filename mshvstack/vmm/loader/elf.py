"""ELF kernels (pyelftools): PVH entry when the note is present, else e_entry in long mode."""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmm.loader import LoaderError

XEN_ELFNOTE_PHYS32_ENTRY = 18
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class LoadedElf:
    entry: int                 # e_entry, or the PVH 32-bit entry
    pvh: bool
    segments: tuple[tuple[int, int], ...]  # (gpa, memsz) of each PT_LOAD
    end: int                   # first byte after the highest segment


def _pvh_entry(elf: ELFFile, name: str) -> int | None:
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_NOTE":
            continue
        for note in segment.iter_notes():
            if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                desc = note["n_desc"]
                raw = desc if isinstance(desc, bytes) else bytes.fromhex(desc) if isinstance(desc, str) else b""
                if note["n_descsz"] not in (4, 8) or len(raw) != note["n_descsz"]:
                    raise LoaderError(f"{name}: the PVH entry note holds {note['n_descsz']} bytes (4 or 8 expected)")
                entry = int.from_bytes(raw, "little")
                if entry >= 1 << 32:
                    raise LoaderError(f"{name}: the PVH entry {entry:#x} is not a 32-bit address")
                return entry
    return None


def load_elf(image: bytes, memory: GuestMemory, name: str = "kernel") -> LoadedElf:
    """Copy every PT_LOAD segment to its physical address; validate everything first."""
    if image[:4] != ELF_MAGIC:
        raise LoaderError(f"{name}: not an ELF file (no \\x7fELF magic)")
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf.get_machine_arch() != "x64":
            raise LoaderError(f"{name}: ELF for {elf.get_machine_arch()}, not x86-64")
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        pvh = _pvh_entry(elf, name)
        plan = []
        ram_end = max((r.gpa + r.size for r in memory.regions), default=0)
        for seg in loads:
            paddr, filesz, memsz, offset = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"], seg["p_offset"]
            if filesz > memsz or offset + filesz > len(image):
                raise LoaderError(f"{name}: truncated or corrupt segment at {paddr:#x}")
            if paddr + memsz > ram_end:
                raise LoaderError(f"{name}: segment {paddr:#x}-{paddr + memsz:#x} lies outside guest RAM "
                                  f"({memory.size >> 20} MiB); give the machine more memory")
            plan.append((paddr, image[offset : offset + filesz], memsz))
        entry = pvh if pvh is not None else elf["e_entry"]
    except LoaderError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises many kinds on corrupt input
        raise LoaderError(f"{name}: corrupt ELF file ({type(exc).__name__}: {exc})") from None
    if not plan:
        raise LoaderError(f"{name}: ELF file has no loadable segments")
    for paddr, _data, memsz in plan:
        try:
            memory.view(paddr, memsz)
        except GuestMemoryError:
            raise LoaderError(f"{name}: segment {paddr:#x}-{paddr + memsz:#x} lies outside guest RAM "
                              f"({memory.size >> 20} MiB); give the machine more memory") from None
    for paddr, data, memsz in plan:
        memory.write(paddr, data + bytes(memsz - len(data)))
    return LoadedElf(entry, pvh is not None, tuple((p, m) for p, _d, m in plan), max(p + m for p, _d, m in plan))
