"""One offered channel: its state, rings and doorbells."""

from __future__ import annotations

import enum
import logging
import struct
from typing import TYPE_CHECKING

from mshvstack.abi import lib
from mshvstack.partition.memory import GuestMemory
from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.gpadl import Gpadl, GpadlRingMem
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.ring import IncomingRing, OutgoingRing

if TYPE_CHECKING:
    from mshvstack.vmbus.synic import SynicHost

log = logging.getLogger(__name__)
EVENT_CONNECTION_BASE = 0x2000   # guest -> host doorbell id = base + relid (OpenVMM's VTL0 choice)
NO_INTERRUPT = int(lib.VMBUS_VP_INDEX_DISABLE_INTERRUPT)


class ChannelState(enum.Enum):
    OFFERED = "offered"
    OPEN = "open"
    RESCINDED = "rescinded"


class Channel:
    def __init__(self, relid: int, provider: Provider, synic: "SynicHost", memory: GuestMemory) -> None:
        self.relid = relid
        self.provider = provider
        self.synic = synic
        self.memory = memory
        self.state = ChannelState.OFFERED
        self.connection_id = EVENT_CONNECTION_BASE + relid
        self.target_vp = 0
        self.sint = int(lib.VMBUS_MESSAGE_SINT)
        self.ring_gpadl: Gpadl | None = None
        self.incoming: IncomingRing | None = None
        self.outgoing: OutgoingRing | None = None
        self.packets_in = 0
        self.packets_out = 0
        self.protocol_errors = 0

    def open(self, gpadl: Gpadl, downstream_offset: int, target_vp: int) -> None:
        if downstream_offset < 2 or gpadl.pages - downstream_offset < 2:
            raise VmbusProtocolError(f"channel {self.relid}: downstream offset {downstream_offset} splits a "
                                     f"{gpadl.pages}-page GPADL into unusable rings")
        self.incoming = IncomingRing(GpadlRingMem(self.memory, gpadl.pfns[:downstream_offset]))
        self.outgoing = OutgoingRing(GpadlRingMem(self.memory, gpadl.pfns[downstream_offset:]))
        self.outgoing.start()
        self.incoming.start()
        self.ring_gpadl = gpadl
        self.target_vp = target_vp
        self.state = ChannelState.OPEN
        self.synic.register_event_port(self.connection_id, self.on_doorbell)

    def close(self) -> None:
        if self.state is ChannelState.OPEN:
            self.synic.unregister_event_port(self.connection_id)
            try:
                self.provider.on_close(self)
            finally:
                self.state = ChannelState.OFFERED
                self.incoming = self.outgoing = None
                self.ring_gpadl = None

    # ---- data path
    def send(self, packet: bytes) -> None:
        """Queue a packet to the guest and ring its doorbell if needed."""
        if self.outgoing is None:
            raise VmbusProtocolError(f"channel {self.relid} is not open")
        if self.outgoing.write(packet):
            self.signal_guest()
        self.packets_out += 1

    def send_inband(self, payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> None:
        self.send(packets.inband(payload, transaction_id, completion_requested))

    def send_completion(self, transaction_id: int, payload: bytes) -> None:
        self.send(packets.completion(transaction_id, payload))

    def signal_guest(self) -> None:
        if self.target_vp != NO_INTERRUPT:
            self.synic.signal_event(self.target_vp, self.sint, self.relid)

    def on_doorbell(self) -> None:
        """The guest signalled: drain its ring.  A corrupt ring closes the channel."""
        if self.incoming is None:
            return
        try:
            while self.incoming is not None:
                item = self.incoming.read()
                if item is None:
                    break
                raw, signal = item
                if signal:
                    self.signal_guest()
                self.packets_in += 1
                self.provider.on_packet(self, packets.parse(raw))
        except (VmbusProtocolError, struct.error, ValueError, IndexError) as exc:
            # Anything a guest can make a provider trip over is a protocol error.
            self.protocol_errors += 1
            log.warning("channel %d (%s): %s; closing it", self.relid, self.provider.name, exc)
            self.close()

    def describe(self) -> dict[str, object]:
        return {"relid": self.relid, "device": self.provider.name, "state": self.state.value,
                "packets_in": self.packets_in, "packets_out": self.packets_out, "protocol_errors": self.protocol_errors}

