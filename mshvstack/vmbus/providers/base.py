"""The Provider interface every synthetic device implements."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mshvstack.vmbus.packets import Packet

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel


class Provider(Protocol):
    """A device behind one VMBus channel.

    ``class_id``/``instance_id`` go into the offer; ``pipe_mode`` offers a
    named-pipe channel (integration components).  The server calls on_open
    when the guest asks to open the channel (return False to fail the open),
    on_opened once the guest was told it is open (devices where the host
    speaks first start here), on_packet for every packet the guest sends and
    on_close when it closes.  Malformed guest input must raise
    VmbusProtocolError (the channel is then closed), nothing else.

    Its protocol state is one record (``state_type``): ``save`` gives it and
    ``restore`` takes it back into a provider whose channel was just restored
    (``channel`` when that is open); a record that does not fit raises
    VmbusProtocolError.

    Every callback runs with the VMBus server's lock held, on whichever thread
    brought the guest's message or doorbell; the host's own requests to a
    provider go through ``VmbusServer.call``, so a provider's state needs no
    lock of its own.  A provider that lets the host wait for the guest uses a
    lock or condition of its own, taken after the server's (ic.py).
    """

    name: str
    class_id: uuid.UUID
    instance_id: uuid.UUID
    pipe_mode: bool
    state_type: ClassVar[type]

    def on_open(self, channel: Channel) -> bool: ...
    def on_opened(self, channel: Channel) -> None: ...
    def on_packet(self, channel: Channel, packet: Packet) -> None: ...
    def on_close(self, channel: Channel) -> None: ...
    def save(self) -> Any: ...
    def restore(self, state: Any, channel: Channel | None) -> None: ...
