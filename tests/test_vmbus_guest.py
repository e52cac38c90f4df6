"""VMBus end to end: a guest (real hypercalls from guest code on the
simulator) negotiates versions, enumerates offers, creates GPADLs, opens
every provider and exchanges packets with each."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mshvstack.abi import lib
from mshvstack.vmbus import packets
from mshvstack.vmbus.providers.heartbeat import Heartbeat
from mshvstack.vmbus.providers.shutdown import Shutdown
from mshvstack.vmbus.providers.timesync import WINDOWS_EPOCH_OFFSET, TimeSync
from mshvstack.vmbus.server import ConnectionState

from vmbus_guest import VmbusGuest, ic_reply, linux_negotiate_response, parse_offer

V = {name: int(getattr(lib, f"VMBUS_VERSION_{name}")) for name in
     ("WS2008", "WIN7", "WIN8", "WIN8_1", "WIN10", "WIN10_V4_1", "WIN10_V5", "WIN10_V5_1", "WIN10_V5_2", "WIN10_V5_3")}


@pytest.fixture
def guest(tmp_path: Path):  # type: ignore[no-untyped-def]
    g = VmbusGuest([Heartbeat(), Shutdown(), TimeSync()], tmp_path)
    yield g
    g.close()


def _version_response(reply: bytes) -> tuple[int, int, int]:
    msgtype, _pad, supported, state, _p, conn = struct.unpack("<IIBBHI", reply[:16])
    assert msgtype == lib.CHANNELMSG_VERSION_RESPONSE
    return supported, state, conn


@pytest.mark.parametrize("version", [V[n] for n in ("WIN10_V5_3", "WIN10_V5_2", "WIN10_V5_1", "WIN10_V5",
                                                    "WIN10_V4_1", "WIN10", "WIN8_1", "WIN8")])
def test_every_version_linux_speaks_is_accepted(guest: VmbusGuest, version: int) -> None:
    supported, state, conn = _version_response(guest.connect(version))
    assert (supported, state, conn) == (1, 0, 1)
    assert guest.server.version == version and guest.server.state is ConnectionState.CONNECTED


@pytest.mark.parametrize("version", [V["WS2008"], V["WIN7"], 0x00060000, 0xDEADBEEF])
def test_other_versions_are_refused(guest: VmbusGuest, version: int) -> None:
    supported, _state, _conn = _version_response(guest.connect(version))
    assert supported == 0 and guest.server.state is ConnectionState.DISCONNECTED


def _open(guest: VmbusGuest, kind: type) -> tuple[object, object]:
    guest.connect()
    offers = [parse_offer(o) for o in guest.request_offers()[:-1]]
    offer = next(o for o in offers if o["class"] == kind.class_id)
    channel, status = guest.open_channel(offer["relid"], offer["connection_id"])
    assert status == 0 and channel is not None
    provider = guest.server.channels[offer["relid"]].provider
    return provider, channel


def _negotiate(guest: VmbusGuest, channel, message_prefs) -> None:  # type: ignore[no-untyped-def]
    request = channel.receive()
    assert request is not None and request.type == packets.INBAND
    assert struct.unpack_from("<H", request.payload, 12)[0] == lib.ICMSGTYPE_NEGOTIATE
    reply = linux_negotiate_response(request.payload, ((3, 0), (1, 0)), message_prefs)
    assert channel.send(packets.inband(reply, request.transaction_id)) == lib.HV_STATUS_SUCCESS


def test_offers_carry_each_provider(guest: VmbusGuest) -> None:
    guest.connect()
    messages = guest.request_offers()
    assert struct.unpack_from("<I", messages[-1])[0] == lib.CHANNELMSG_ALLOFFERS_DELIVERED
    offers = [parse_offer(m) for m in messages[:-1]]
    assert [o["class"] for o in offers] == [Heartbeat.class_id, Shutdown.class_id, TimeSync.class_id]
    assert all(o["flags"] == lib.VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE | lib.VMBUS_CHANNEL_NAMED_PIPE_MODE for o in offers)
    assert len({o["connection_id"] for o in offers}) == 3
    assert guest.request_offers() == []  # a second REQUESTOFFERS is a protocol error, not a second set
    assert guest.server.protocol_errors == 1


def test_heartbeat_rounds(guest: VmbusGuest) -> None:
    heartbeat, channel = _open(guest, Heartbeat)
    _negotiate(guest, channel, ((3, 0), (1, 0)))
    assert heartbeat.ready and heartbeat.version == (3, 0)  # type: ignore[attr-defined]
    for round_ in range(1, 4):
        assert heartbeat.beat() == round_  # type: ignore[attr-defined]
        request = channel.receive()  # type: ignore[attr-defined]
        (seq,) = struct.unpack_from("<Q", request.payload, 28)
        assert seq == round_
        reply = ic_reply(request.payload, struct.pack("<Q", seq + 1) + request.payload[36:])
        channel.send(packets.inband(reply, request.transaction_id))  # type: ignore[attr-defined]
        assert heartbeat.acknowledged == round_ + 1  # type: ignore[attr-defined]
    assert heartbeat.describe()["guest_alive"]  # type: ignore[attr-defined]


def test_shutdown_request_and_result(guest: VmbusGuest) -> None:
    shutdown, channel = _open(guest, Shutdown)
    _negotiate(guest, channel, ((3, 2), (3, 1), (3, 0), (1, 0)))
    assert shutdown.version == (3, 2)  # type: ignore[attr-defined]
    shutdown.request(force=True)  # type: ignore[attr-defined]
    request = channel.receive()  # type: ignore[attr-defined]
    reason, timeout, flags = struct.unpack_from("<III", request.payload, 28)
    assert (reason, flags) == (lib.IC_SHUTDOWN_REASON_PLANNED, lib.IC_SHUTDOWN_FLAG_FORCE)
    assert len(request.payload) >= 28 + 2060  # Linux drops shorter shutdown messages
    channel.send(packets.inband(ic_reply(request.payload), request.transaction_id))  # type: ignore[attr-defined]
    assert shutdown.result == 0  # type: ignore[attr-defined]


def test_time_samples_from_host_time(guest: VmbusGuest) -> None:
    """The first sample after the IC connects steps the clock (SYNC), as Hyper-V's does: a
    slow boot leaves Linux's wall clock behind (found with Debian's kernel); later ones inform."""
    timesync, channel = _open(guest, TimeSync)
    _negotiate(guest, channel, ((4, 0), (3, 0), (1, 0)))
    assert timesync.version == (3, 0)  # type: ignore[attr-defined]  # no reference time: v4 not offered
    for expected in (lib.IC_TIMESYNC_FLAG_SYNC, lib.IC_TIMESYNC_FLAG_SAMPLE):
        request = channel.receive()  # type: ignore[attr-defined]
        assert request is not None
        parent, _child, _rtt, flags = struct.unpack_from("<QQQB", request.payload, 28)
        host_now = int(time.time() * 10_000_000) + WINDOWS_EPOCH_OFFSET
        assert abs(host_now - parent) < 5 * 10_000_000 and flags == expected
        channel.send(packets.inband(ic_reply(request.payload), request.transaction_id))  # type: ignore[attr-defined]
        timesync.sample()  # type: ignore[attr-defined]
    assert timesync.samples_acknowledged == 2  # type: ignore[attr-defined]


def test_multi_message_gpadl_and_bad_pages(guest: VmbusGuest) -> None:
    guest.connect()
    guest.request_offers()
    gpadl_id, replies = guest.create_gpadl(1, guest.allocate(70))  # header + 2 bodies
    assert struct.unpack("<IIIII", replies[-1][:20]) == (lib.CHANNELMSG_GPADL_CREATED, 0, 1, gpadl_id, 0)
    assert guest.server.gpadls.established[gpadl_id].pages == 70
    _id, replies = guest.create_gpadl(1, [0x10, 0xFFFFF])  # second page is not guest RAM
    assert struct.unpack_from("<I", replies[-1], 16)[0] != 0
    channel, status = guest.open_channel(1, 0x2001, ring_pages=1)  # rings too small
    assert channel is None and status != 0


def test_close_teardown_unload_and_rescind(guest: VmbusGuest) -> None:
    heartbeat, channel = _open(guest, Heartbeat)
    relid = channel.relid  # type: ignore[attr-defined]
    assert guest.post_message(struct.pack("<III", lib.CHANNELMSG_CLOSECHANNEL, 0, relid)) == 0
    gpadl = next(iter(guest.server.gpadls.established))
    assert guest.post_message(struct.pack("<IIII", lib.CHANNELMSG_GPADL_TEARDOWN, 0, relid, gpadl)) == 0
    (torndown,) = guest.messages()
    assert struct.unpack("<III", torndown[:12]) == (lib.CHANNELMSG_GPADL_TORNDOWN, 0, gpadl)
    guest.server.rescind(2)
    (rescind,) = guest.messages()
    assert struct.unpack("<III", rescind[:12]) == (lib.CHANNELMSG_RESCIND_CHANNELOFFER, 0, 2)
    assert guest.post_message(struct.pack("<III", lib.CHANNELMSG_RELID_RELEASED, 0, 2)) == 0
    assert 2 not in guest.server.channels
    assert guest.post_message(struct.pack("<II", lib.CHANNELMSG_UNLOAD, 0)) == 0
    (unloaded,) = guest.messages()
    assert struct.unpack_from("<I", unloaded)[0] == lib.CHANNELMSG_UNLOAD_RESPONSE
    assert guest.server.state is ConnectionState.DISCONNECTED


def test_hypercall_validation(guest: VmbusGuest) -> None:
    assert guest.post_message(b"\0" * 8, connection_id=77) == lib.HV_STATUS_INVALID_CONNECTION_ID
    assert guest.post_message(b"\0" * 8, message_type=0x80000001) == lib.HV_STATUS_INVALID_HYPERCALL_INPUT
    guest.memory.write(0x31000, struct.pack("<IIII", 1, 0, 1, 241))
    assert guest.hypercall(int(lib.HVCALL_POST_MESSAGE), 0x31000) == lib.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert guest.hypercall(int(lib.HVCALL_POST_MESSAGE), 0x31004) == lib.HV_STATUS_INVALID_ALIGNMENT
    assert guest.hypercall(int(lib.HVCALL_POST_MESSAGE), 0x7FFFFFF8) == lib.HV_STATUS_INVALID_PARAMETER
    assert guest.signal_event(0x2001, flag=1) == lib.HV_STATUS_INVALID_PORT_ID
    assert guest.signal_event(0x2999) == lib.HV_STATUS_INVALID_CONNECTION_ID


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(st.integers(0, 30), st.binary(max_size=232)), min_size=1, max_size=8),
       ring_garbage=st.binary(min_size=16, max_size=64))
def test_fuzzed_guest_never_breaks_the_host(guest: VmbusGuest, messages: list[tuple[int, bytes]], ring_garbage: bytes) -> None:
    heartbeat, channel = _open(guest, Heartbeat)
    for msgtype, body in messages:
        guest.post_message(struct.pack("<II", msgtype, 0) + body)
        guest.messages()
    # Garbage in the guest->host ring, then a doorbell: the channel closes, the host survives.
    ring = channel.send_ring  # type: ignore[attr-defined]
    ring.mem.write_data(0, ring_garbage)
    ring.mem.write_control(0, len(ring_garbage) & ~7)
    guest.signal_event(channel.connection_id)  # type: ignore[attr-defined]
    # The server still negotiates afterwards.
    supported, _s, _c = _version_response(guest.connect())
    assert supported == 1


def _kvp_value(payload: bytes) -> tuple[int, int, str, str]:
    from mshvstack.abi import ffi

    msg = ffi.from_buffer("struct hv_kvp_msg *", bytearray(payload[28:].ljust(ffi.sizeof("struct hv_kvp_msg"), b"\0")))
    value = msg.body.set
    key = bytes(value.key)[: value.key_size].decode("utf-16-le").rstrip("\0")
    text = bytes(value.value)[: value.value_size].decode("utf-16-le").rstrip("\0")
    return int(msg.kvp_hdr.operation), int(msg.kvp_hdr.pool), key, text


def test_kvp_set_get_enumerate(tmp_path: Path) -> None:
    from mshvstack.abi import ffi
    from mshvstack.vmbus.providers.kvp import Kvp, KvpError

    guest = VmbusGuest([Kvp()], tmp_path)
    try:
        kvp, channel = _open(guest, Kvp)
        _negotiate(guest, channel, ((4, 0), (3, 0), (1, 0)))
        assert kvp.version == (4, 0)  # type: ignore[attr-defined]
        guest_store: dict[tuple[int, str], str] = {}

        def serve(answer_auto: dict[int, tuple[str, str]]) -> None:
            request = channel.receive()  # type: ignore[attr-defined]
            op, pool, key, value = _kvp_value(request.payload)
            body = bytearray(request.payload[28:])
            status = 0
            if op == lib.KVP_OP_SET:
                guest_store[(pool, key)] = value
            elif op == lib.KVP_OP_GET:
                msg = ffi.from_buffer("struct hv_kvp_msg *", body)
                data = (guest_store.get((pool, key), "") + "\0").encode("utf-16-le")
                msg.body.get.value_size = len(data)
                ffi.memmove(msg.body.get.value, data, len(data))
            elif op == lib.KVP_OP_ENUMERATE:
                msg = ffi.from_buffer("struct hv_kvp_msg *", body)
                index = int(msg.body.enumerate.index)
                if index in answer_auto:
                    k, v = ((s + "\0").encode("utf-16-le") for s in answer_auto[index])
                    msg.body.enumerate.data.key_size, msg.body.enumerate.data.value_size = len(k), len(v)
                    ffi.memmove(msg.body.enumerate.data.key, k, len(k))
                    ffi.memmove(msg.body.enumerate.data.value, v, len(v))
                else:
                    status = int(lib.IC_STATUS_S_CONT)
            channel.send(packets.inband(ic_reply(request.payload, bytes(body), status), request.transaction_id))  # type: ignore[attr-defined]

        kvp.set(lib.KVP_POOL_EXTERNAL, "build", "42")  # type: ignore[attr-defined]
        serve({})
        assert kvp.wait_reply(1).status == 0 and guest_store == {(0, "build"): "42"}  # type: ignore[attr-defined]
        kvp.get(lib.KVP_POOL_EXTERNAL, "build")  # type: ignore[attr-defined]
        serve({})
        assert kvp.wait_reply(1).value == "42"  # type: ignore[attr-defined]
        auto = {0: ("FullyQualifiedDomainName", "guest.example"), 2: ("NetworkAddressIPv4", "10.0.0.2")}
        kvp.enumerate(lib.KVP_POOL_AUTO, 0)  # type: ignore[attr-defined]
        serve(auto)
        reply = kvp.wait_reply(1)  # type: ignore[attr-defined]
        assert (reply.key, reply.value) == ("FullyQualifiedDomainName", "guest.example")
        kvp.enumerate(lib.KVP_POOL_AUTO, 1)  # type: ignore[attr-defined]
        serve(auto)
        assert kvp.wait_reply(1).status == lib.IC_STATUS_S_CONT  # type: ignore[attr-defined]
        kvp.get(lib.KVP_POOL_GUEST, "nobody answers")  # type: ignore[attr-defined]
        with pytest.raises(KvpError, match="did not answer"):
            kvp.wait_reply(0.05)  # type: ignore[attr-defined]
    finally:
        guest.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=120), header=st.binary(min_size=28, max_size=28))
def test_fuzzed_ic_payloads_close_only_that_channel(guest: VmbusGuest, body: bytes, header: bytes) -> None:
    heartbeat, channel = _open(guest, Heartbeat)
    channel.send(packets.inband(header + body, 5))  # type: ignore[attr-defined]
    relid = channel.relid  # type: ignore[attr-defined]
    state = guest.server.channels[relid].state.value
    assert state in ("open", "offered")  # accepted as a response, or the channel closed; never a crash
    assert guest.server.state is ConnectionState.CONNECTED


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(buflen=st.integers(0, 600), pfns=st.lists(st.integers(0, 2**64 - 1), max_size=30), bodies=st.integers(0, 3))
def test_fuzzed_gpadls_never_escape(guest: VmbusGuest, buflen: int, pfns: list[int], bodies: int) -> None:
    guest.connect()
    guest.request_offers()
    gpadl = guest.gpadl_counter
    guest.gpadl_counter += 1
    header = struct.pack("<IIIIHHII", lib.CHANNELMSG_GPADL_HEADER, 0, 1, gpadl, buflen & 0xFFFF, 1, 4096, 0)
    guest.post_message(header + struct.pack(f"<{min(len(pfns), 26)}Q", *pfns[:26]))
    for _ in range(bodies):
        guest.post_message(struct.pack("<IIII", lib.CHANNELMSG_GPADL_BODY, 0, 0, gpadl) + struct.pack(f"<{min(len(pfns), 28)}Q", *pfns[:28]))
    for reply in guest.messages():
        assert struct.unpack_from("<I", reply)[0] == lib.CHANNELMSG_GPADL_CREATED
    for established in guest.server.gpadls.established.values():
        assert all(pfn * 4096 < guest.memory.size for pfn in established.pfns)
