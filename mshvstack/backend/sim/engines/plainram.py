"""Which guest-physical ranges are plain RAM: mapped readable, writable and executable.

The engine hooks memory faults only over the rest (unmapped addresses, MMIO,
read-only or no-execute regions, write-protected pages), because Unicorn
sends every store to a page covered by a memory hook down its slow path.
"""

from __future__ import annotations

ADDRESS_END = 1 << 64


class PlainRam:
    """Disjoint mapped segments [start, end), each plain or not, kept merged."""

    def __init__(self) -> None:
        self._segments: list[tuple[int, int, bool]] = []

    def map(self, start: int, size: int, plain: bool) -> None:
        self._assign(start, start + size, plain)

    def unmap(self, start: int, size: int) -> None:
        self._assign(start, start + size, None)

    def protect(self, start: int, size: int, plain: bool) -> None:
        """New permissions for the mapped parts of [start, start+size)."""
        end = start + size
        for a, b, _ in [s for s in self._segments if s[0] < end and s[1] > start]:
            self._assign(max(a, start), min(b, end), plain)

    def fault_ranges(self) -> list[tuple[int, int]]:
        """The complement of plain RAM over the 64-bit space, as inclusive [begin, end] pairs."""
        ranges: list[tuple[int, int]] = []
        cursor = 0
        for start, end, plain in self._segments:
            if plain:
                if start > cursor:
                    ranges.append((cursor, start - 1))
                cursor = end
        if cursor < ADDRESS_END:
            ranges.append((cursor, ADDRESS_END - 1))
        return ranges

    def _assign(self, start: int, end: int, value: bool | None) -> None:
        """[start, end) becomes ``value`` (None: unmapped)."""
        if start >= end:
            return
        kept: list[tuple[int, int, bool]] = []
        for a, b, v in self._segments:
            if b <= start or a >= end:
                kept.append((a, b, v))
                continue
            if a < start:
                kept.append((a, start, v))
            if b > end:
                kept.append((end, b, v))
        if value is not None:
            kept.append((start, end, value))
        kept.sort()
        merged: list[tuple[int, int, bool]] = []
        for segment in kept:
            if merged and merged[-1][1] == segment[0] and merged[-1][2] == segment[2]:
                merged[-1] = (merged[-1][0], segment[1], segment[2])
            else:
                merged.append(segment)
        self._segments = merged
