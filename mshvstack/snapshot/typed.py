"""Component records as JSON, checked against their dataclasses on the way back.

A component's state is a frozen dataclass with a ``VERSION``; its fields are
ints (unsigned, below 2**64), bools, strings, bytes (hex), ``None`` where the
type allows it, other records, or tuples of any of these.  Decoding treats
the text as hostile: every field must be present and of its declared type,
nothing else may be, tuples, strings and bytes are bounded (``max_items``
and ``max_bytes`` in a field's metadata raise the bounds), and a wrong value raises
SnapshotError naming the record and the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from mshvstack.snapshot.stream import SnapshotError

MAX_ITEMS = 1024
MAX_STRING = 4096
MAX_BYTES = 64 << 10
_U64_LIMIT = 1 << 64


def encode(record: Any) -> dict[str, Any]:
    """``{"version": V, "fields": {...}}`` for one record (nested records alike)."""
    return {"version": type(record).VERSION, "fields": {f.name: _encode_value(getattr(record, f.name))
                                                         for f in dataclasses.fields(record)}}


def _encode_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return encode(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


def dumps(record: Any) -> bytes:
    return json.dumps(encode(record), separators=(",", ":")).encode()


def loads(cls: type, payload: bytes, what: str) -> Any:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SnapshotError(f"{what}: not JSON") from None
    return decode(cls, data, what)


def decode(cls: type, data: Any, what: str) -> Any:
    """A ``cls`` built from ``data`` (parsed JSON), every field checked."""
    version = cls.VERSION  # type: ignore[attr-defined]
    if not isinstance(data, dict) or data.get("version") != version or not isinstance(data.get("fields"), dict):
        raise SnapshotError(f"{what}: not a version {version} {cls.__name__} record")
    given: dict[str, Any] = data["fields"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(given) != set(fields):
        raise SnapshotError(f"{what}: fields {sorted(set(given) ^ set(fields))} missing or unknown")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        values[name] = _decode_value(hints[name], given[name], f"{what}: field {name}", f.metadata)
    return cls(**values)


def _decode_value(expected: Any, value: Any, what: str, limits: Mapping[str, int]) -> Any:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _decode_value(option, value, what, limits)
            except SnapshotError:
                pass
        raise SnapshotError(f"{what} is not a valid {expected}")
    if origin is tuple:
        item, limit = typing.get_args(expected)[0], limits.get("max_items", MAX_ITEMS)
        if not isinstance(value, list) or len(value) > limit:
            raise SnapshotError(f"{what} is not a list of at most {limit} items")
        return tuple(_decode_value(item, v, what, limits) for v in value)
    if dataclasses.is_dataclass(expected):
        return decode(typing.cast(type, expected), value, what)
    if expected is bool and isinstance(value, bool):
        return value
    if expected is int and type(value) is int and 0 <= value < _U64_LIMIT:
        return value
    if expected is str and isinstance(value, str) and len(value) <= MAX_STRING:
        return value
    if expected is bytes and isinstance(value, str) and len(value) <= 2 * limits.get("max_bytes", MAX_BYTES):
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise SnapshotError(f"{what} is not a valid {getattr(expected, '__name__', expected)}")
