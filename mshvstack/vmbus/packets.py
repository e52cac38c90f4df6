"""VMBus packets: parsed at the boundary into typed objects, every length checked."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mshvstack.abi import lib
from mshvstack.vmbus.errors import CorruptRing

PAGE = int(lib.VMBUS_PAGE_SIZE)
INBAND = int(lib.VMBUS_PACKET_DATA_INBAND)
GPA_DIRECT = int(lib.VMBUS_PACKET_DATA_USING_GPA_DIRECT)
XFER_PAGES = int(lib.VMBUS_PACKET_DATA_USING_XFER_PAGES)
COMPLETION = int(lib.VMBUS_PACKET_COMP)
COMPLETION_REQUESTED = int(lib.VMBUS_PACKET_FLAG_COMPLETION_REQUESTED)
MAX_RANGES = 64
MAX_PAGES_PER_RANGE = 4096


@dataclass(frozen=True)
class GpaRange:
    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]


@dataclass(frozen=True)
class Packet:
    type: int
    transaction_id: int
    completion_requested: bool
    payload: bytes
    ranges: tuple[GpaRange, ...] = ()
    xfer_pageset_id: int = 0
    xfer_ranges: tuple[tuple[int, int], ...] = ()


def _gpa_ranges(raw: bytes, start: int, end: int, count: int) -> tuple[GpaRange, ...]:
    if not 1 <= count <= MAX_RANGES:
        raise CorruptRing(f"GPA-direct packet with {count} ranges")
    ranges = []
    offset = start
    for _ in range(count):
        if offset + 8 > end:
            raise CorruptRing("GPA range header runs past the packet header")
        byte_count, byte_offset = struct.unpack_from("<II", raw, offset)
        if byte_offset >= PAGE or byte_count == 0:
            raise CorruptRing(f"GPA range with offset {byte_offset} and length {byte_count}")
        pages = (byte_offset + byte_count + PAGE - 1) // PAGE
        if pages > MAX_PAGES_PER_RANGE or offset + 8 + 8 * pages > end:
            raise CorruptRing(f"GPA range of {pages} pages does not fit the packet header")
        pfns = struct.unpack_from(f"<{pages}Q", raw, offset + 8)
        ranges.append(GpaRange(byte_count, byte_offset, tuple(pfns)))
        offset += 8 + 8 * pages
    return tuple(ranges)


def parse(raw: bytes) -> Packet:
    """A packet read from a ring (descriptor onward, without the trailer)."""
    if len(raw) < 16:
        raise CorruptRing("packet shorter than its descriptor")
    kind, offset8, len8, flags, trans_id = struct.unpack_from("<HHHHQ", raw)
    header_end = offset8 * 8
    if len8 * 8 != len(raw) or header_end < 16 or header_end > len(raw):
        raise CorruptRing(f"descriptor offset8 {offset8} / len8 {len8} do not match a {len(raw)}-byte packet")
    if flags & ~COMPLETION_REQUESTED:
        raise CorruptRing(f"unknown packet flags {flags:#x}")
    payload = raw[header_end:]
    requested = bool(flags & COMPLETION_REQUESTED)
    if kind in (INBAND, COMPLETION):
        return Packet(kind, trans_id, requested, payload)
    if kind == GPA_DIRECT:
        if header_end < 24:
            raise CorruptRing("GPA-direct packet without its range header")
        (count,) = struct.unpack_from("<I", raw, 20)
        return Packet(kind, trans_id, requested, payload, _gpa_ranges(raw, 24, header_end, count))
    if kind == XFER_PAGES:
        if header_end < 24:
            raise CorruptRing("transfer-page packet without its header")
        pageset, _owns, _r, count = struct.unpack_from("<HBBI", raw, 16)
        if 24 + 8 * count > header_end or count > MAX_RANGES:
            raise CorruptRing(f"transfer-page packet with {count} ranges")
        xfer = tuple(struct.unpack_from("<II", raw, 24 + 8 * i) for i in range(count))
        return Packet(kind, trans_id, requested, payload, xfer_pageset_id=pageset,
                      xfer_ranges=tuple((c, o) for c, o in xfer))
    raise CorruptRing(f"packet type {kind:#x} is not accepted on this channel")


def build(kind: int, payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> bytes:
    """An in-band or completion packet (header 16 bytes, payload padded to 8)."""
    padded = payload + bytes(-len(payload) % 8)
    flags = COMPLETION_REQUESTED if completion_requested else 0
    return struct.pack("<HHHHQ", kind, 2, 2 + len(padded) // 8, flags, transaction_id) + padded


def inband(payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> bytes:
    return build(INBAND, payload, transaction_id, completion_requested)


def completion(transaction_id: int, payload: bytes) -> bytes:
    return build(COMPLETION, payload, transaction_id)
