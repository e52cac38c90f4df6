"""Exit codec: every intercept type decodes what it encodes (hypothesis)."""

from __future__ import annotations

import struct
import typing
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.partition import exits
from mshvstack.partition.exits import EXIT_TYPES, MESSAGE_SIZE, InterceptHeader, IoPortIntercept, Segment, UnknownExit, decode, encode


def _c_field(ctype: str, path: str) -> Any:
    t = ffi.typeof(ctype)
    field = None
    for part in path.split("."):
        field = dict(t.fields)[part]
        t = field.type
    return field


def _int_strategy(field: Any) -> st.SearchStrategy[int]:
    bits = field.bitsize if field.bitsize > 0 else ffi.sizeof(field.type) * 8
    return st.integers(0, (1 << bits) - 1)


_SEGMENTS = st.builds(Segment, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
_HEADERS = st.builds(InterceptHeader, st.integers(0, 2**32 - 1), st.integers(0, 15), st.integers(0, 2), st.integers(0, 15),
                     st.integers(0, 3), st.booleans(), st.booleans(), st.booleans(), _SEGMENTS,
                     st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


def _strategy(cls: type) -> st.SearchStrategy[Any]:
    fields = {}
    for name, kind in typing.get_type_hints(cls).items():
        if name in ("message_type", "payload_ctype", "paths"):
            continue
        if kind is InterceptHeader:
            fields[name] = _HEADERS
        elif kind is Segment:
            fields[name] = _SEGMENTS
        elif kind is bytes:
            fields[name] = st.binary(min_size=1, max_size=16)
        elif kind is bool:
            fields[name] = st.booleans()
        else:
            fields[name] = _int_strategy(_c_field(cls.payload_ctype, cls.paths.get(name, name)))  # type: ignore[attr-defined]
    return st.builds(cls, **fields)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_exit_round_trips(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(EXIT_TYPES))
    exit_ = data.draw(_strategy(cls))
    raw = encode(exit_)
    assert len(raw) == lib.HV_MESSAGE_SIZE
    assert decode(raw) == exit_


def test_every_intercept_type_listed_by_the_issue_is_decoded() -> None:
    wanted = {"X64_IO_PORT_INTERCEPT", "GPA_INTERCEPT", "UNMAPPED_GPA", "X64_CPUID_INTERCEPT", "X64_MSR_INTERCEPT",
              "X64_EXCEPTION_INTERCEPT", "X64_HALT", "HYPERCALL_INTERCEPT", "X64_APIC_EOI", "SYNIC_SINT_DELIVERABLE",
              "UNRECOVERABLE_EXCEPTION", "INVALID_VP_REGISTER_VALUE"}
    decoded = {cls.message_type for cls in EXIT_TYPES}
    assert {int(getattr(lib, f"HVMSG_{n}")) for n in wanted} <= decoded


@given(st.binary(min_size=256, max_size=256))
def test_arbitrary_messages_never_crash_the_decoder(raw: bytes) -> None:
    exit_ = decode(raw)
    assert isinstance(exit_, exits.VpExit)
    if isinstance(exit_, UnknownExit):
        assert exit_.raw == raw


def test_short_message_is_rejected() -> None:
    import pytest
    with pytest.raises(ValueError):
        decode(b"\0" * 10)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(exits._REGISTRY)), body=st.binary(min_size=256, max_size=256))
def test_the_compiled_decoder_reads_exactly_what_the_binding_reads(kind: int, body: bytes) -> None:
    """Each class's compiled decoder (offsets, shifts and widths from cffi) against
    cffi's own attribute access, on arbitrary message bytes."""
    raw = bytearray(body)
    struct.pack_into("<I", raw, 0, kind)
    msg = ffi.from_buffer("struct hv_message *", bytes(raw))
    cls = exits._REGISTRY[kind]
    assert exits.fast_decoder(cls) is not None, cls.__name__
    assert exits.decode_message(msg, buffer=bytes(raw)) == exits.decode_message(msg)


def test_the_compiled_decoder_refuses_what_it_cannot_read() -> None:
    """A buffer too short for the payload, or a plan it does not know: an error, never a read past the end."""
    import pytest

    from mshvstack.partition import _exitcore

    decoder = exits.fast_decoder(IoPortIntercept)
    with pytest.raises(ValueError, match="does not fit"):
        decoder(bytes(exits._PAYLOAD_OFFSET + 8), exits._PAYLOAD_OFFSET)
    with pytest.raises(ValueError, match="does not fit"):
        decoder(bytes(MESSAGE_SIZE), MESSAGE_SIZE)
    with pytest.raises(TypeError):
        decoder(bytes(MESSAGE_SIZE))
    with pytest.raises(ValueError, match="field 0"):
        _exitcore.Decoder(IoPortIntercept, (("rax", _exitcore.UINT, 0, 3, -1, -1),), {}, print, {}, print)   # a 3-byte integer
    with pytest.raises(ValueError, match="field 1"):
        _exitcore.Decoder(IoPortIntercept, (("rax", _exitcore.UINT, 0, 8, -1, -1), ("rcx", 99)), {}, print, {}, print)
