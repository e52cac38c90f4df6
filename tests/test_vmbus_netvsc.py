"""netvsp against a scripted guest: Linux's init sequence, frames both ways,
bounded receive buffering, link events, and every class of malformed message
(success or a typed protocol error, never a host exception)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.net.backend import LoopbackBackend
from mshvstack.vmbus import packets
from mshvstack.vmbus.providers import netvsc as nv
from mshvstack.vmbus.providers import rndis
from mshvstack.vmbus.providers.rndis import Oid, RndisStatus, RndisType

from netvsc_guest import MAC, NetGuest, gpa_direct, nvsp, page_range, rndis_message, rndis_oid, rndis_packet


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetGuest]:
    guest = NetGuest(tmp_path)
    yield guest
    guest.close()


def _frame(size: int = 60, fill: int | None = None) -> bytes:
    payload = os.urandom(size - 14) if fill is None else bytes([fill]) * (size - 14)
    return bytes.fromhex("ffffffffffff") + MAC + b"\x08\x00" + payload


def _channel_state(net: NetGuest) -> dict[str, object]:
    return next(c for c in net.guest.server.status()["channels"] if c["device"] == "network")


def test_linux_initialization_and_the_oids_it_asks(net: NetGuest) -> None:
    refused = net.request(nvsp(nv.INIT, nv.NvspType.INIT, 0x00070000, 0x00070000))   # newer than any we know
    assert nv.INIT_COMPLETE.unpack_from(refused.payload)[3] == nv.NvspStatus.FAIL
    net.initialize()
    assert net.nic.version == lib.NVSP_PROTOCOL_VERSION_61 and net.nic.ndis_version == (6, 30)
    reply = net.control(rndis_message(RndisType.INIT, rndis.INIT_REQUEST.pack(1, 1, 0) + bytes(4)))
    req_id, status, major, _minor, flags, medium, per_message, _xfer, shift = rndis.INIT_COMPLETE.unpack_from(reply, 8)
    assert (req_id, status, major, flags, medium) == (1, 0, 1, 1, 0) and per_message >= 1 and shift < 8
    assert net.query(Oid.MAXIMUM_FRAME_SIZE)[:2] == (RndisStatus.SUCCESS, rndis.U32.pack(1500))
    assert net.query(Oid.PERMANENT_ADDRESS)[:2] == (RndisStatus.SUCCESS, MAC)
    assert net.query(Oid.FRIENDLY_NAME) == (RndisStatus.NOT_SUPPORTED, b"", 16)   # offset 16 even when empty
    status, caps, _offset = net.query(Oid.OFFLOAD_HARDWARE_CAPABILITIES, bytes(4))
    kind, revision, size = rndis.OFFLOAD.unpack_from(caps.ljust(ffi.sizeof("struct ndis_offload"), b"\0"))
    assert status == 0 and kind == lib.NDIS_OBJECT_TYPE_OFFLOAD and revision == 3 and size == len(caps) == 156
    assert not any(caps[4:])   # no offloads: the guest checksums and segments itself
    assert net.set(Oid.OFFLOAD_PARAMETERS, bytes(28)) == RndisStatus.SUCCESS
    assert net.query(Oid.MEDIA_CONNECT_STATUS)[:2] == (RndisStatus.SUCCESS, rndis.U32.pack(0))
    assert net.query(Oid.LINK_SPEED)[:2] == (RndisStatus.SUCCESS, rndis.U32.pack(rndis.LINK_SPEED_100BPS))
    assert net.query(Oid.RECEIVE_SCALE_CAPABILITIES, bytes(18))[0] == RndisStatus.NOT_SUPPORTED   # vRSS declined
    assert net.set(Oid.CURRENT_PACKET_FILTER, rndis.U32.pack(0x0D)) == RndisStatus.SUCCESS
    assert net.nic.rndis.receiving
    subchannels = net.request(nvsp(nv.SUBCHANNEL_COMPLETE, nv.NvspType.SUBCHANNEL, lib.NVSP_SUBCHANNEL_ALLOCATE, 3))
    assert nv.SUBCHANNEL_COMPLETE.unpack_from(subchannels.payload)[1:] == (nv.NvspStatus.FAIL, 0)
    keepalive = net.control(rndis_message(RndisType.KEEPALIVE, rndis.REQ_ID.pack(9)))
    assert rndis.HEADER.unpack_from(keepalive)[0] == RndisType.KEEPALIVE_C
    # HALT: completed, no RNDIS reply; then the buffers are revoked as Linux tears down.
    assert net.send_rndis(rndis_message(RndisType.HALT, rndis.REQ_ID.pack(10)), section=None, control=True) == 1
    assert net.received() == []
    net.post(nvsp(nv.SEND_BUFFER, nv.NvspType.REVOKE_RECV_BUF, lib.NETVSC_RECEIVE_BUFFER_ID, 0))
    net.post(nvsp(nv.SEND_BUFFER, nv.NvspType.REVOKE_SEND_BUF, 0, 0))
    assert _channel_state(net)["state"] == "open" and net.nic.receive_buffer is None


@pytest.mark.parametrize("version", [0x00000002, 0x00030002, 0x00040000, 0x00050000, 0x00060000])
def test_every_version_linux_offers_is_accepted(tmp_path: Path, version: int) -> None:
    net = NetGuest(tmp_path)
    try:
        net.initialize(version)
        status, caps, _ = net.query(Oid.OFFLOAD_HARDWARE_CAPABILITIES, bytes(4))
        revision, size = rndis.offload_size(version)
        assert status == 0 and len(caps) == size and caps[1] == revision and 112 <= size <= 156
    finally:
        net.close()


def test_frames_both_ways(net: NetGuest) -> None:
    net.bring_up()
    sent = [_frame(60), _frame(1514), _frame(600)]
    batch = b"".join(rndis_packet(f) for f in sent[:2])
    assert net.send_rndis(batch, section=3) == nv.NvspStatus.SUCCESS            # two in one send section
    assert net.send_rndis(rndis_packet(sent[2]), section=None) == nv.NvspStatus.SUCCESS   # GPA direct
    assert net.backend.take() == sent
    incoming = [_frame(64 + i, fill=i) for i in range(200)]
    net.backend.inject(incoming)
    got = [m for r in net.received() for m in r.messages]
    frames = []
    for message in got:
        kind, length = rndis.HEADER.unpack_from(message)
        offset, size = rndis.PACKET_BODY.unpack_from(message, 8)[:2]
        assert kind == RndisType.PACKET and length == len(message)
        frames.append(message[8 + offset : 8 + offset + size])
    assert frames == incoming
    stats = net.nic.stats
    assert (stats.tx_packets, stats.rx_packets, stats.rx_dropped) == (3, 200, 0)
    assert len(net.nic.receive_buffer.free) == net.nic.receive_buffer.sections   # type: ignore[union-attr]


def test_a_guest_that_returns_no_sections_loses_frames_not_host_memory(net: NetGuest) -> None:
    net.bring_up()
    buffer = net.nic.receive_buffer
    assert buffer is not None
    for _ in range(buffer.sections // 100 + 2):
        net.backend.inject([_frame(100)] * 100)
        net.received(complete=False)   # read, never completed (ring drained so it never fills)
    assert len(buffer.free) == nv.RESERVED_CONTROL_SECTIONS
    assert net.nic.stats.rx_dropped > 0
    # Control replies still find a section; the channel lives on.
    assert net.query(Oid.MAXIMUM_FRAME_SIZE)[0] == RndisStatus.SUCCESS
    assert _channel_state(net)["state"] == "open"


def test_a_full_ring_drops_frames(tmp_path: Path) -> None:
    net = NetGuest(tmp_path, ring_pages=2)
    try:
        net.bring_up()
        for _ in range(40):
            net.backend.inject([_frame(60)] * 100)   # the guest never reads its ring
        assert net.nic.stats.rx_dropped > 0
        assert _channel_state(net)["state"] == "open" and _channel_state(net)["backlog"] == 0
        assert len(net.received()) > 0
    finally:
        net.close()


def test_link_down_and_up_reach_the_guest(net: NetGuest) -> None:
    net.bring_up()
    net.guest.server.call(net.nic.set_link, False)
    (indication,) = [m for r in net.received() for m in r.messages]
    assert rndis.HEADER.unpack_from(indication)[0] == RndisType.INDICATE
    assert rndis.INDICATE.unpack_from(indication, 8)[0] == lib.RNDIS_STATUS_MEDIA_DISCONNECT
    assert net.query(Oid.MEDIA_CONNECT_STATUS)[1] == rndis.U32.pack(lib.NDIS_MEDIA_STATE_DISCONNECTED)
    net.backend.inject([_frame()])
    assert net.received() == [] and net.nic.stats.rx_dropped == 1
    assert net.send_rndis(rndis_packet(_frame())) == nv.NvspStatus.SUCCESS and net.backend.take() == []
    net.guest.server.call(net.nic.set_link, True)
    (indication,) = [m for r in net.received() for m in r.messages]
    assert rndis.INDICATE.unpack_from(indication, 8)[0] == lib.RNDIS_STATUS_MEDIA_CONNECT


def test_a_packet_filter_of_zero_delivers_nothing(net: NetGuest) -> None:
    net.bring_up()
    assert net.set(Oid.CURRENT_PACKET_FILTER, rndis.U32.pack(0)) == 0
    net.backend.inject([_frame()])
    assert net.received() == []


# ---- malformed messages: each either completes with a failure or closes the channel (a typed
# protocol error, counted); the host never raises and never touches memory outside the GPADLs.
def _closed(net: NetGuest) -> bool:
    state = _channel_state(net)
    return state["state"] == "offered" and int(state["protocol_errors"]) > 0   # type: ignore[call-overload]


FAILS = "fails"   # the request completes with a failure status, the channel stays open
CLOSES = "closes"


def _bad_rndis(net: NetGuest, stream: bytes) -> str:
    status = net.send_rndis(stream)
    return FAILS if status == nv.NvspStatus.FAIL else "ok"


MALFORMED_RNDIS = {
    "msg_len below its header": rndis.HEADER.pack(RndisType.PACKET, 4),
    "msg_len past the data": rndis.HEADER.pack(RndisType.PACKET, 4000) + bytes(40),
    "data offset past the message": rndis.PACKET.pack(RndisType.PACKET, 44 + 60, 5000, 60, 0, 0, 0, 0, 0, 0) + bytes(60),
    "data length past the message": rndis.PACKET.pack(RndisType.PACKET, 44 + 60, 36, 6000, 0, 0, 0, 0, 0, 0) + bytes(60),
    "frame shorter than Ethernet's header": rndis_packet(bytes(10)),
    "frame above the MTU": rndis_packet(bytes(1600)),
    "out-of-band data": rndis.PACKET.pack(RndisType.PACKET, 44 + 60, 36, 60, 36, 8, 1, 0, 0, 0) + bytes(60),
    "host-only message type": rndis_message(RndisType.INIT_C, bytes(48)),
    "request without its id": rndis_message(RndisType.QUERY, b""),
    "query shorter than its header": rndis_message(RndisType.QUERY, bytes(8)),
    "a stray partial header": b"\x01\x02\x03",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RNDIS))
def test_malformed_rndis_fails_its_packet(net: NetGuest, case: str) -> None:
    net.bring_up()
    stream = MALFORMED_RNDIS[case]
    if len(stream) > net.send_section:
        pytest.skip("does not fit a send section")
    assert _bad_rndis(net, stream) == FAILS
    assert net.backend.take() == []
    assert not _closed(net) and net.nic.stats.tx_errors == 1
    assert net.send_rndis(rndis_packet(_frame())) == nv.NvspStatus.SUCCESS   # the NIC still works


def test_query_with_its_info_outside_the_message_is_refused(net: NetGuest) -> None:
    net.bring_up()
    request = rndis_message(RndisType.QUERY, rndis.OID_REQUEST.pack(5, Oid.PERMANENT_ADDRESS, 64, 4000) + bytes(4))
    reply = net.control(request)
    assert rndis.QUERY_COMPLETE.unpack_from(reply, 8)[:2] == (5, RndisStatus.INVALID_DATA)


def _send_raw(net: NetGuest, raw: bytes) -> None:
    net.channel.send(raw)
    net.poll()


MALFORMED_NVSP = {
    "unknown type": lambda net: packets.inband(nvsp(nv.MESSAGE, 77), 5, True),
    "RNDIS before the buffers": lambda net: packets.inband(nvsp(nv.RNDIS_PKT, 107, 0, 0, 10), 5, True),
    "send section past the buffer": lambda net: packets.inband(nvsp(nv.RNDIS_PKT, 107, 0, 10_000, 10), 5, True),
    "send section larger than a section": lambda net: packets.inband(nvsp(nv.RNDIS_PKT, 107, 0, 0, 100_000), 5, True),
    "page range outside RAM": lambda net: gpa_direct(nvsp(nv.RNDIS_PKT, 107, 1, lib.NETVSC_INVALID_SECTION, 0), 5,
                                                     page_range(100, 0, [0xFFFFF0])),
    "page ranges on a control message": lambda net: gpa_direct(nvsp(nv.INIT, 1, 2, 2), 5, page_range(100, 0, [net.scratch[0]])),
    "NDIS config with an absurd MTU": lambda net: packets.inband(nvsp(nv.NDIS_CONFIG, 125, 10, 0), 5),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_NVSP))
def test_malformed_nvsp_closes_the_channel(net: NetGuest, case: str) -> None:
    if case != "RNDIS before the buffers":
        net.bring_up()
    else:
        net.request(nvsp(nv.INIT, nv.NvspType.INIT, 0x60001, 0x60001))
    before = net.backend.take()
    _send_raw(net, MALFORMED_NVSP[case](net))
    assert _closed(net), _channel_state(net)
    assert net.backend.take() == [] and before == []
    net.backend.inject([_frame()])   # a closed channel drops what arrives, quietly
    assert net.nic.stats.rx_dropped >= 1


BUFFER_CASES = {
    "receive buffer GPADL unknown": (nv.NvspType.SEND_RECV_BUF, 0xDEAD, lib.NETVSC_RECEIVE_BUFFER_ID),
    "receive buffer with another id": (nv.NvspType.SEND_RECV_BUF, None, 0x1234),
    "receive buffer is the ring": (nv.NvspType.SEND_RECV_BUF, "ring", lib.NETVSC_RECEIVE_BUFFER_ID),
    "send buffer GPADL unknown": (nv.NvspType.SEND_SEND_BUF, 0xDEAD, 0),
}


@pytest.mark.parametrize("case", sorted(BUFFER_CASES))
def test_bad_buffers_are_refused(net: NetGuest, case: str) -> None:
    kind, handle, buffer_id = BUFFER_CASES[case]
    net.request(nvsp(nv.INIT, nv.NvspType.INIT, 0x60001, 0x60001))
    if handle is None:
        handle, _ = net.guest.create_gpadl(net.relid, net.guest.allocate(64))
    elif handle == "ring":
        handle = next(g for g in net.guest.server.gpadls.established.values()).gpadl_id
    reply = net.request(nvsp(nv.SEND_BUFFER, kind, handle, buffer_id))
    assert nv.SEND_BUF_COMPLETE.unpack_from(reply.payload.ljust(40, b"\0"))[1] == nv.NvspStatus.FAIL
    assert not _closed(net)


def test_unknown_and_repeated_receive_completions_are_ignored(net: NetGuest) -> None:
    net.bring_up()
    net.backend.inject([_frame()])
    (received,) = net.received(complete=False)
    net.complete(received.transaction_id)
    net.complete(received.transaction_id)   # again
    net.complete(0x123456)                  # never sent
    net.poll()
    assert not _closed(net) and net.nic.protocol_errors == 2
    assert len(net.nic.receive_buffer.free) == net.nic.receive_buffer.sections   # type: ignore[union-attr]


def test_control_replies_pile_up_only_so_far(net: NetGuest) -> None:
    """A guest that returns no sections and keeps asking loses its channel, not host memory."""
    net.bring_up()
    net.backend.inject([_frame()] * 20000)     # every data section taken
    net.received(complete=False)
    query = rndis_oid(RndisType.QUERY, 1, Oid.MAXIMUM_FRAME_SIZE)
    for _ in range(nv.RESERVED_CONTROL_SECTIONS + nv.CONTROL_BACKLOG + 2):
        if _closed(net):
            break
        net.guest.memory.write(net.send_pfns[0] * 4096, query)
        net.channel.send(packets.inband(nvsp(nv.RNDIS_PKT, nv.NvspType.SEND_RNDIS_PKT, 1, 0, len(query)), 3, True))
        net.received(complete=False)
    assert _closed(net)


NVSP_TYPES = [int(t) for t in nv.NvspType] + [0, 3, 99, 109, 126, 135, 0xFFFFFFFF]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(NVSP_TYPES), body=st.binary(min_size=0, max_size=36),
       rndis_kind=st.sampled_from([int(t) for t in RndisType] + [0, 9, 0x80000001]), rndis_body=st.binary(max_size=120),
       direct=st.booleans())
def test_fuzzed_nvsp_and_rndis(tmp_path_factory: pytest.TempPathFactory, kind: int, body: bytes, rndis_kind: int,
                               rndis_body: bytes, direct: bool) -> None:
    """Random NVSP messages, and random RNDIS messages inside a well-formed SEND_RNDIS_PKT:
    either success, a failed completion, or a closed channel with its protocol error
    counted; never a host exception, and the NIC keeps answering while its channel lives."""
    net = NetGuest(tmp_path_factory.mktemp("fuzz"))
    try:
        net.bring_up()
        message = kind.to_bytes(4, "little") + body
        raw = gpa_direct(message, 11, page_range(64, 0, [net.scratch[0]])) if direct else packets.inband(message, 11, True)
        _send_raw(net, raw)
        stream = rndis_message(rndis_kind, rndis_body)
        if not _closed(net) and net.nic.receive_buffer is not None and net.nic.send_buffer is not None:
            assert net.send_rndis(stream) in (nv.NvspStatus.SUCCESS, nv.NvspStatus.FAIL)
            net.received()
        if not _closed(net) and net.nic.receive_buffer is not None and net.nic.rndis.state is rndis.RndisState.OPERATIONAL:
            assert net.query(Oid.PERMANENT_ADDRESS)[:2] == (RndisStatus.SUCCESS, MAC)
        assert net.nic.describe()["mac"] == MAC.hex(":")
    finally:
        net.close()


def test_frames_from_a_checksumming_backend_carry_one_well_formed_ppi(tmp_path: Path) -> None:
    """Linux 6.1 loops forever on a malformed per-packet-info record: the one we send is
    exactly what its parser wants (size past its header, offset 12, inside the PPI area)."""
    backend = LoopbackBackend()
    backend.checksummed = True   # type: ignore[attr-defined]
    net = NetGuest(tmp_path, backend)
    try:
        net.bring_up()
        frame = _frame(200)
        net.backend.inject([frame])
        (message,) = [m for r in net.received() for m in r.messages]
        offset, size, _oob, _oob_len, _count = rndis.PACKET_BODY.unpack_from(message, 8)
        ppi_offset, ppi_len = rndis.PACKET.unpack_from(message)[7:9]
        assert message[8 + offset : 8 + offset + size] == frame
        ppi_size, ppi_type, data_offset = struct.unpack_from("<III", message, 8 + ppi_offset)
        assert ppi_len == ppi_size == 16 and ppi_type == lib.RNDIS_PPI_TCPIP_CHKSUM and data_offset == 12
        assert 8 + ppi_offset + ppi_len <= 8 + offset
        (value,) = struct.unpack_from("<I", message, 8 + ppi_offset + data_offset)
        assert value == rndis.RX_CHECKSUMS_GOOD
    finally:
        net.close()
