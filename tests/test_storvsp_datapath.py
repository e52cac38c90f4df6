"""storvsp's data path on its own: the guest's page list turned into views of guest RAM
(checked page by page against RAM, region edges and the channel's rings, whatever the
guest wrote), preadv/pwritev straight between the image and those views, FUA, host I/O
errors, and every DMA reported through GuestMemory.wrote (the engines' code coherence
and the migration's write log depend on it)."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.partition.memory import GuestMemory, GuestMemoryError, MemoryRegion
from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.packets import GPA_DIRECT, GpaRange, Packet
from mshvstack.vmbus.providers.scsi import ASC_READ_ERROR, ASC_WRITE_ERROR, MEDIUM_ERROR, DiskImage
from mshvstack.vmbus.providers.storage import Storage

PAGE = 4096
# Two regions with a hole between them, and a third right after the second (a run of
# consecutive pages may cross from one region into the next: still RAM).
REGIONS = ((0, 64), (96, 32), (128, 16))   # (first page, pages)
RING_PAGES = frozenset({2, 3, 100})
IMAGE_BLOCKS = 4096
SRB = ffi.offsetof("struct vstor_packet", "vm_srb")


class FakeChannel:
    """What the provider uses of a channel: guest memory, the rings' pages, completions."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.ring_pages = RING_PAGES
        self.replies: list[tuple[int, bytes]] = []

    def send_completion(self, transaction_id: int, payload: bytes) -> None:
        self.replies.append((transaction_id, payload))


def _memory(written: list[tuple[int, int]] | None = None) -> GuestMemory:
    memory = GuestMemory(written=None if written is None else written.extend)
    for first, pages in REGIONS:
        # (the host address reported for a region's bytes: its GPA, so reports read as GPAs)
        memory._add(MemoryRegion(first * PAGE, pages * PAGE, True, True, mmap.mmap(-1, pages * PAGE), address=first * PAGE))
    return memory


def _reference(pfns: list[int], offset: int, moved: int) -> list[tuple[int, int]] | None:
    """The buffer byte by byte as (gpa, 1) steps merged where contiguous and in one region; None: refused."""
    if not moved:
        return []
    pages = (offset + moved + PAGE - 1) // PAGE
    if len(pfns) < pages or RING_PAGES & set(pfns[:pages]):
        return None
    pieces: list[tuple[int, int]] = []
    for position in range(offset, offset + moved, 512):   # offsets and lengths are multiples of 512 here
        gpa = pfns[position // PAGE] * PAGE + position % PAGE
        region = next((r for r in REGIONS if r[0] * PAGE <= gpa < (r[0] + r[1]) * PAGE), None)
        if region is None:
            return None
        if pieces and pieces[-1][0] + pieces[-1][1] == gpa and (pieces[-1][0] >= region[0] * PAGE):
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + 512)
        else:
            pieces.append((gpa, 512))
    return pieces


PFNS = st.lists(st.one_of(st.integers(0, 150), st.integers(0, (1 << 52) - 1)), min_size=1, max_size=24)


@settings(max_examples=300, deadline=None)
@given(pfns=PFNS, offset=st.integers(0, 7).map(lambda x: x * 512), moved=st.integers(0, 96).map(lambda x: x * 512),
       extra=st.integers(0, 4096))
def test_the_buffer_is_the_guests_pages_checked_one_by_one(pfns: list[int], offset: int, moved: int, extra: int) -> None:
    memory = _memory()
    channel = FakeChannel(memory)
    length = moved
    packet = Packet(GPA_DIRECT, 1, True, b"", (GpaRange(length + extra, offset, tuple(pfns)),))
    expected = _reference(pfns, offset, moved)
    storage = Storage.__new__(Storage)
    if expected is None:
        with pytest.raises(VmbusProtocolError):
            storage._buffer(channel, packet, length, moved)  # type: ignore[arg-type]
        return
    pieces = storage._buffer(channel, packet, length, moved)  # type: ignore[arg-type]
    assert [(gpa, len(view)) for gpa, view in pieces] == expected
    for gpa, view in pieces:   # each view is the guest's memory at that GPA
        view[:1] = b"\xa5"
        assert memory.read(gpa, 1) == b"\xa5"
    del pieces


