"""storvsp end to end: Linux's init sequence and SCSI reads/writes from a
guest, verified against the image file; errors never touch the image."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.errors import MshvError
from mshvstack.vmbus import packets
from mshvstack.vmbus.providers.scsi import ASC_WRITE_PROTECTED, DATA_PROTECT, DiskImage
from mshvstack.vmbus.providers.storage import Storage

from vmbus_guest import GuestChannel, VmbusGuest, parse_offer

INIT_ID = 0xFFFFFFFFFFFFFFFD
IMAGE_BLOCKS = 2048


def _image(tmp_path: Path, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (IMAGE_BLOCKS * 2))
    return path


def _vstor(operation: int, **fields: int) -> bytes:
    pkt = ffi.new("struct vstor_packet *")
    pkt.operation, pkt.flags = operation, 1
    for name, value in fields.items():
        target, attr = (pkt.version, "major_minor") if name == "version" else (pkt, name)
        setattr(target, attr, value)
    return bytes(ffi.buffer(pkt))


def _request(channel: GuestChannel, payload: bytes, trans_id: int) -> object:
    channel.send(packets.inband(payload, trans_id, completion_requested=True))
    reply = channel.receive()
    assert reply is not None and reply.type == packets.COMPLETION and reply.transaction_id == trans_id
    assert len(reply.payload) >= 64
    return ffi.from_buffer("struct vstor_packet *", bytearray(reply.payload[:64]))


def _initialize(guest: VmbusGuest, ring_pages: int = 32) -> GuestChannel:
    guest.connect()
    offer = next(parse_offer(o) for o in guest.request_offers()[:-1])
    assert str(offer["class"]) == "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"
    channel, status = guest.open_channel(offer["relid"], offer["connection_id"], ring_pages=ring_pages)
    assert status == 0 and channel is not None
    assert _request(channel, _vstor(lib.VSTOR_OPERATION_BEGIN_INITIALIZATION), INIT_ID).status == 0
    refused = _request(channel, _vstor(lib.VSTOR_OPERATION_QUERY_PROTOCOL_VERSION, version=0x0602), INIT_ID)
    assert refused.status == lib.VSTOR_STATUS_REVISION_MISMATCH  # Linux then retries 6.0
    assert _request(channel, _vstor(lib.VSTOR_OPERATION_QUERY_PROTOCOL_VERSION, version=0x0600), INIT_ID).status == 0
    props = _request(channel, _vstor(lib.VSTOR_OPERATION_QUERY_PROPERTIES), INIT_ID)
    assert props.storage_channel_properties.max_transfer_bytes % 4096 == 0 and props.storage_channel_properties.max_transfer_bytes
    assert _request(channel, _vstor(lib.VSTOR_OPERATION_END_INITIALIZATION), INIT_ID).status == 0
    return channel


def _srb(cdb: bytes, length: int, data_in: int, lun: int = 0) -> object:
    pkt = ffi.new("struct vstor_packet *")
    pkt.operation, pkt.flags = lib.VSTOR_OPERATION_EXECUTE_SRB, 1
    srb = pkt.vm_srb
    srb.length, srb.lun, srb.cdb_length, srb.sense_info_length = 0x34, lun, len(cdb), 20
    srb.data_in, srb.data_transfer_length = data_in, length
    ffi.memmove(srb.cdb, cdb, len(cdb))
    return pkt


def _io(guest: VmbusGuest, channel: GuestChannel, cdb: bytes, buffer_gpa: int, length: int, data_in: int,
        trans_id: int = 7, lun: int = 0) -> object:
    pkt = _srb(cdb, length, data_in, lun)
    offset = buffer_gpa % 4096
    pfns = [(buffer_gpa >> 12) + i for i in range((offset + length + 4095) // 4096)] if length else []
    if length:
        ranges = struct.pack("<II", length, offset) + struct.pack(f"<{len(pfns)}Q", *pfns)
        header_len = 24 + len(ranges)
        raw = struct.pack("<HHHHQII", 9, header_len // 8, (header_len + 64) // 8, 1, trans_id, 0, 1) + ranges
        raw += bytes(ffi.buffer(pkt))
    else:
        raw = packets.inband(bytes(ffi.buffer(pkt)), trans_id, completion_requested=True)
    channel.send(raw)
    reply = channel.receive()
    assert reply is not None and reply.transaction_id == trans_id
    return ffi.from_buffer("struct vstor_packet *", bytearray(reply.payload[:64]))


@pytest.fixture
def disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = _image(tmp_path)
    image = DiskImage(path)
    guest = VmbusGuest([Storage(image)], tmp_path)
    channel = _initialize(guest)
    yield guest, channel, path, image
    guest.close()
    image.close()


BUFFER = 0x600000


def test_inquiry_capacity_report_luns(disk) -> None:  # type: ignore[no-untyped-def]
    guest, channel, _path, _image_ = disk
    reply = _io(guest, channel, bytes([0x12, 0, 0, 0, 96, 0]), BUFFER, 96, 1)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS and guest.memory.read(BUFFER + 8, 8) == b"Msft    "
    reply = _io(guest, channel, bytes([0x25]) + bytes(9), BUFFER, 8, 1)
    assert struct.unpack(">II", guest.memory.read(BUFFER, 8)) == (IMAGE_BLOCKS - 1, 512)
    reply = _io(guest, channel, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), BUFFER, 32, 1)
    assert struct.unpack(">QI", guest.memory.read(BUFFER, 12)) == (IMAGE_BLOCKS - 1, 512)
    reply = _io(guest, channel, bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 16) + bytes(2), BUFFER, 16, 1)
    assert guest.memory.read(BUFFER, 16) == struct.pack(">II", 8, 0) + bytes(8)
    assert _io(guest, channel, bytes(6), 0, 0, 2).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS  # TEST UNIT READY
    bad_lun = _io(guest, channel, bytes(6), 0, 0, 2, lun=3)
    assert bad_lun.vm_srb.srb_status == lib.SRB_STATUS_INVALID_LUN


def test_absent_luns_answer_inquiry_with_no_device(disk) -> None:  # type: ignore[no-untyped-def]
    """Linux's storvsc rewrites a failed INQUIRY to success, so an absent LUN must
    answer with qualifier 3 data (else sd attaches a zeroed phantom disk: found by hv_storvsc)."""
    guest, channel, _path, _image_ = disk
    guest.memory.write(BUFFER, bytes(96))
    reply = _io(guest, channel, bytes([0x12, 0, 0, 0, 96, 0]), BUFFER, 96, 1, lun=1)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert guest.memory.read(BUFFER, 1)[0] >> 5 == 3 and reply.vm_srb.data_transfer_length == 36
    guest.memory.write(BUFFER, b"\xff" * 16)
    reply = _io(guest, channel, bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 16) + bytes(2), BUFFER, 16, 1, lun=1)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS and guest.memory.read(BUFFER, 4) == bytes(4)
    read = _io(guest, channel, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), BUFFER, 512, 1, lun=1)
    assert read.vm_srb.srb_status == lib.SRB_STATUS_INVALID_LUN


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lba=st.integers(0, IMAGE_BLOCKS - 16), blocks=st.integers(1, 16), offset=st.sampled_from([0, 512, 1536]),
       sixteen=st.booleans(), fill=st.integers(0, 255))
def test_reads_and_writes_match_the_image(disk, lba: int, blocks: int, offset: int, sixteen: bool, fill: int) -> None:  # type: ignore[no-untyped-def]
    guest, channel, path, image = disk
    length = blocks * 512
    gpa = BUFFER + offset
    if sixteen:
        write_cdb = bytes([0x8A, 0]) + struct.pack(">QI", lba, blocks) + bytes(2)
        read_cdb = bytes([0x88, 0]) + struct.pack(">QI", lba, blocks) + bytes(2)
    else:
        write_cdb = bytes([0x2A, 0]) + struct.pack(">IxH", lba, blocks) + bytes(1)
        read_cdb = bytes([0x28, 0]) + struct.pack(">IxH", lba, blocks) + bytes(1)
    data = bytes([fill]) * length
    guest.memory.write(gpa, data)
    reply = _io(guest, channel, write_cdb, gpa, length, 0)
    assert reply.vm_srb.srb_status == lib.SRB_STATUS_SUCCESS and reply.vm_srb.data_transfer_length == length
    with open(path, "rb") as f:
        f.seek(lba * 512)
        assert f.read(length) == data
    guest.memory.write(gpa, bytes(length))
    reply = _io(guest, channel, read_cdb, gpa, length, 1)
    assert reply.vm_srb.data_transfer_length == length and guest.memory.read(gpa, length) == data
    assert _io(guest, channel, bytes([0x35]) + bytes(9), 0, 0, 2).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS
    assert image.flushes > 0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rejected_requests_leave_the_image_alone(disk) -> None:  # type: ignore[no-untyped-def]
    guest, channel, path, _image_ = disk
    before = _digest(path)
    beyond = _io(guest, channel, bytes([0x2A, 0]) + struct.pack(">IxH", IMAGE_BLOCKS - 1, 4) + bytes(1), BUFFER, 2048, 0)
    assert beyond.vm_srb.scsi_status == 2 and beyond.vm_srb.sense_data[12] == 0x21  # LBA out of range
    outside = _io(guest, channel, bytes([0x2A, 0]) + struct.pack(">IxH", 0, 1) + bytes(1), 0x7FFF0000, 512, 0)
    assert outside.vm_srb.srb_status == lib.SRB_STATUS_INVALID_REQUEST  # buffer not guest RAM
    unknown = _io(guest, channel, bytes([0xEE]) + bytes(9), 0, 0, 2)
    assert unknown.vm_srb.scsi_status == 2 and unknown.vm_srb.sense_data[2] == 0x5
    assert _digest(path) == before


def test_read_only_image_refuses_writes(tmp_path: Path) -> None:
    path = _image(tmp_path)
    image = DiskImage(path, read_only=True)
    guest = VmbusGuest([Storage(image)], tmp_path)
    try:
        channel = _initialize(guest)
        before = _digest(path)
        reply = _io(guest, channel, bytes([0x2A, 0]) + struct.pack(">IxH", 0, 1) + bytes(1), BUFFER, 512, 0)
        assert reply.vm_srb.scsi_status == 2
        assert (reply.vm_srb.sense_data[2], reply.vm_srb.sense_data[12]) == (DATA_PROTECT, ASC_WRITE_PROTECTED)
        assert _digest(path) == before
        reply = _io(guest, channel, bytes([0x1A, 0, 0x3F, 0, 64, 0]), BUFFER, 64, 1)
        assert guest.memory.read(BUFFER + 2, 1)[0] & 0x80  # MODE SENSE reports write protect
    finally:
        guest.close()
        image.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=0, max_size=80), gpa_direct=st.booleans())
def test_fuzzed_storvsp_packets(disk, payload: bytes, gpa_direct: bool) -> None:  # type: ignore[no-untyped-def]
    guest, channel, path, _image_ = disk
    before = _digest(path)
    if gpa_direct:
        ranges = struct.pack("<IIQ", 512, 0, BUFFER >> 12)
        header_len = 24 + len(ranges)
        body = payload + bytes(-len(payload) % 8)
        raw = struct.pack("<HHHHQII", 9, header_len // 8, (header_len + len(body)) // 8, 1, 9, 0, 1) + ranges + body
    else:
        raw = packets.inband(payload, 9, completion_requested=True)
    channel.send(raw)
    channel.receive()
    if not (len(payload) >= 4 and struct.unpack_from("<I", payload)[0] == lib.VSTOR_OPERATION_EXECUTE_SRB):
        assert _digest(path) == before


def test_disk_image_validation(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(MshvError, match="smaller than one"):
        DiskImage(tiny)
    assert os.path.getsize(tiny) == 100


READ_ONE_PAGE = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])


def test_dma_into_the_channels_own_ring_is_refused(disk) -> None:  # type: ignore[no-untyped-def]
    """A READ whose buffer is the guest→host ring's control page would put the ring's
    indices back with every completion (and drain the same packet forever)."""
    guest, channel, _path, _image_ = disk
    for ring in (channel.send_ring, channel.receive_ring):
        control = ring.mem.pfns[0] * 4096
        before = guest.memory.read(control, 4096)
        reply = _io(guest, channel, READ_ONE_PAGE, control, 4096, 1)
        assert reply.vm_srb.srb_status == lib.SRB_STATUS_INVALID_REQUEST
        after = guest.memory.read(control, 4096)
        assert after[16:] == before[16:]   # only the indices moved, by the ring protocol itself
    assert _io(guest, channel, READ_ONE_PAGE, BUFFER, 4096, 1).vm_srb.srb_status == lib.SRB_STATUS_SUCCESS


def _drain(guest: VmbusGuest, channel: GuestChannel, replies: list[int]) -> None:
    """Read every completion, signalling the host when the ring says it waits for room (as Linux does)."""
    while (item := channel.receive_ring.read()) is not None:
        raw, signal = item
        replies.append(packets.parse(raw).transaction_id)
        if signal:
            guest.signal_event(channel.connection_id)


def test_a_guest_that_does_not_read_completions_gets_back_pressure_not_a_crash(tmp_path: Path) -> None:
    """One-page rings: requests faster than completions are read.  The host keeps its
    replies in order until the guest makes room, takes no new requests meanwhile, and
    every request gets exactly one completion."""
    from mshvstack.vmbus.errors import RingFull

    image = DiskImage(_image(tmp_path))
    guest = VmbusGuest([Storage(image)], tmp_path)
    try:
        channel = _initialize(guest, ring_pages=2)
        inquiry = _srb(bytes([0x00, 0, 0, 0, 0, 0]), 0, 0)   # TEST UNIT READY: no data
        sent: list[int] = []
        replies: list[int] = []
        for trans_id in range(1, 400):
            try:
                channel.send_ring.write(packets.inband(bytes(ffi.buffer(inquiry)), trans_id, completion_requested=True))
            except RingFull:
                break
            sent.append(trans_id)
            assert guest.signal_event(channel.connection_id) == 0
        assert len(sent) > 60, "the guest's ring should hold more requests than one ring page of completions"
        deadline = time.monotonic() + 30
        while len(replies) < len(sent):
            _drain(guest, channel, replies)
            assert time.monotonic() < deadline, (len(replies), len(sent))
            time.sleep(0.01)
        assert replies == sent
    finally:
        guest.close()
        image.close()


def test_a_doorbell_does_a_bounded_amount_of_work(disk) -> None:  # type: ignore[no-untyped-def]
    """Many packets behind one doorbell: the first budget is handled in the hypercall,
    the rest by the server's worker, so no guest holds the VMBus lock for long."""
    from mshvstack.vmbus.channel import DRAIN_BUDGET

    guest, channel, _path, _image_ = disk
    packet = packets.inband(bytes(ffi.buffer(_srb(bytes(6), 0, 0))), 0, completion_requested=True)
    count = 3 * DRAIN_BUDGET
    for trans_id in range(1, count + 1):
        channel.send_ring.write(packets.inband(packet[16:], trans_id, completion_requested=True))
    assert guest.signal_event(channel.connection_id) == 0   # one doorbell for all of them
    replies: list[int] = []
    deadline = time.monotonic() + 30
    while len(replies) < count:
        _drain(guest, channel, replies)
        assert time.monotonic() < deadline, len(replies)
        time.sleep(0.01)
    assert replies == list(range(1, count + 1))


