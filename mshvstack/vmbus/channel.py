"""One offered channel: its state, rings and doorbells.

Both directions are bounded, so no guest can hold the host: a doorbell
drains at most DRAIN_BUDGET packets and hands the rest to the server's
worker (``defer``), which takes the VMBus lock again for each budget; a
packet for a full host→guest ring waits in a bounded backlog, the ring's
pending-send-size asking the guest to signal once it has made room, and
while replies wait no new requests are taken (the guest's own producer
then stalls, as on Hyper-V).  A guest that never reads loses the channel.

A channel is part of its server's state: every method runs with the
server's lock held (docs/concurrency.md).  The guest's doorbell arrives on a
VP's thread with no lock, so it goes through the server's ``doorbell`` hook,
which takes the lock and comes back to ``on_doorbell``.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from mshvstack.abi import lib
from mshvstack.partition.memory import GuestMemory
from mshvstack.vmbus import packets
from mshvstack.vmbus.errors import RingFull, VmbusProtocolError
from mshvstack.vmbus.gpadl import Gpadl, GpadlRingMem, GpadlTable
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.ring import TRAILER, IncomingRing, OutgoingRing

if TYPE_CHECKING:
    from mshvstack.vmbus.synic import SynicHost

log = logging.getLogger(__name__)
EVENT_CONNECTION_BASE = 0x2000   # guest -> host doorbell id = base + relid (OpenVMM's VTL0 choice)
NO_INTERRUPT = int(lib.VMBUS_VP_INDEX_DISABLE_INTERRUPT)
DRAIN_BUDGET = 64          # guest packets handled per doorbell (or per deferred pass)
BACKLOG_LIMIT = 256        # host packets waiting for room in the guest's ring
MAX_SAVED_PACKET = 1 << 20


class ChannelState(enum.Enum):
    OFFERED = "offered"
    OPEN = "open"
    RESCINDED = "rescinded"


@dataclass(frozen=True)
class ChannelSavedState:
    """One channel: ``ring_gpadl`` and ``downstream_offset`` (the guest→host ring's
    pages) when it is open; ``backlog``: host packets waiting for room in the guest's ring."""

    VERSION: ClassVar[int] = 1
    relid: int
    device: str
    state: str
    target_vp: int
    ring_gpadl: int | None
    downstream_offset: int
    packets_in: int
    packets_out: int
    protocol_errors: int
    backlog: tuple[bytes, ...] = field(metadata={"max_items": BACKLOG_LIMIT, "max_bytes": MAX_SAVED_PACKET})