def _srb(cdb: bytes, length: int, data_in: int, pfns: list[int], offset: int = 0) -> Packet:
    request = ffi.new("struct vstor_packet *")
    request.operation, request.flags = lib.VSTOR_OPERATION_EXECUTE_SRB, 1
    srb = request.vm_srb
    srb.length, srb.cdb_length, srb.sense_info_length, srb.data_in, srb.data_transfer_length = 0x34, len(cdb), 20, data_in, length
    ffi.memmove(srb.cdb, cdb, len(cdb))
    ranges = struct.pack("<II", length, offset) + struct.pack(f"<{len(pfns)}Q", *pfns)
    header = 24 + len(ranges)
    raw = struct.pack("<HHHHQII", GPA_DIRECT, header // 8, (header + 64) // 8, 1, 5, 0, 1) + ranges + bytes(ffi.buffer(request))
    return packets.parse(raw)


def _reply(channel: FakeChannel) -> Any:
    return ffi.from_buffer("struct vstor_packet *", bytearray(channel.replies[-1][1]))


def _read10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return bytes([0x28, 0x08 if fua else 0]) + struct.pack(">IxH", lba, blocks) + bytes(1)


def _write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return bytes([0x2A, 0x08 if fua else 0]) + struct.pack(">IxH", lba, blocks) + bytes(1)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_BLOCKS * 512))
    disk = DiskImage(image)
    written: list[tuple[int, int]] = []
    memory = _memory(written)
    yield Storage(disk), FakeChannel(memory), memory, image, written
    disk.close()


SCATTERED = [40, 7, 8, 9, 63, 96, 127, 128, 20]   # runs, a run across two regions, out of order