def test_gpadls_are_bounded_per_channel(disk) -> None:  # type: ignore[no-untyped-def]
    from mshvstack.vmbus.gpadl import MAX_GPADLS_PER_CHANNEL

    guest, channel, _path, _image_ = disk
    statuses = []
    for _ in range(MAX_GPADLS_PER_CHANNEL + 2):
        _id, replies = guest.create_gpadl(channel.relid, guest.allocate(1))
        statuses.append(struct.unpack_from("<IIIII", replies[-1])[4])
    assert statuses.count(0) == MAX_GPADLS_PER_CHANNEL - 1   # the ring's GPADL is one of them
    assert all(status != 0 for status in statuses[MAX_GPADLS_PER_CHANNEL - 1:])


def test_one_doorbell_with_many_requests_interrupts_the_guest_once(disk, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every completion of one drain is in the ring before the guest is signalled, once, and
    that one signal also tells it of the room the drain made in its own ring."""
    guest, channel, _path, _image_ = disk
    host_channel = next(c for c in guest.server.channels.values() if c.relid == channel.relid)
    signals: list[int] = []
    real = host_channel.signal_guest
    monkeypatch.setattr(host_channel, "signal_guest", lambda: (signals.append(1), real())[1])
    packet = packets.inband(bytes(ffi.buffer(_srb(bytes(6), 0, 0))), 0, completion_requested=True)
    for trans_id in range(1, 11):
        channel.send_ring.write(packets.inband(packet[16:], trans_id, completion_requested=True))
    # The guest also waits for room in its ring (as when it was full): the first read makes it.
    assert not channel.send_ring.wait_for_space(channel.send_ring.free() + len(packet) + 8)
    assert guest.signal_event(channel.connection_id) == 0
    replies: list[int] = []
    _drain(guest, channel, replies)
    assert replies == list(range(1, 11)) and signals == [1]
