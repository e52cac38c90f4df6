"""The stream's framing: a header, then sections, each with its kind, length and
CRC-32.  Reading is for hostile input: every length is bounded before anything
is allocated, the checksum is verified before a payload is parsed, and every
refusal is one SnapshotError saying what was wrong and where."""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from mshvstack.abi import ffi, lib
from mshvstack.errors import MshvError

MAGIC = b"MSHVSNAP"
VERSION = int(lib.MSHVSTACK_SNAPSHOT_VERSION)
MAX_SECTION = 256 << 20   # a memory chunk of 64 MiB is the largest a writer makes
_HEADER = "struct mshvstack_snapshot_header"
_SECTION = "struct mshvstack_snapshot_section"


def _checksum(kind: int, length: int, payload: bytes) -> int:
    """CRC-32 of the section's kind and length, then its payload (a flipped kind is caught too)."""
    return zlib.crc32(payload, zlib.crc32(kind.to_bytes(4, "little") + length.to_bytes(8, "little")))


class SnapshotError(MshvError):
    """A snapshot or migration stream that cannot be used (truncated, corrupt, another version)."""


class SectionKind(enum.IntEnum):
    CONFIG = lib.MSHVSTACK_SECTION_CONFIG
    VP = lib.MSHVSTACK_SECTION_VP
    MEMORY = lib.MSHVSTACK_SECTION_MEMORY
    DEVICE = lib.MSHVSTACK_SECTION_DEVICE
    CLOCK = lib.MSHVSTACK_SECTION_CLOCK
    MEMORY_ZLIB = lib.MSHVSTACK_SECTION_MEMORY_ZLIB
    END = lib.MSHVSTACK_SECTION_END


@dataclass(frozen=True)
class Section:
    kind: SectionKind
    payload: bytes
    offset: int   # of its header in the stream (for error messages)


class StreamWriter:
    """Writes the header at once, then one section per call; ``end()`` completes it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        header = ffi.new(f"{_HEADER} *")
        ffi.memmove(header.magic, MAGIC, len(MAGIC))
        header.version = VERSION
        self._out.write(bytes(ffi.buffer(header)))
        self.bytes_written: int = ffi.sizeof(_HEADER)

    def section(self, kind: SectionKind, payload: bytes) -> None:
        if len(payload) > MAX_SECTION:
            raise SnapshotError(f"a {kind.name} section of {len(payload)} bytes is over the {MAX_SECTION}-byte limit")
        head = ffi.new(f"{_SECTION} *")
        head.kind, head.crc32, head.length = kind, _checksum(kind, len(payload), payload), len(payload)
        self._out.write(bytes(ffi.buffer(head)))
        self._out.write(payload)
        self.bytes_written += ffi.sizeof(_SECTION) + len(payload)

    def end(self) -> None:
        self.section(SectionKind.END, b"")
        self._out.flush()


class StreamReader:
    """Reads and checks the header, then yields sections until END (which must come)."""

    def __init__(self, source: BinaryIO, name: str = "snapshot") -> None:
        self._in = source
        self._name = name
        self._offset = 0
        raw = self._read(ffi.sizeof(_HEADER), "its header")
        header = ffi.cast(f"{_HEADER} *", ffi.from_buffer(raw))
        if bytes(header.magic) != MAGIC:
            raise SnapshotError(f"{name} is not an mshvstack snapshot (no MSHVSNAP header)")
        if header.version != VERSION:
            raise SnapshotError(f"{name} is snapshot format version {header.version}; this mshvstack reads version {VERSION}")
        if header.flags:
            raise SnapshotError(f"{name} has unknown header flags {int(header.flags):#x}")

    def _read(self, size: int, what: str) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self._in.read(left)
            if not chunk:
                raise SnapshotError(f"{self._name} is truncated at byte {self._offset + size - left} (in {what})")
            chunks.append(chunk)
            left -= len(chunk)
        self._offset += size
        return b"".join(chunks)

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> Section:
        if self._in is None:
            raise StopIteration
        at = self._offset
        raw = self._read(ffi.sizeof(_SECTION), "a section header")   # kept: the cast points into it
        head = ffi.cast(f"{_SECTION} *", ffi.from_buffer(raw))
        kind_value, length, crc = int(head.kind), int(head.length), int(head.crc32)
        try:
            kind = SectionKind(kind_value)
        except ValueError:
            raise SnapshotError(f"{self._name}: unknown section kind {kind_value:#x} at byte {at}") from None
        if length > MAX_SECTION:
            raise SnapshotError(f"{self._name}: a {kind.name} section of {length} bytes at byte {at} is over the limit")
        payload = self._read(length, f"a {kind.name} section")
        if _checksum(kind_value, length, payload) != crc:
            raise SnapshotError(f"{self._name}: the {kind.name} section at byte {at} is corrupt (checksum mismatch)")
        if kind is SectionKind.END:
            if payload:
                raise SnapshotError(f"{self._name}: the END section at byte {at} is not empty")
            self._in = None   # type: ignore[assignment]
            raise StopIteration
        return Section(kind, payload, at)