def test_a_scattered_read_lands_in_every_page_and_each_is_reported(setup) -> None:  # type: ignore[no-untyped-def]
    storage, channel, memory, image, written = setup
    length = len(SCATTERED) * PAGE - 1024
    storage.on_packet(channel, _srb(_read10(16, length // 512), length, 1, SCATTERED, offset=1024))
    reply = _reply(channel)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS and reply.vm_srb.data_transfer_length == length
    data = image.read_bytes()[16 * 512 : 16 * 512 + length]
    got = b"".join(memory.read(pfn * PAGE + (1024 if i == 0 else 0), PAGE - (1024 if i == 0 else 0))
                   for i, pfn in enumerate(SCATTERED))
    assert got == data
    assert sum(n for _address, n in written) == length   # every byte DMA'd was reported, once


def test_a_scattered_write_takes_every_page_in_order(setup) -> None:  # type: ignore[no-untyped-def]
    storage, channel, memory, image, written = setup
    for i, pfn in enumerate(SCATTERED):
        memory.write(pfn * PAGE, bytes([i + 1]) * PAGE)
    length = len(SCATTERED) * PAGE
    storage.on_packet(channel, _srb(_write10(100, length // 512), length, 0, SCATTERED))
    assert _reply(channel).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert image.read_bytes()[100 * 512 : 100 * 512 + length] == b"".join(bytes([i + 1]) * PAGE for i in range(len(SCATTERED)))


def test_fua_writes_are_durable_before_good_and_plain_ones_are_not_synced(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    storage, channel, _memory_, _image, _written = setup
    synced: list[int] = []
    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.fdatasync", lambda fd: synced.append(fd))
    storage.on_packet(channel, _srb(_write10(0, 8), PAGE, 0, [10]))
    assert synced == []
    storage.on_packet(channel, _srb(_write10(0, 8, fua=True), PAGE, 0, [10]))
    assert synced == [storage.disk.fd] and _reply(channel).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS


ONE_REGION, TWO_REGIONS = [10, 11], [63, 96]   # a buffer moved in one call, and one moved through views


@pytest.mark.parametrize("pfns", [ONE_REGION, TWO_REGIONS])
def test_host_io_errors_are_medium_errors_not_crashes(setup, monkeypatch, tmp_path: Path, pfns: list[int]) -> None:  # type: ignore[no-untyped-def]
    storage, channel, _memory_, _image, written = setup

    def fail(*_args: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.preadv", fail)   # the view path's calls
    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.pwritev", fail)
    refusing = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)   # the one-call path's: reads EISDIR, writes EBADF
    monkeypatch.setattr(storage.disk, "fd", refusing)
    try:
        for cdb, data_in, asc in ((_read10(0, 16), 1, ASC_READ_ERROR), (_write10(0, 16), 0, ASC_WRITE_ERROR)):
            storage.on_packet(channel, _srb(cdb, 2 * PAGE, data_in, pfns))
            reply = _reply(channel)
            assert reply.vm_srb.scsi_status == 2 and reply.vm_srb.data_transfer_length == 0
            assert (reply.vm_srb.sense_data[2], reply.vm_srb.sense_data[12]) == (MEDIUM_ERROR, asc)
    finally:
        os.close(refusing)
    assert written   # the failed read's pages were reported anyway: bytes may have landed


def test_a_read_past_the_end_of_a_shrunk_image_gives_zeros(setup) -> None:  # type: ignore[no-untyped-def]
    storage, channel, memory, image, written = setup
    memory.write(10 * PAGE, b"\xee" * 2 * PAGE)
    os.truncate(image, PAGE + 512)   # shrank under the guest: the second page is past the end
    written.clear()
    storage.on_packet(channel, _srb(_read10(0, 16), 2 * PAGE, 1, [10, 11]))
    assert _reply(channel).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert memory.read(10 * PAGE, 2 * PAGE) == image.read_bytes() + bytes(PAGE - 512)
    assert written == [(10 * PAGE, 2 * PAGE)]


@settings(max_examples=300, deadline=None)
@given(pfns=st.lists(st.integers(0, 160), min_size=1, max_size=20), offset=st.integers(0, 4095), length=st.integers(0, 20 * PAGE),
       file_offset=st.integers(0, 3 * PAGE), to_file=st.booleans())
def test_file_io_moves_exactly_the_named_bytes_or_refuses(tmp_path_factory: Any, pfns: list[int], offset: int, length: int,
                                                          file_offset: int, to_file: bool) -> None:
    """GuestMemory.file_io against a byte-by-byte reference.  A read: the bytes land in the
    named frames and nowhere else (zeros past the file's end), every changed byte reported.
    A write: the file gets the named frames' bytes in order and guest RAM stays as it was.
    A buffer outside one region moves nothing."""
    source = tmp_path_factory.mktemp("dma") / "image"
    source.write_bytes(os.urandom(8 * PAGE))
    image_before = source.read_bytes()
    written: list[tuple[int, int]] = []
    memory = _memory(written)
    for region in memory.regions:
        region.host[:] = os.urandom(region.size)
    before = [bytes(region.host) for region in memory.regions]
    pages = (offset + length + PAGE - 1) // PAGE
    fd = os.open(source, os.O_RDWR)
    try:
        if length and len(pfns) < pages:
            with pytest.raises(GuestMemoryError):
                memory.file_io(fd, file_offset, pfns, offset, length, to_file)
            return
        moved = memory.file_io(fd, file_offset, pfns, offset, length, to_file)
    finally:
        os.close(fd)
    after = [bytes(region.host) for region in memory.regions]
    frames = pfns[:pages]
    inside = not length or any(first <= min(frames) and max(frames) < first + count for first, count in REGIONS)
    assert moved == inside
    if not moved or to_file:
        assert after == before and not written
    if not moved:
        assert source.read_bytes() == image_before
        return
    buffer = [frames[(offset + i) // PAGE] * PAGE + (offset + i) % PAGE for i in range(length)]   # the GPA of each byte
    if to_file:
        guest = b"".join(memory.read(gpa, 1) for gpa in buffer)
        image = image_before.ljust(file_offset, b"\0")
        assert source.read_bytes() == image[:file_offset] + guest + image[file_offset + length :]
        return
    data = image_before[file_offset : file_offset + length].ljust(length, b"\0")
    expected = dict(zip(buffer, data))   # a frame named twice: the later bytes win, as they land later
    for region, old, new in zip(memory.regions, before, after):
        for at in range(region.size):
            assert new[at] == expected.get(region.gpa + at, old[at]), f"GPA {region.gpa + at:#x}"
    assert {address + k for address, n in written for k in range(n)} == set(expected)


def test_a_read_shorter_than_its_command_fills_the_buffer_only(setup) -> None:  # type: ignore[no-untyped-def]
    storage, channel, memory, image, _written = setup
    memory.write(11 * PAGE, b"\xee" * PAGE)
    storage.on_packet(channel, _srb(_read10(0, 16), 1024, 1, [10, 11]))
    reply = _reply(channel)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS and reply.vm_srb.data_transfer_length == 1024
    assert memory.read(10 * PAGE, 1024) == image.read_bytes()[:1024] and memory.read(11 * PAGE, PAGE) == b"\xee" * PAGE


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([0x28, 0x2A, 0x88, 0x8A]), lba=st.integers(0, (1 << 32) - 1), blocks=st.integers(0, 0xFFFF),
       length=st.integers(0, 1 << 21), data_in=st.integers(0, 3), pfns=PFNS, offset=st.integers(0, 4095),
       fua=st.booleans(), cdb_length=st.integers(0, 16))
def test_hostile_reads_and_writes_get_an_answer_and_leave_the_image_alone(setup: Any, opcode: int, lba: int, blocks: int, length: int,
                                                                          data_in: int, pfns: list[int], offset: int,
                                                                          fua: bool, cdb_length: int) -> None:
    storage, channel, _memory_, image, _written = setup
    lba %= IMAGE_BLOCKS * 2
    if opcode in (0x28, 0x2A):
        cdb = bytes([opcode, 0x08 if fua else 0]) + struct.pack(">IxH", lba, blocks) + bytes(1)
    else:
        cdb = bytes([opcode, 0x08 if fua else 0]) + struct.pack(">QI", lba, blocks) + bytes(2)
    before = image.read_bytes()
    request = _srb(cdb[:cdb_length].ljust(len(cdb), b"\0"), 512, 0, [1])
    raw_ranges = GpaRange(max(length, 1), offset, tuple(pfns))
    payload = bytearray(request.payload)
    struct.pack_into("<B", payload, SRB + ffi.offsetof("struct vmscsi_request", "cdb_length"), cdb_length)
    struct.pack_into("<B", payload, SRB + ffi.offsetof("struct vmscsi_request", "data_in"), data_in)
    struct.pack_into("<I", payload, SRB + ffi.offsetof("struct vmscsi_request", "data_transfer_length"), length)
    storage.on_packet(channel, Packet(GPA_DIRECT, 5, True, bytes(payload), (raw_ranges,)))
    reply = _reply(channel)
    assert reply.operation == lib.VSTOR_OPERATION_COMPLETE_IO
    if reply.vm_srb.srb_status != lib.SRB_STATUS_SUCCESS or opcode in (0x28, 0x88) or data_in != 0:
        assert image.read_bytes() == before


def test_wrote_refuses_a_range_outside_one_region() -> None:
    memory = _memory()
    with pytest.raises(GuestMemoryError):
        memory.wrote(63 * PAGE, 2 * PAGE)   # runs into the hole after the first region
    with pytest.raises(GuestMemoryError):
        memory.wrote(70 * PAGE, 1)


def test_short_transfers_are_finished_and_a_stuck_one_is_an_error(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """preadv and pwritev may move less than asked (a signal, a full pipe of the host's storage):
    the rest follows, from where the last call stopped; a write that moves nothing fails."""
    storage, channel, memory, image, _written = setup
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def clipped(call: Any) -> Any:
        def one(fd: int, buffers: list[memoryview], offset: int) -> int:
            budget, cut = 1000, []   # at most 1000 bytes per call, across buffers
            for buffer in buffers:
                if budget <= 0:
                    break
                cut.append(buffer[:budget])
                budget -= len(cut[-1])
            return int(call(fd, cut, offset))
        return one

    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.preadv", clipped(real_preadv))
    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.pwritev", clipped(real_pwritev))
    for pfn in SCATTERED:
        memory.write(pfn * PAGE, os.urandom(PAGE))
    expected = b"".join(memory.read(pfn * PAGE, PAGE) for pfn in SCATTERED)
    storage.on_packet(channel, _srb(_write10(200, len(expected) // 512), len(expected), 0, SCATTERED))
    assert _reply(channel).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert image.read_bytes()[200 * 512 : 200 * 512 + len(expected)] == expected
    for pfn in SCATTERED:
        memory.write(pfn * PAGE, bytes(PAGE))
    storage.on_packet(channel, _srb(_read10(200, len(expected) // 512), len(expected), 1, SCATTERED))
    assert _reply(channel).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert b"".join(memory.read(pfn * PAGE, PAGE) for pfn in SCATTERED) == expected
    monkeypatch.setattr("mshvstack.vmbus.providers.scsi.os.pwritev", lambda fd, buffers, offset: 0)
    storage.on_packet(channel, _srb(_write10(0, 16), 2 * PAGE, 0, TWO_REGIONS))
    assert _reply(channel).vm_srb.sense_data[2] == MEDIUM_ERROR
