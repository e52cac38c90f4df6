"""A decoder per exit class, compiled from the binding's layout.

decode() runs on every VP exit, so what a VMM pays above the driver is
mostly this.  Reading a dozen cffi attribute chains costs microseconds, and
so does building a dozen-field dataclass in Python; the C decoder
(``_exitcore.c``) reads every field the class needs and builds the object in
one call, at the offsets, sizes, bit shifts and widths cffi reports for the
header's structs (never written here).  The layout is taken from
``ffi.typeof``, so it is the binding's; ``tests/test_exits.py`` checks that
every class decodes the same through both paths.  A class whose fields this
cannot lay out (a signed or non-integer leaf) gets no compiled decoder and
keeps the attribute path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mshvstack.abi import ffi
from mshvstack.partition import _exitcore

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


def build(plan: tuple[tuple[str, tuple[str, ...], Any], ...], ctype: Any, result: type, kinds: dict[str, Any],
          memos: dict[str, Any]) -> Callable[[Any, int], Any] | None:
    """A decoder (buffer, payload offset) -> a ``result`` (a frozen dataclass, built
    without its per-field __init__) for one class, or None where its layout is not
    one the compiled decoder reads.

    ``kinds`` gives the header class and its C type, and the segment class
    with its fields; ``memos`` the header and segment memos (dicts) and the
    functions that fill them on a miss.
    """
    fields: list[tuple[Any, ...]] = []
    for name, path, field_type in plan:
        if field_type is kinds["header"]:
            # The header says where the VP stopped: the same from one exit of an instruction to the
            # next, so it comes from a memo of its bytes.
            where = struct_at(ctype, path)
            if where is None or where[1] is not kinds["header_ctype"]:
                return None
            fields.append((name, _exitcore.HEADER, where[0], ffi.sizeof(where[1])))
        elif field_type is kinds["segment"]:
            parts = [leaf(ctype, path + (sub,)) for sub in kinds["segment_fields"]]
            if None in parts:
                return None
            fields.append((name, _exitcore.SEGMENT, *parts))
        elif field_type is bytes:
            span, count = array(ctype, path), leaf(ctype, ("instruction_byte_count",))
            if span is None or count is None:
                return None
            fields.append((name, _exitcore.BYTES, span[0], span[1], count))
        else:
            integer = leaf(ctype, path)
            if integer is None:
                return None
            fields.append((name, _exitcore.BOOL if field_type is bool else _exitcore.UINT, *integer))
    decoder: Callable[[Any, int], Any] = _exitcore.Decoder(result, tuple(fields), memos["header_memo"], memos["header_miss"],
                                                           memos["segment_memo"], memos["segment_miss"])
    return decoder