class Channel:
    """``defer``: the server's "drain again later" (called with its lock held); ``doorbell``:
    the server's entry point for the guest's signal (takes its lock, then calls on_doorbell)."""

    def __init__(self, relid: int, provider: Provider, synic: SynicHost, memory: GuestMemory,
                 defer: Callable[[Channel], None] = lambda channel: None,
                 doorbell: Callable[[Channel], None] = lambda channel: channel.on_doorbell(),
                 gpadls: GpadlTable | None = None) -> None:
        self.relid = relid
        self.provider = provider
        self.synic = synic
        self.memory = memory
        self.state = ChannelState.OFFERED
        self.connection_id = EVENT_CONNECTION_BASE + relid
        self.target_vp = 0
        self.sint = int(lib.VMBUS_MESSAGE_SINT)
        self.ring_gpadl: Gpadl | None = None
        self.downstream_offset = 0       # the guest→host ring's pages at the start of ring_gpadl
        self.incoming: IncomingRing | None = None
        self.outgoing: OutgoingRing | None = None
        self.ring_pages: frozenset[int] = frozenset()   # the rings' own pfns: never a DMA target
        self.packets_in = 0
        self.packets_out = 0
        self.protocol_errors = 0
        self.defer = defer
        self._doorbell = doorbell
        self._backlog: deque[bytes] = deque()
        # While a doorbell drains the guest's ring, the signals owed to the guest wait for its end
        # (None: not draining, signal at once; else whether one is owed), so a guest that queued many
        # requests takes one interrupt for all their completions.
        self._owed: bool | None = None
        self.gpadls = gpadls   # the connection's GPADLs: devices with buffers beside the ring (netvsp) look theirs up

    def open(self, gpadl: Gpadl, downstream_offset: int, target_vp: int) -> None:
        self._attach(gpadl, downstream_offset, target_vp)
        assert self.outgoing is not None and self.incoming is not None
        self.outgoing.start()
        self.incoming.start()

    def _attach(self, gpadl: Gpadl, downstream_offset: int, target_vp: int) -> None:
        """Use the rings in ``gpadl`` (an open, or a restore: the rings' control pages stay as they are)."""
        if downstream_offset < 2 or gpadl.pages - downstream_offset < 2:
            raise VmbusProtocolError(f"channel {self.relid}: downstream offset {downstream_offset} splits a "
                                     f"{gpadl.pages}-page GPADL into unusable rings")
        self.incoming = IncomingRing(GpadlRingMem(self.memory, gpadl.pfns[:downstream_offset]))
        self.outgoing = OutgoingRing(GpadlRingMem(self.memory, gpadl.pfns[downstream_offset:]))
        self.ring_gpadl, self.downstream_offset = gpadl, downstream_offset
        self.ring_pages = frozenset(gpadl.pfns)
        self.target_vp = target_vp
        self.state = ChannelState.OPEN
        self.synic.register_event_port(self.connection_id, self._signalled)

    def _signalled(self) -> None:
        self._doorbell(self)

    def retarget(self, target_vp: int) -> None:
        """MODIFYCHANNEL: interrupts go to ``target_vp`` from now on.  One is sent there at
        once when the guest has packets waiting, so none is lost to the move (the guest's
        old VP may have taken the last interrupt before it switched, or never got it)."""
        self.target_vp = target_vp
        if self.outgoing is not None and self.outgoing.used():
            self.signal_guest()

    def close(self) -> None:
        if self.state is ChannelState.OPEN:
            self.synic.unregister_event_port(self.connection_id)
            try:
                self.provider.on_close(self)
            finally:
                self.state = ChannelState.OFFERED
                self.incoming = self.outgoing = None
                self.ring_gpadl, self.downstream_offset = None, 0
                self.ring_pages = frozenset()
                self._backlog.clear()

    # ---- data path
    def send(self, packet: bytes) -> None:
        """Queue a packet to the guest and ring its doorbell if needed; with the ring
        full it waits in the backlog (a guest that lets the backlog fill loses the channel)."""
        if self.outgoing is None:
            raise VmbusProtocolError(f"channel {self.relid} is not open")
        if self._backlog or not self._write(packet):
            if len(self._backlog) >= BACKLOG_LIMIT:
                log.warning("channel %d (%s): the guest does not read its ring; closing it", self.relid, self.provider.name)
                self.protocol_errors += 1
                self.close()
                return
            self._backlog.append(packet)
            self._ask_for_room()

    def has_room(self, size: int) -> bool:
        """A ``size``-byte packet would go into the ring now (a device that drops rather
        than queues, as a NIC receiving frames, asks first)."""
        return self.outgoing is not None and not self._backlog and self.outgoing.free() >= size + TRAILER

    def _write(self, packet: bytes) -> bool:
        assert self.outgoing is not None
        try:
            if self.outgoing.write(packet):
                if self._owed is None:
                    self.signal_guest()
                else:
                    self._owed = True
        except RingFull:
            return False
        self.packets_out += 1
        return True

    def _ask_for_room(self) -> None:
        """Publish the first waiting packet's size as pending-send-size; the guest signals
        once that much is free (True from wait_for_space: it already is)."""
        assert self.outgoing is not None
        if self.outgoing.wait_for_space(len(self._backlog[0]) + TRAILER):
            self.defer(self)

    def _flush_backlog(self) -> bool:
        """Send what waits, in order; True when nothing is left waiting."""
        while self._backlog and self.outgoing is not None:
            if not self._write(self._backlog[0]):
                self._ask_for_room()
                return False
            self._backlog.popleft()
            if not self._backlog and self.outgoing is not None:
                self.outgoing.wait_for_space(0)   # withdraw the pending-send-size: nothing waits now
        return True

    def send_inband(self, payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> None:
        self.send(packets.inband(payload, transaction_id, completion_requested))

    def send_completion(self, transaction_id: int, payload: bytes) -> None:
        self.send(packets.completion(transaction_id, payload))

    def signal_guest(self) -> None:
        if self.target_vp != NO_INTERRUPT:
            self.synic.signal_event(self.target_vp, self.sint, self.relid)

    def on_doorbell(self) -> None:
        """The guest signalled: send what waited for room, then drain its ring (at most a
        budget; the rest is deferred).  A corrupt ring closes the channel.  With the
        server's lock held (from its doorbell hook or its drain worker)."""
        if self.incoming is None:
            return
        self._owed = False
        try:
            self._drain()
        except (VmbusProtocolError, struct.error, ValueError, IndexError) as exc:
            # Anything a guest can make a provider trip over is a protocol error.
            self.protocol_errors += 1
            log.warning("channel %d (%s): %s; closing it", self.relid, self.provider.name, exc)
            self.close()
        finally:
            owed, self._owed = self._owed, None
            if owed and self.state is ChannelState.OPEN:
                self.signal_guest()   # once for every completion and every freed-space wakeup of this drain

    def _drain(self) -> None:
        if not self._flush_backlog():
            return   # our replies wait: take no new requests until the guest reads them
        for _ in range(DRAIN_BUDGET):
            if self.incoming is None or self._backlog:
                return
            item = self.incoming.read()
            if item is None:
                return
            raw, signal = item
            if signal:
                self._owed = True   # the guest waits for the room this read made
            self.packets_in += 1
            self.provider.on_packet(self, packets.parse(raw))
        self.defer(self)   # budget spent: more may be waiting

    # ---- snapshots
    def save(self) -> ChannelSavedState:
        return ChannelSavedState(self.relid, self.provider.name, self.state.value, self.target_vp,
                                 self.ring_gpadl.gpadl_id if self.ring_gpadl is not None else None, self.downstream_offset,
                                 self.packets_in, self.packets_out, self.protocol_errors, tuple(self._backlog))

    def restore(self, saved: ChannelSavedState, gpadls: dict[int, Gpadl], target_vp_exists: Callable[[int], bool]) -> None:
        """Take a saved state (the channel is offered and closed now); VmbusProtocolError
        when it does not fit this channel or the connection's GPADLs."""
        if saved.relid != self.relid or saved.device != self.provider.name:
            raise VmbusProtocolError(f"channel {saved.relid} ({saved.device}) is channel {self.relid} ({self.provider.name}) here")
        try:
            state = ChannelState(saved.state)
        except ValueError:
            raise VmbusProtocolError(f"channel {self.relid}: unknown state {saved.state!r}") from None
        if len(saved.backlog) > BACKLOG_LIMIT or any(len(p) % 8 or not p for p in saved.backlog) or \
                (saved.backlog and state is not ChannelState.OPEN):
            raise VmbusProtocolError(f"channel {self.relid}: a backlog of {len(saved.backlog)} packets is not valid")
        if state is ChannelState.OPEN:
            gpadl = gpadls.get(saved.ring_gpadl) if saved.ring_gpadl is not None else None
            if gpadl is None or gpadl.relid != self.relid:
                raise VmbusProtocolError(f"channel {self.relid}: its ring GPADL {saved.ring_gpadl} is not one of its GPADLs")
            if saved.target_vp != NO_INTERRUPT and not target_vp_exists(saved.target_vp):
                raise VmbusProtocolError(f"channel {self.relid}: target VP {saved.target_vp} does not exist")
            self._attach(gpadl, saved.downstream_offset, saved.target_vp)
            self._backlog.extend(saved.backlog)
        elif saved.ring_gpadl is not None:
            raise VmbusProtocolError(f"channel {self.relid} is {state.value} but has a ring GPADL")
        self.state = state
        self.packets_in, self.packets_out, self.protocol_errors = saved.packets_in, saved.packets_out, saved.protocol_errors

    def resignal(self) -> None:
        """After a restore: tell the guest to look at its ring and look at ours, since
        either side may have signalled into the pause and been lost."""
        if self.state is ChannelState.OPEN:
            self.signal_guest()
            self.on_doorbell()

    def describe(self) -> dict[str, object]:
        return {"relid": self.relid, "device": self.provider.name, "state": self.state.value,
                "packets_in": self.packets_in, "packets_out": self.packets_out, "protocol_errors": self.protocol_errors,
                "backlog": len(self._backlog)}

