"""Encoders for the 256-byte hv_message the hypervisor sends per intercept."""

from __future__ import annotations

from typing import Any

from mshvstack.abi import ffi

HEADER_SIZE = ffi.sizeof("struct hv_message_header")


def new_message(message_type: int, payload_ctype: str) -> tuple[Any, Any]:
    """A zeroed hv_message of ``message_type`` and a typed view of its payload."""
    msg = ffi.new("struct hv_message *")
    msg.header.message_type = message_type
    msg.header.payload_size = ffi.sizeof(payload_ctype)
    payload = ffi.cast(f"{payload_ctype} *", ffi.addressof(msg.u))
    return msg, payload


def to_bytes(msg: Any) -> bytes:
    return bytes(ffi.buffer(msg))
