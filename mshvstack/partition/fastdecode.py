"""A decoder per exit class compiled from the binding's layout: one struct.unpack_from.

decode() runs on every VP exit, so what a VMM pays above the driver is
mostly this.  Reading a dozen cffi attribute chains costs microseconds;
one ``struct.unpack_from`` of every field the class needs, at the offsets,
sizes, bit shifts and widths cffi reports for the header's structs (never
written here), costs a fraction.  The layout is taken from ``ffi.typeof``,
so it is the binding's; ``tests/test_exits.py`` checks that every class
decodes the same through both paths.  A class whose fields this cannot lay
out (a signed or non-integer leaf, overlapping storage) gets no fast decoder
and keeps the attribute path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from mshvstack.abi import ffi

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_UNSIGNED = ("unsigned char", "unsigned short", "unsigned int", "unsigned long", "unsigned long long", "_Bool",
             "uint8_t", "uint16_t", "uint32_t", "uint64_t")

Leaf = tuple[int, int, int, int]   # (byte offset, size, bit shift or -1, bit width or -1)


def leaf(ctype: Any, path: tuple[str, ...]) -> Leaf | None:
    """Where the integer at ``path`` inside ``ctype`` lives, or None if it is not a plain unsigned integer."""
    offset, field, current = 0, None, ctype
    for part in path:
        if current.kind not in ("struct", "union"):
            return None
        fields = dict(current.fields)
        if part not in fields:
            return None
        field = fields[part]
        offset += field.offset
        current = field.type
    if field is None or current.kind != "primitive" or current.cname not in _UNSIGNED:
        return None
    return offset, ffi.sizeof(current), field.bitshift, field.bitsize


def _walk(ctype: Any, path: tuple[str, ...]) -> tuple[int, Any] | None:
    """(offset, type) of the member at ``path``, or None if there is none."""
    offset, current = 0, ctype
    for part in path:
        fields = dict(current.fields) if current.kind in ("struct", "union") else {}
        if part not in fields:
            return None
        offset += fields[part].offset
        current = fields[part].type
    return offset, current


def struct_at(ctype: Any, path: tuple[str, ...]) -> tuple[int, Any] | None:
    """(offset, type) of the struct or union at ``path``."""
    found = _walk(ctype, path)
    return found if found is not None and found[1].kind in ("struct", "union") else None


def array(ctype: Any, path: tuple[str, ...]) -> tuple[int, int] | None:
    """(offset, length) of a byte array at ``path``."""
    found = _walk(ctype, path)
    if found is None or found[1].kind != "array" or ffi.sizeof(found[1].item) != 1:
        return None
    return found[0], found[1].length


class Layout:
    """The containers (distinct storage units) the leaves of one class read, as one struct."""

    def __init__(self) -> None:
        self.containers: set[tuple[int, int]] = set()

    def value(self, where: Leaf) -> str:
        """A Python expression for one leaf over the unpacked tuple ``v`` (its index
        a placeholder until the layout is known)."""
        offset, size, shift, bits = where
        self.containers.add((offset, size))
        item = f"v[@{offset}_{size}@]"
        if shift < 0:
            return item
        return f"({item} & {(1 << bits) - 1})" if shift == 0 else f"(({item} >> {shift}) & {(1 << bits) - 1})"

    def compile(self, body: str) -> tuple[struct.Struct, str] | None:
        """The struct over every container in offset order, and ``body`` with real indices."""
        fmt, position = "<", 0
        for index, (offset, size) in enumerate(sorted(self.containers)):
            if offset < position or size not in _CODES:
                return None   # overlapping storage (a union read two ways): not a straight layout
            fmt += "x" * (offset - position) + _CODES[size]
            position = offset + size
            body = body.replace(f"@{offset}_{size}@", str(index))
        return struct.Struct(fmt), body


def build(plan: tuple[tuple[str, tuple[str, ...], Any], ...], ctype: Any, result: type, kinds: dict[str, Any],
          namespace: dict[str, Any]) -> Callable[[Any, int], Any] | None:
    """A function (buffer, payload offset) -> a ``result`` (a frozen dataclass, built
    without its per-field __init__) for one class, or None.

    ``kinds`` gives the header class and its C type, and the segment class
    with its fields; ``namespace`` the helpers the generated code calls
    (``_segment``, ``_header``).
    """
    layout = Layout()

    def integer(path: tuple[str, ...], as_bool: bool = False) -> str | None:
        where = leaf(ctype, path)
        if where is None:
            return None
        expression = layout.value(where)
        return f"({expression} != 0)" if as_bool else expression

    def segment(path: tuple[str, ...]) -> str | None:
        parts = [integer(path + (sub,)) for sub in kinds["segment_fields"]]
        return None if None in parts else f"_segment(({', '.join(parts)},))"   # type: ignore[arg-type]

    items: list[str] = []
    for name, path, field_type in plan:
        if field_type is kinds["header"]:
            # The header says where the VP stopped: the same from one exit of an instruction to the
            # next, so it has its own decoder behind a memo (``_header(buffer, offset)``).
            where = struct_at(ctype, path)
            if where is None or where[1] is not kinds["header_ctype"]:
                return None
            items.append(f"{name!r}: _header(buffer, base + {where[0]})")
        elif field_type is kinds["segment"]:
            expression = segment(path)
            if expression is None:
                return None
            items.append(f"{name!r}: {expression}")
        elif field_type is bytes:
            span, count = array(ctype, path), integer(("instruction_byte_count",))
            if span is None or count is None:
                return None
            start = f"base + {span[0]}"
            length = f"(min({count}, {span[1]}) or {span[1]})"   # a count past the array reads the array
            items.append(f"{name!r}: bytes(buffer[{start} : {start} + {length}])")
        else:
            expression = integer(path, field_type is bool)
            if expression is None:
                return None
            items.append(f"{name!r}: {expression}")
    compiled = layout.compile(", ".join(items))
    if compiled is None:
        return None
    packed, body = compiled
    source = (f"def decode(buffer, base):\n    v = _unpack(buffer, base)\n    made = _new(_result)\n"
              f"    made.__dict__.update({{{body}}})\n    return made\n")
    scope = {**namespace, "_unpack": packed.unpack_from, "_new": object.__new__, "_result": result}
    exec(compile(source, f"<decoder for {ctype.cname}>", "exec"), scope)   # noqa: S102 - our own generated code
    decoder: Callable[[Any, int], Any] = scope["decode"]
    return decoder
