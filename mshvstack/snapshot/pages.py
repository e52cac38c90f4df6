"""Guest pages compared at memcmp speed (a memoryview compares element by element,
ten times slower: 1.5 s for 512 MiB here), for snapshots (which pages are zero)
and pre-copy (which pages changed since they were sent)."""

from __future__ import annotations

from typing import Any

from mshvstack.abi import ffi as _ffi
from mshvstack.abi import lib as _libc  # memcmp, compiled into the binding (no C parser at import)

PAGE = 4096
SPAN = 64 * PAGE   # compared at once; only a span that differs is compared page by page

_ZERO = bytes(SPAN)
_ZERO_POINTER = _ffi.from_buffer(_ZERO)


def pointer(buffer: Any) -> Any:
    """A C pointer to ``buffer``'s bytes (kept valid while ``buffer`` lives)."""
    return _ffi.from_buffer(buffer)


def differing_pages(first: Any, second: Any, size: int) -> list[int]:
    """Byte offsets of the pages in which two ``size``-byte areas (pointers) differ."""
    found: list[int] = []
    for span in range(0, size, SPAN):
        length = min(SPAN, size - span)
        if _libc.memcmp(first + span, second + span, length):
            found.extend(offset for offset in range(span, span + length, PAGE) if _libc.memcmp(first + offset, second + offset, PAGE))
    return found


def nonzero_pages(area: Any, size: int) -> list[int]:
    """Byte offsets of the pages of a ``size``-byte area (a pointer) that are not all zero."""
    found: list[int] = []
    for span in range(0, size, SPAN):
        length = min(SPAN, size - span)
        if _libc.memcmp(area + span, _ZERO_POINTER, length):
            found.extend(offset for offset in range(span, span + length, PAGE) if _libc.memcmp(area + offset, _ZERO_POINTER, PAGE))
    return found
