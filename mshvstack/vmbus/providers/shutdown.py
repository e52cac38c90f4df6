"""Shutdown IC: ask the guest to power off (or restart / hibernate) gracefully."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mshvstack.abi import lib
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.providers.ic import IcMessage, IcProvider, IcState

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel


MESSAGE = Layout("struct shutdown_msg_data", "reason_code", "timeout_seconds", "flags")   # and no display message


@dataclass(frozen=True)
class ShutdownState:
    VERSION: ClassVar[int] = 1
    ic: IcState
    result: int | None


class Shutdown(IcProvider):
    name = "shutdown"
    class_id = uuid.UUID("0e0b6031-5213-4934-818b-38d90ced39db")
    instance_id = uuid.UUID("b6650ff7-33bc-4840-8048-e0676786f393")
    msgtype = int(lib.ICMSGTYPE_SHUTDOWN)
    versions = ((1, 0), (3, 0), (3, 1), (3, 2))
    state_type: ClassVar[type] = ShutdownState

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.result: int | None = None

    def request(self, force: bool = False, restart: bool = False, hibernate: bool = False) -> None:
        """Send the request; the guest's status arrives in ``result`` (0 = accepted)."""
        flags = (lib.IC_SHUTDOWN_FLAG_FORCE if force else 0) | (lib.IC_SHUTDOWN_FLAG_RESTART if restart else 0) \
            | (lib.IC_SHUTDOWN_FLAG_HIBERNATE if hibernate else 0)
        self.result = None
        self.send_request(MESSAGE.pack(lib.IC_SHUTDOWN_REASON_PLANNED, 0, flags))

    def save(self) -> ShutdownState:
        return ShutdownState(self.save_ic(), self.result)

    def restore(self, state: ShutdownState, channel: Channel | None) -> None:
        self.restore_ic(state.ic, channel)
        self.result = state.result

    def on_response(self, message: IcMessage) -> None:
        self.result = message.status

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "last_result": self.result}
