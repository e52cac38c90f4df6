"""The snapshot stream and its records: exact round trips, hostile streams
refused with one clear error, and a multi-VP guest saved mid-computation
through the public API and restored into a new partition going on exactly."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.partition import IoPortIntercept, Mshv, Partition, Segment, Vp
from mshvstack.snapshot import MemoryChunk, SectionKind, SnapshotError, StreamReader, StreamWriter, VpRecord
from mshvstack.snapshot.stream import MAX_SECTION
from mshvstack.snapshot.vp import restore_vp, save_vp

PAGE = 4096
vp_records = st.builds(VpRecord, index=st.integers(0, 255),
                       registers=st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**128 - 1), max_size=40),
                       blobs=st.dictionaries(st.integers(0, lib.MSHV_VP_STATE_COUNT - 1), st.binary(max_size=300), max_size=5))
chunks = st.integers(1, 24).flatmap(lambda pages: st.builds(
    MemoryChunk, gpa=st.integers(0, 2**20).map(lambda n: n * PAGE), pages=st.just(pages),
    data=st.dictionaries(st.integers(0, pages - 1), st.binary(min_size=PAGE, max_size=PAGE), max_size=pages)))


@given(vp_records)
def test_a_vp_record_round_trips(record: VpRecord) -> None:
    assert VpRecord.decode(record.encode()) == record


@given(chunks)
def test_a_memory_chunk_round_trips(chunk: MemoryChunk) -> None:
    assert MemoryChunk.decode(chunk.encode()) == chunk


def test_zero_pages_are_left_out() -> None:
    memory = bytearray(16 * PAGE)
    memory[5 * PAGE + 17] = 1
    chunk = MemoryChunk.from_memory(0x100000, memory)
    assert set(chunk.data) == {5} and len(chunk.encode()) < 2 * PAGE


def _stream(records: list[VpRecord], chunk: MemoryChunk) -> bytes:
    out = io.BytesIO()
    writer = StreamWriter(out)
    writer.section(SectionKind.CONFIG, b'{"vcpus": 2}')
    for record in records:
        writer.section(SectionKind.VP, record.encode())
    writer.section(SectionKind.MEMORY, chunk.encode())
    writer.end()
    return out.getvalue()


def _read_all(data: bytes) -> list[object]:
    decoded: list[object] = []
    for section in StreamReader(io.BytesIO(data)):
        if section.kind is SectionKind.VP:
            decoded.append(VpRecord.decode(section.payload))
        elif section.kind is SectionKind.MEMORY:
            decoded.append(MemoryChunk.decode(section.payload))
        else:
            decoded.append(section.payload)
    return decoded


_SAMPLE = _stream([VpRecord(0, {1: 2, 3: 2**100}, {0: b"lapic"}), VpRecord(1, {7: 9})],
                  MemoryChunk(0x2000, 3, {1: b"\x5a" * PAGE}))


def test_a_stream_reads_back_as_written() -> None:
    assert _read_all(_SAMPLE) == [b'{"vcpus": 2}', VpRecord(0, {1: 2, 3: 2**100}, {0: b"lapic"}), VpRecord(1, {7: 9}),
                                  MemoryChunk(0x2000, 3, {1: b"\x5a" * PAGE})]


@given(st.integers(0, len(_SAMPLE) - 1))
def test_a_truncated_stream_is_refused(cut: int) -> None:
    with pytest.raises(SnapshotError, match="truncated|not an mshvstack snapshot"):
        _read_all(_SAMPLE[:cut])


@settings(max_examples=300)
@given(st.integers(0, len(_SAMPLE) * 8 - 1))
def test_any_flipped_bit_is_refused(bit: int) -> None:
    corrupt = bytearray(_SAMPLE)
    corrupt[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SnapshotError):
        _read_all(bytes(corrupt))


@given(st.binary(max_size=200))
def test_any_bytes_give_a_record_or_a_clear_error(payload: bytes) -> None:
    for decode in (VpRecord.decode, MemoryChunk.decode):
        try:
            decode(payload)
        except SnapshotError:
            pass


def test_other_versions_and_huge_sections_are_refused_without_reading_them() -> None:
    header = ffi.new("struct mshvstack_snapshot_header *")
    ffi.memmove(header.magic, b"MSHVSNAP", 8)
    header.version = lib.MSHVSTACK_SNAPSHOT_VERSION + 1
    with pytest.raises(SnapshotError, match="version 2; this mshvstack reads version 1"):
        StreamReader(io.BytesIO(bytes(ffi.buffer(header))))
    section = ffi.new("struct mshvstack_snapshot_section *")
    section.kind, section.length = lib.MSHVSTACK_SECTION_MEMORY, 2**63
    huge = _SAMPLE[: ffi.sizeof("struct mshvstack_snapshot_header")] + bytes(ffi.buffer(section))
    with pytest.raises(SnapshotError, match="over the limit"):
        _read_all(huge)
    assert MAX_SECTION < 2**30
    bad = bytearray(VpRecord(0, {}, {}).encode())
    ffi.cast("struct mshvstack_snapshot_vp *", ffi.from_buffer(bad)).registers = 2**31   # more than any VP has
    with pytest.raises(SnapshotError, match="beyond the limits"):
        VpRecord.decode(bytes(bad))


# Real mode, each VP at 0x1000 with its index in BX: an x87 sum and an integer sum
# over 1000 + 7 * BX steps, interrupted half way by OUT 0x10 (where the VMM saves
# the machine), then the other half, the results stored at 0x3000 + 16 * BX, OUT 0x11.
#   fninit; fldz; xor dx, dx; mov cx, 500; 1: fld1; faddp; add dx, cx; loop 1b
#   out 0x10
#   mov cx, bx; imul cx, cx, 7; add cx, 500; 2: fld1; faddp; add dx, cx; loop 2b
#   mov si, bx; shl si, 4; fstp qword [si + 0x3000]; mov [si + 0x3008], dx; out 0x11
_GUEST = bytes.fromhex("dbe3" "d9ee" "31d2" "b9f401" "d9e8" "dec1" "01ca" "e2f8"
                       "e610"
                       "89d9" "6bc907" "81c1f401" "d9e8" "dec1" "01ca" "e2f8"
                       "89de" "c1e604" "dd9c0030" "89940830" "e611")


def _machine(mshv: Mshv, vcpus: int) -> tuple[Partition, list[Vp]]:
    part = mshv.create_partition()
    part.initialize()
    part.map_memory(0, 0x10000)
    vps = [part.create_vp(i) for i in range(vcpus)]
    return part, vps


def _run_to(vp: Vp, port: int) -> None:
    exit_ = vp.run()
    assert isinstance(exit_, IoPortIntercept) and exit_.port_number == port, exit_
    regs = vp.regs
    regs.rip += 2   # the VMM handled the OUT
    vp.regs = regs


def test_a_multi_vp_guest_saved_half_way_goes_on_exactly_after_a_restore() -> None:
    with Mshv.open("sim") as mshv:
        part, vps = _machine(mshv, 2)
        part.memory.write(0x1000, _GUEST)
        for vp in vps:
            sregs = vp.sregs
            sregs.cs = Segment(base=0, limit=0xFFFF, selector=0, attributes=0x9B)
            vp.sregs = sregs
            regs = vp.regs
            regs.rip, regs.rflags, regs.rbx = 0x1000, 2, vp.index
            vp.regs = regs
        for vp in vps:
            _run_to(vp, 0x10)
        out = io.BytesIO()
        writer = StreamWriter(out)
        for vp in vps:
            writer.section(SectionKind.VP, save_vp(vp).encode())
        region = part.memory.regions[0]
        writer.section(SectionKind.MEMORY, MemoryChunk.from_memory(region.gpa, part.memory.read(region.gpa, region.size)).encode())
        writer.end()
        part.close()

        restored, moved = _machine(mshv, 2)
        for section in StreamReader(io.BytesIO(out.getvalue())):
            if section.kind is SectionKind.VP:
                record = VpRecord.decode(section.payload)
                restore_vp(moved[record.index], record)
            elif section.kind is SectionKind.MEMORY:
                chunk = MemoryChunk.decode(section.payload)
                for page, data in chunk.data.items():
                    restored.memory.write(chunk.gpa + page * PAGE, data)
        for vp in moved:
            _run_to(vp, 0x11)
        for index in (0, 1):
            total, integer = struct.unpack("<dH", restored.memory.read(0x3000 + 16 * index, 10))
            steps = 500 + 500 + 7 * index
            assert total == steps
            assert integer == (sum(range(1, 501)) + sum(range(1, 501 + 7 * index))) & 0xFFFF
        restored.close()


@given(chunks)
def test_a_compressed_memory_chunk_round_trips(chunk: MemoryChunk) -> None:
    assert MemoryChunk.decompress(chunk.compressed()) == chunk


@given(st.binary(max_size=300))
def test_any_compressed_bytes_give_a_chunk_or_a_clear_error(payload: bytes) -> None:
    try:
        MemoryChunk.decompress(payload)
    except SnapshotError:
        pass


def test_a_compressed_section_that_expands_without_bound_is_refused() -> None:
    """A few KiB of zlib that would inflate to 1 GiB: refused once past the largest chunk."""
    import zlib

    inflater = zlib.compressobj(9)
    bomb = b"".join(inflater.compress(bytes(1 << 20)) for _ in range(1024)) + inflater.flush()
    assert len(bomb) < 2 << 20
    with pytest.raises(SnapshotError, match="expands beyond"):
        MemoryChunk.decompress(bomb)
