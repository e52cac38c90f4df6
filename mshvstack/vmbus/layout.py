"""Fast ``struct`` packers laid out from the binding's structs.

A hot path (a frame's RNDIS header, an NVSP message per packet) should cost
one ``struct`` call, not a dozen cffi attribute reads; but the offsets and
sizes must be the headers', never restated.  ``Layout`` asks cffi where each
named integer leaf lives (``fastdecode.leaf``) and builds the format from
that, with pad bytes for everything it does not name.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from mshvstack.abi import ffi
from mshvstack.partition.fastdecode import leaf

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Layout:
    """Named integer fields of one C type (dotted paths, nested members and union arms
    included) packed and unpacked in the order given, spanning the type's whole size,
    or its first ``prefix`` bytes (a header read before the payload it announces)."""

    def __init__(self, ctype: str, *fields: str, prefix: int | None = None) -> None:
        self.ctype = ctype
        self.fields = fields
        self.size = ffi.sizeof(ctype) if prefix is None else prefix
        typ = ffi.typeof(ctype)
        placed = []
        for index, name in enumerate(fields):
            where = leaf(typ, tuple(name.split(".")))
            if where is None or where[2] >= 0 or where[1] not in _CODES:
                raise TypeError(f"{ctype}: {name} is not a plain unsigned integer field")
            placed.append((where[0], where[1], index))
        placed.sort()
        fmt, position, self._order = "<", 0, []
        for offset, size, index in placed:
            if offset < position or offset + size > self.size:
                raise TypeError(f"{ctype}: {fields[index]} overlaps another field or lies past the prefix")
            fmt += "x" * (offset - position) + _CODES[size]
            position = offset + size
            self._order.append(index)
        fmt += "x" * (self.size - position)
        self.struct = struct.Struct(fmt)
        identity = self._order == list(range(len(fields)))
        self._identity = identity
        # The fastest unpack there is: the struct's own bound method when the fields are
        # named in offset order (hot paths call this, not unpack_from).
        self.unpack: Any = self.struct.unpack_from if identity else self.unpack_from

    def pack(self, *values: int) -> bytes:
        """The whole type's bytes with ``values`` for the fields (in the order named), zeros elsewhere."""
        if self._identity:
            return self.struct.pack(*values)
        return self.struct.pack(*(values[i] for i in self._order))

    def pack_into(self, buffer: Any, offset: int, *values: int) -> None:
        if self._identity:
            self.struct.pack_into(buffer, offset, *values)
        else:
            self.struct.pack_into(buffer, offset, *(values[i] for i in self._order))

    def unpack_from(self, buffer: Any, offset: int = 0) -> tuple[int, ...]:
        """The fields' values in the order named (the buffer must hold the whole type)."""
        raw: tuple[int, ...] = self.struct.unpack_from(buffer, offset)
        if self._identity:
            return raw
        out = [0] * len(raw)
        for position, index in enumerate(self._order):
            out[index] = raw[position]
        return tuple(out)


@functools.lru_cache(maxsize=512)
def array(ctype: str, field: str, count: int) -> struct.Struct:
    """``count`` items of the array member ``field`` of ``ctype`` (a flexible array, such as a
    GPA range's page numbers), back to back, as one ``struct``."""
    fields = dict(ffi.typeof(ctype).fields)
    if field not in fields or fields[field].type.kind != "array":
        raise TypeError(f"{ctype}: {field} is not an array")
    item = fields[field].type.item
    size = ffi.sizeof(item)
    if item.kind == "struct":
        codes = Layout(item.cname, *(name for name, _f in item.fields)).struct.format.lstrip("<")
    elif item.kind == "primitive" and size in _CODES:
        codes = _CODES[size]
    else:
        raise TypeError(f"{ctype}: {field} holds {item.cname}, not integers")
    return struct.Struct("<" + codes * count)
