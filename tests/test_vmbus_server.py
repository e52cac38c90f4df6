"""The channel-management state machine under random guest behaviour
(hypothesis), and back-pressure when the guest stops reading."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mshvstack.abi import lib
from mshvstack.vmbus.channel import ChannelState
from mshvstack.vmbus.providers.heartbeat import Heartbeat
from mshvstack.vmbus.providers.shutdown import Shutdown
from mshvstack.vmbus.server import ConnectionState

from vmbus_guest import VmbusGuest, parse_offer

_WORKDIR = Path(tempfile.mkdtemp(prefix="vmbus-sm-"))


class ChannelStateMachine(RuleBasedStateMachine):
    """Model: connected?, offered relids, open relids, established GPADLs."""

    def __init__(self) -> None:
        super().__init__()
        self.guest = VmbusGuest([Heartbeat(), Shutdown()], _WORKDIR)
        self.connected = False
        self.offers: dict[int, int] = {}
        self.open: set[int] = set()
        self.gpadls: dict[int, int] = {}

    def teardown(self) -> None:
        self.guest.close()

    @rule(version=st.sampled_from([int(lib.VMBUS_VERSION_WIN10_V5_3), int(lib.VMBUS_VERSION_WIN8), 0x0000000D]))
    def connect(self, version: int) -> None:
        reply = self.guest.connect(version)
        supported = reply[8]
        assert supported == (version != 0x0000000D)
        self.connected = bool(supported)
        self.offers, self.open, self.gpadls = {}, set(), {}

    @precondition(lambda self: self.connected)
    @rule()
    def request_offers(self) -> None:
        messages = self.guest.request_offers()
        if self.offers:
            assert messages == []  # only once per connection
            return
        assert struct.unpack_from("<I", messages[-1])[0] == lib.CHANNELMSG_ALLOFFERS_DELIVERED
        self.offers = {o["relid"]: o["connection_id"] for o in map(parse_offer, messages[:-1])}

    @precondition(lambda self: self.offers)
    @rule(data=st.data())
    def open_channel(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(sorted(self.offers)))
        channel, status = self.guest.open_channel(relid, self.offers[relid])
        gpadl = self.guest.gpadl_counter - 1
        self.gpadls[gpadl] = relid
        assert (status == 0) == (relid not in self.open)
        self.open.add(relid)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close_channel(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(sorted(self.open)))
        assert self.guest.post_message(struct.pack("<III", lib.CHANNELMSG_CLOSECHANNEL, 0, relid)) == 0
        self.open.discard(relid)

    @precondition(lambda self: self.gpadls)
    @rule(data=st.data())
    def teardown_gpadl(self, data: st.DataObject) -> None:
        gpadl = data.draw(st.sampled_from(sorted(self.gpadls)))
        relid = self.gpadls.pop(gpadl)
        assert self.guest.post_message(struct.pack("<IIII", lib.CHANNELMSG_GPADL_TEARDOWN, 0, relid, gpadl)) == 0
        (reply,) = self.guest.messages()
        assert struct.unpack("<III", reply[:12]) == (lib.CHANNELMSG_GPADL_TORNDOWN, 0, gpadl)
        if self.guest.server.channels[relid].state is ChannelState.OFFERED:
            self.open.discard(relid)

    @precondition(lambda self: self.connected)
    @rule()
    def unload(self) -> None:
        assert self.guest.post_message(struct.pack("<II", lib.CHANNELMSG_UNLOAD, 0)) == 0
        (reply,) = self.guest.messages()
        assert struct.unpack_from("<I", reply)[0] == lib.CHANNELMSG_UNLOAD_RESPONSE
        self.connected, self.offers, self.open, self.gpadls = False, {}, set(), {}

    @rule(msgtype=st.integers(0, 40), body=st.binary(max_size=64))
    def garbage(self, msgtype: int, body: bytes) -> None:
        if msgtype in (lib.CHANNELMSG_INITIATE_CONTACT, lib.CHANNELMSG_UNLOAD, lib.CHANNELMSG_OPENCHANNEL,
                       lib.CHANNELMSG_CLOSECHANNEL, lib.CHANNELMSG_GPADL_TEARDOWN, lib.CHANNELMSG_REQUESTOFFERS,
                       lib.CHANNELMSG_GPADL_HEADER, lib.CHANNELMSG_GPADL_BODY, lib.CHANNELMSG_RELID_RELEASED,
                       lib.CHANNELMSG_MODIFYCHANNEL):
            msgtype = 99  # keep the model exact: only unknown types here
        self.guest.post_message(struct.pack("<II", msgtype, 0) + body)
        assert self.guest.messages() == []

    @invariant()
    def server_matches_model(self) -> None:
        server = self.guest.server
        assert (server.state is ConnectionState.CONNECTED) == self.connected
        opened = {relid for relid, c in server.channels.items() if c.state is ChannelState.OPEN}
        assert opened == self.open
        assert set(server.gpadls.established) == set(self.gpadls)


TestChannelStateMachine = ChannelStateMachine.TestCase
TestChannelStateMachine.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


def test_guest_that_stops_reading_gets_back_pressure(tmp_path: Path) -> None:
    guest = VmbusGuest([Heartbeat()], tmp_path)
    try:
        guest.connect()
        guest.request_offers()
        statuses = []
        for gpadl in range(40):  # each GPADL_HEADER queues a GPADL_CREATED the guest never reads
            header = struct.pack("<IIIIHHII", lib.CHANNELMSG_GPADL_HEADER, 0, 1, 0x100 + gpadl, 16, 1, 4096, 0)
            statuses.append(guest.post_message(header + struct.pack("<Q", 0x500)))
        assert lib.HV_STATUS_INSUFFICIENT_BUFFERS in statuses
        assert guest.synic.pending_messages() <= 17
        assert len(guest.messages()) >= 16  # once read, everything queued is delivered in order
    finally:
        guest.close()
