"""The VMBus host's records: saved from a host a guest is using, restored into a
fresh host on the same memory, which then serves the guest's open channels as
the first did; saved again, the records are equal.  Damaged records (any field
changed to anything) only ever give a typed error."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vmbus_storage import INIT_ID, _image, _request, _vstor

from mshvstack.abi import lib
from mshvstack.snapshot import SnapshotError, typed
from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.providers.heartbeat import Heartbeat, HeartbeatState
from mshvstack.vmbus.providers.ic import IcState
from mshvstack.vmbus.providers.scsi import DiskImage
from mshvstack.vmbus.providers.storage import Storage, StorageState
from mshvstack.vmbus.server import VmbusRecords, VmbusServer, VmbusState
from mshvstack.vmbus.synic import SynicHostState

from vmbus_guest import VmbusGuest, ic_reply, linux_negotiate_response, parse_offer

PENDING_GPADL = 0x5EED


def _providers(disk: DiskImage) -> list[Any]:
    return [Heartbeat(), Storage(disk)]


def _encoded(records: VmbusRecords) -> dict[str, Any]:
    return {"server": typed.encode(records.server), "synic": typed.encode(records.synic),
            "providers": {relid: typed.encode(state) for relid, state in records.providers.items()}}


def _decoded(encoded: dict[str, Any], server: VmbusServer) -> VmbusRecords:
    """Through JSON text and back, each record checked against its class."""
    text = json.loads(json.dumps(encoded))
    return VmbusRecords(typed.decode(VmbusState, text["server"], "vmbus"), typed.decode(SynicHostState, text["synic"], "synic"),
                        {int(relid): typed.decode(server.channels[int(relid)].provider.state_type, state, f"channel {relid}")
                         for relid, state in text["providers"].items()})


@pytest.fixture
def busy(tmp_path: Path) -> Any:
    """A guest with the heartbeat negotiated, the disk initialised, and one GPADL half sent."""
    disk = DiskImage(_image(tmp_path))
    guest = VmbusGuest(_providers(disk), tmp_path)
    guest.connect()
    offers = {str(o["class"]): o for o in map(parse_offer, guest.request_offers()[:-1])}
    beat_offer, disk_offer = offers[str(Heartbeat.class_id)], offers[str(Storage.class_id)]
    heartbeat, status = guest.open_channel(beat_offer["relid"], beat_offer["connection_id"])
    assert status == 0 and heartbeat is not None
    negotiate = heartbeat.receive()
    assert negotiate is not None
    heartbeat.send(packets.inband(linux_negotiate_response(negotiate.payload, ((3, 0),), ((3, 0),))))
    storage, status = guest.open_channel(disk_offer["relid"], disk_offer["connection_id"], ring_pages=8)
    assert status == 0 and storage is not None
    assert _request(storage, _vstor(lib.VSTOR_OPERATION_BEGIN_INITIALIZATION), INIT_ID).status == 0
    assert _request(storage, _vstor(lib.VSTOR_OPERATION_QUERY_PROTOCOL_VERSION, version=0x0600), INIT_ID).status == 0
    pfns = guest.allocate(40)
    header = struct.pack("<IIIIHHII", lib.CHANNELMSG_GPADL_HEADER, 0, disk_offer["relid"], PENDING_GPADL, 8 + 8 * 40, 1,
                         40 * 4096, 0) + struct.pack("<26Q", *pfns[:26])
    assert guest.post_message(header) == 0
    yield guest, disk, heartbeat, storage, pfns
    guest.close()
    disk.close()


def _fresh_server(guest: VmbusGuest, disk: DiskImage) -> VmbusServer:
    return VmbusServer(guest.synic, guest.memory, _providers(disk), vp_count=1)


def test_restored_host_serves_the_guest_and_saves_the_same(busy: Any) -> None:
    guest, disk, heartbeat, storage, pending_pfns = busy
    with guest.server.quiesced() as records:
        saved = _encoded(records)
    assert records.providers[1] == HeartbeatState(IcState((3, 0), (3, 0), False, 1), 0, None)
    assert isinstance(records.providers[2], StorageState) and records.providers[2].version == 0x0600
    assert [g.gpadl_id for g in records.server.pending_gpadls] == [PENDING_GPADL]

    restored = _fresh_server(guest, disk)
    restored.restore(_decoded(saved, restored))
    with restored.quiesced() as again:
        assert _encoded(again) == saved
    guest.server = restored

    # The disk channel answers on its old rings; the heartbeat goes on from its negotiated version.
    assert _request(storage, _vstor(lib.VSTOR_OPERATION_END_INITIALIZATION), INIT_ID).status == 0
    heartbeat_provider = restored.channels[1].provider
    assert isinstance(heartbeat_provider, Heartbeat) and heartbeat_provider.ready
    restored.call(heartbeat_provider.beat)
    request = heartbeat.receive()
    assert request is not None
    (sequence,) = struct.unpack_from("<Q", request.payload, 28)
    heartbeat.send(packets.inband(ic_reply(request.payload, struct.pack("<Q", sequence + 1) + bytes(32))))
    assert heartbeat_provider.acknowledged == sequence + 1
    # The GPADL in progress completes with its remaining body.
    body = struct.pack("<IIII", lib.CHANNELMSG_GPADL_BODY, 0, 0, PENDING_GPADL) + struct.pack("<14Q", *pending_pfns[26:])
    assert guest.post_message(body) == 0
    assert PENDING_GPADL in restored.gpadls.established


def test_resignal_wakes_both_sides(busy: Any) -> None:
    """A request the guest queued while the host was saved is served after the restore,
    though its doorbell rang into the pause."""
    guest, disk, _heartbeat, storage, _pfns = busy
    with guest.server.quiesced() as records:
        saved = _encoded(records)
        storage.send_ring.write(packets.inband(_vstor(lib.VSTOR_OPERATION_END_INITIALIZATION), 77, completion_requested=True))
    restored = _fresh_server(guest, disk)
    restored.restore(_decoded(saved, restored))
    assert storage.receive() is None   # nobody looked at the ring yet
    restored.resignal()
    reply = storage.receive()
    assert reply is not None and reply.transaction_id == 77


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _leaves(item, (*path, key))]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _leaves(item, (*path, i))] or [path]
    return [path]


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 65), st.text(max_size=8),
                        st.lists(st.integers(0, 1 << 20), max_size=4), st.just({}), st.just("zz"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_records_give_a_typed_error_only(busy: Any, data: st.DataObject) -> None:
    guest, disk, _heartbeat, _storage, _pfns = busy
    with guest.server.quiesced() as records:
        saved = _encoded(records)
    damaged = copy.deepcopy(saved)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_leaves(damaged)))
        target = damaged
        for key in path[:-1]:
            target = target[key]
        if path:
            target[path[-1]] = data.draw(JSON_VALUES)
    server = _fresh_server(guest, disk)
    try:
        server.restore(_decoded(damaged, server))
    except (SnapshotError, VmbusProtocolError):
        pass
    finally:
        server.close()


def test_records_that_do_not_fit_the_machine_are_refused(busy: Any) -> None:
    guest, disk, _heartbeat, _storage, _pfns = busy
    with guest.server.quiesced() as records:
        saved = _encoded(records)
    cases = {
        "a ring GPADL the connection lacks": ("server", "channels", 0, "ring_gpadl", 0xDEAD),
        "a target VP beyond the machine": ("server", "channels", 1, "target_vp", 7),
        "a GPADL page outside RAM": ("server", "gpadls", 0, "pfns", 0, 1 << 40),
        "a protocol version never offered": ("server", "version", 0x00020001),
        "another device on a relid": ("server", "channels", 0, "device", "storage"),
    }
    for what, (*path, value) in cases.items():
        damaged = copy.deepcopy(saved)
        target: Any = damaged
        for key in path[:-1]:
            target = target[key]
            if isinstance(target, dict) and "fields" in target:
                target = target["fields"]
        target[path[-1]] = value
        server = _fresh_server(guest, disk)
        with pytest.raises(VmbusProtocolError):
            server.restore(_decoded(damaged, server))
        server.close()
        assert what
