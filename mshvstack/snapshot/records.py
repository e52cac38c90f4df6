"""Typed records of the state a snapshot carries, and their section payloads.

Each record validates what it decodes (counts and lengths against the
payload and against limits) before building anything, and raises
SnapshotError naming the field that is wrong.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.snapshot.pages import nonzero_pages, pointer
from mshvstack.snapshot.stream import SnapshotError

PAGE = 4096
U64 = (1 << 64) - 1
MAX_VP_INDEX = 4096
MAX_REGISTERS = 1024
MAX_BLOBS = 16
MAX_BLOB = 1 << 20
MAX_CHUNK_PAGES = (64 << 20) // PAGE
MAX_CHUNK_BYTES = 2 * MAX_CHUNK_PAGES * PAGE   # a chunk's pages and its headers, with room to spare
_VP = "struct mshvstack_snapshot_vp"
_REGISTER = "struct mshvstack_snapshot_register"
_BLOB = "struct mshvstack_snapshot_blob"
_MEMORY = "struct mshvstack_snapshot_memory"


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class _Cursor:
    """Reads typed structs from a payload, refusing to go past its end."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.payload, self.at, self.what = payload, 0, what

    def take(self, size: int, part: str) -> memoryview:
        if size < 0 or self.at + size > len(self.payload):
            raise SnapshotError(f"{self.what}: {part} runs past the end of its section")
        view = memoryview(self.payload)[self.at : self.at + size]
        self.at += size
        return view

    def struct(self, ctype: str, part: str) -> object:
        return ffi.cast(f"{ctype} *", ffi.from_buffer(self.take(ffi.sizeof(ctype), part)))

    def done(self) -> None:
        if self.at != len(self.payload):
            raise SnapshotError(f"{self.what}: {len(self.payload) - self.at} bytes left over at the end of its section")


@dataclass(frozen=True)
class VpRecord:
    """One VP: every register it is restored with (hv_register_name -> 128-bit
    value, in restore order) and its MSHV_GET_VP_STATE blobs by kind."""

    VERSION: ClassVar[int] = 1
    index: int
    registers: dict[int, int] = field(default_factory=dict)
    blobs: dict[int, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        head = ffi.new(f"{_VP} *")
        head.index, head.registers, head.blobs = self.index, len(self.registers), len(self.blobs)
        parts = [bytes(ffi.buffer(head))]
        entry = ffi.new(f"{_REGISTER} *")
        for name, value in self.registers.items():
            entry.name, entry.low, entry.high = name, value & U64, value >> 64
            parts.append(bytes(ffi.buffer(entry)))
        blob_head = ffi.new(f"{_BLOB} *")
        for kind, data in self.blobs.items():
            blob_head.kind, blob_head.length = kind, len(data)
            parts.append(bytes(ffi.buffer(blob_head)))
            parts.append(data.ljust(_pad8(len(data)), b"\0"))
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> VpRecord:
        cursor = _Cursor(payload, "VP section")
        head = cursor.struct(_VP, "its header")
        index, count, blobs = int(head.index), int(head.registers), int(head.blobs)   # type: ignore[attr-defined]
        if index >= MAX_VP_INDEX or count > MAX_REGISTERS or blobs > MAX_BLOBS:
            raise SnapshotError(f"VP section: VP {index} with {count} registers and {blobs} blobs is beyond the limits")
        registers: dict[int, int] = {}
        for _ in range(count):
            entry = cursor.struct(_REGISTER, "a register")
            registers[int(entry.name)] = int(entry.low) | int(entry.high) << 64   # type: ignore[attr-defined]
        states: dict[int, bytes] = {}
        for _ in range(blobs):
            blob = cursor.struct(_BLOB, "a state blob header")
            kind, length = int(blob.kind), int(blob.length)   # type: ignore[attr-defined]
            if kind >= lib.MSHV_VP_STATE_COUNT or length > MAX_BLOB:
                raise SnapshotError(f"VP section: VP {index} has a state blob of kind {kind} and {length} bytes")
            states[kind] = bytes(cursor.take(_pad8(length), "a state blob")[:length])
        cursor.done()
        return cls(index, registers, states)


@dataclass(frozen=True)
class MemoryChunk:
    """Guest pages from ``gpa`` on: those given (by index) hold data, the rest are zero."""

    gpa: int
    pages: int
    data: dict[int, bytes]

    @classmethod
    def from_memory(cls, gpa: int, memory: bytes | memoryview) -> MemoryChunk:
        """The non-zero pages of ``memory`` (page-aligned, at ``gpa``)."""
        view = memoryview(memory)
        pages = len(view) // PAGE
        return cls(gpa, pages, {offset // PAGE: bytes(view[offset : offset + PAGE])
                                for offset in nonzero_pages(pointer(view), pages * PAGE)})

    def compressed(self) -> bytes:
        """The MEMORY_ZLIB payload (zlib's fastest level: a snapshot's kernel text and
        page cache shrink to about a third at memory speed)."""
        return zlib.compress(self.encode(), 1)

    @classmethod
    def decompress(cls, payload: bytes) -> MemoryChunk:
        """A MEMORY_ZLIB payload, never expanded beyond the largest chunk a writer makes."""
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, MAX_CHUNK_BYTES)
        except zlib.error as exc:
            raise SnapshotError(f"a compressed memory section does not decompress: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise SnapshotError("a compressed memory section expands beyond the largest chunk or is cut short")
        return cls.decode(raw)

    def encode(self) -> bytes:
        head = ffi.new(f"{_MEMORY} *")
        head.gpa, head.pages = self.gpa, self.pages
        bitmap = bytearray(_pad8((self.pages + 7) // 8))
        for i in self.data:
            bitmap[i // 8] |= 1 << (i % 8)
        return b"".join([bytes(ffi.buffer(head)), bytes(bitmap), *(self.data[i] for i in sorted(self.data))])

    @classmethod
    def decode(cls, payload: bytes) -> MemoryChunk:
        cursor = _Cursor(payload, "memory section")
        head = cursor.struct(_MEMORY, "its header")
        gpa, pages = int(head.gpa), int(head.pages)   # type: ignore[attr-defined]
        if gpa % PAGE or pages > MAX_CHUNK_PAGES or gpa + pages * PAGE > 1 << 52:
            raise SnapshotError(f"memory section: {pages} pages at GPA {gpa:#x} is not a valid chunk")
        bitmap = bytes(cursor.take(_pad8((pages + 7) // 8), "its page bitmap"))
        present = [i for i in range(pages) if bitmap[i // 8] >> (i % 8) & 1]
        if any(bitmap[i // 8] >> (i % 8) & 1 for i in range(pages, len(bitmap) * 8)):
            raise SnapshotError(f"memory section at GPA {gpa:#x}: bits set past its {pages} pages")
        data = {i: bytes(cursor.take(PAGE, "a page")) for i in present}
        cursor.done()
        return cls(gpa, pages, data)
