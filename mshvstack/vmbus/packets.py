"""VMBus packets: parsed at the boundary into typed objects, every length checked."""

from __future__ import annotations

from dataclasses import dataclass

from mshvstack.abi import lib
from mshvstack.vmbus.errors import CorruptRing
from mshvstack.vmbus.layout import Layout, array

PAGE = int(lib.VMBUS_PAGE_SIZE)
INBAND = int(lib.VMBUS_PACKET_DATA_INBAND)
GPA_DIRECT = int(lib.VMBUS_PACKET_DATA_USING_GPA_DIRECT)
XFER_PAGES = int(lib.VMBUS_PACKET_DATA_USING_XFER_PAGES)
COMPLETION = int(lib.VMBUS_PACKET_COMP)
COMPLETION_REQUESTED = int(lib.VMBUS_PACKET_FLAG_COMPLETION_REQUESTED)
MAX_RANGES = 64
MAX_PAGES_PER_RANGE = 4096
DESCRIPTOR = Layout("struct vmpacket_descriptor", "type", "offset8", "len8", "flags", "trans_id")
GPA_DIRECT_HEADER = Layout("struct vmdata_gpa_direct_header", "range_count")
GPA_RANGE = Layout("struct vmbus_gpa_range", "byte_count", "byte_offset")
XFER_HEADER = Layout("struct vmtransfer_page_packet_header", "xfer_pageset_id", "sender_owns_set", "range_count")
_descriptor = DESCRIPTOR.unpack
DESCRIPTOR_SIZE = DESCRIPTOR.size
_pack_descriptor = DESCRIPTOR.struct.pack   # the fields are named in offset order


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


def _gpa_ranges(raw: bytes | memoryview, start: int, end: int, count: int) -> tuple[GpaRange, ...]:
    if not 1 <= count <= MAX_RANGES:
        raise CorruptRing(f"GPA-direct packet with {count} ranges")
    ranges = []
    offset = start
    for _ in range(count):
        if offset + GPA_RANGE.size > end:
            raise CorruptRing("GPA range header runs past the packet header")
        byte_count, byte_offset = GPA_RANGE.unpack_from(raw, offset)
        if byte_offset >= PAGE or byte_count == 0:
            raise CorruptRing(f"GPA range with offset {byte_offset} and length {byte_count}")
        pages = (byte_offset + byte_count + PAGE - 1) // PAGE
        pfn_array = array("struct vmbus_gpa_range", "pfn_array", pages) if pages <= MAX_PAGES_PER_RANGE else None
        if pfn_array is None or offset + GPA_RANGE.size + pfn_array.size > end:
            raise CorruptRing(f"GPA range of {pages} pages does not fit the packet header")
        pfns = pfn_array.unpack_from(raw, offset + GPA_RANGE.size)
        ranges.append(GpaRange(byte_count, byte_offset, tuple(pfns)))
        offset += GPA_RANGE.size + pfn_array.size
    return tuple(ranges)


def parse(raw: bytes | memoryview) -> Packet:
    """A packet read from a ring (descriptor onward, without the trailer).  The Packet
    owns its bytes: ``raw`` may be a view of a ring's buffer, reused by its next read."""
    if len(raw) < DESCRIPTOR_SIZE:
        raise CorruptRing("packet shorter than its descriptor")
    kind, offset8, len8, flags, trans_id = _descriptor(raw)
    header_end = offset8 * 8
    if len8 * 8 != len(raw) or header_end < DESCRIPTOR_SIZE or header_end > len(raw):
        raise CorruptRing(f"descriptor offset8 {offset8} / len8 {len8} do not match a {len(raw)}-byte packet")
    if flags & ~COMPLETION_REQUESTED:
        raise CorruptRing(f"unknown packet flags {flags:#x}")
    payload = bytes(raw[header_end:])   # a copy of a view; a slice of bytes is one already
    requested = bool(flags & COMPLETION_REQUESTED)
    if kind in (INBAND, COMPLETION):
        return Packet(kind, trans_id, requested, payload)
    if kind == GPA_DIRECT:
        if header_end < GPA_DIRECT_HEADER.size:
            raise CorruptRing("GPA-direct packet without its range header")
        (count,) = GPA_DIRECT_HEADER.unpack_from(raw)
        return Packet(kind, trans_id, requested, payload, _gpa_ranges(raw, GPA_DIRECT_HEADER.size, header_end, count))
    if kind == XFER_PAGES:
        if header_end < XFER_HEADER.size:
            raise CorruptRing("transfer-page packet without its header")
        pageset, _owns, count = XFER_HEADER.unpack_from(raw)
        if count > MAX_RANGES:
            raise CorruptRing(f"transfer-page packet with {count} ranges")
        ranges = array("struct vmtransfer_page_packet_header", "ranges", count)
        if XFER_HEADER.size + ranges.size > header_end:
            raise CorruptRing(f"transfer-page packet with {count} ranges")
        flat = ranges.unpack_from(raw, XFER_HEADER.size)
        return Packet(kind, trans_id, requested, payload, xfer_pageset_id=pageset,
                      xfer_ranges=tuple(zip(flat[0::2], flat[1::2])))
    raise CorruptRing(f"packet type {kind:#x} is not accepted on this channel")


def build(kind: int, payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> bytes:
    """An in-band or completion packet (header 16 bytes, payload padded to 8)."""
    padded = payload + bytes(-len(payload) % 8)
    flags = COMPLETION_REQUESTED if completion_requested else 0
    offset8 = DESCRIPTOR_SIZE // 8
    return _pack_descriptor(kind, offset8, offset8 + len(padded) // 8, flags, transaction_id) + padded


def inband(payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> bytes:
    return build(INBAND, payload, transaction_id, completion_requested)


def completion(transaction_id: int, payload: bytes) -> bytes:
    return build(COMPLETION, payload, transaction_id)
