"""Heartbeat IC: the host sends sequence numbers; the guest answers seq + 1."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mshvstack.abi import lib
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.providers.ic import IcMessage, IcProvider, IcState

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel


MESSAGE = Layout("struct heartbeat_msg_data", "seq_num")


@dataclass(frozen=True)
class HeartbeatState:
    VERSION: ClassVar[int] = 1
    ic: IcState
    sequence: int
    acknowledged: int | None


class Heartbeat(IcProvider):
    name = "heartbeat"
    class_id = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
    instance_id = uuid.UUID("d4c8c5a6-37b0-4ab0-9d9a-a6f3a0c4b6f1")
    msgtype = int(lib.ICMSGTYPE_HEARTBEAT)
    versions = ((1, 0), (3, 0))
    state_type: ClassVar[type] = HeartbeatState

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.sequence = 0
        self.acknowledged: int | None = None
        self.alive_since: float | None = None

    def beat(self) -> int:
        """Send the next sequence number; returns it."""
        self.sequence += 1
        self.send_request(MESSAGE.pack(self.sequence))
        return self.sequence

    def save(self) -> HeartbeatState:
        return HeartbeatState(self.save_ic(), self.sequence, self.acknowledged)

    def restore(self, state: HeartbeatState, channel: Channel | None) -> None:
        self.restore_ic(state.ic, channel)
        self.sequence, self.acknowledged = state.sequence, state.acknowledged

    def on_response(self, message: IcMessage) -> None:
        if len(message.body) < MESSAGE.size:
            raise VmbusProtocolError(f"heartbeat response of {len(message.body)} bytes is shorter than its {MESSAGE.size}")
        (seq,) = MESSAGE.unpack(message.body)
        if seq != self.sequence + 1:
            raise VmbusProtocolError(f"heartbeat answered {seq}, expected {self.sequence + 1}")
        self.acknowledged = seq
        if self.alive_since is None:
            self.alive_since = time.monotonic()

    def describe(self) -> dict[str, object]:
        alive = self.last_seen is not None and time.monotonic() - self.last_seen < 30
        return {**super().describe(), "sequence": self.sequence, "acknowledged": self.acknowledged, "guest_alive": alive}
