"""Time-sync IC: host wall-clock samples (100 ns since 1601) for the guest."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mshvstack.abi import lib
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.providers.ic import IcMessage, IcProvider, IcState

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel

WINDOWS_EPOCH_OFFSET = int(lib.IC_WLTIMEDELTA)
SAMPLE = Layout("struct ictimesync_data", "parenttime", "flags")                                  # versions 1 and 3
SAMPLE_WITH_REFERENCE = Layout("struct ictimesync_ref_data", "parenttime", "vmreferencetime", "flags")   # version 4


def host_time_100ns(clock: Callable[[], float] = time.time) -> int:
    return int(clock() * 10_000_000) + WINDOWS_EPOCH_OFFSET


@dataclass(frozen=True)
class TimeSyncState:
    VERSION: ClassVar[int] = 1
    ic: IcState
    samples_acknowledged: int


class TimeSync(IcProvider):
    name = "timesync"
    class_id = uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")
    instance_id = uuid.UUID("2dd1ce17-079e-403c-b352-a1921ee207ee")
    msgtype = int(lib.ICMSGTYPE_TIMESYNC)
    versions: tuple[tuple[int, int], ...] = ((1, 0), (3, 0), (4, 0))
    state_type: ClassVar[type] = TimeSyncState

    def __init__(self, reference_time: Callable[[], int] | None = None, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.reference_time = reference_time
        self.samples_acknowledged = 0
        if reference_time is None:
            self.versions = ((1, 0), (3, 0))  # without the guest's reference time, v4 samples are wrong

    def sample(self, sync: bool = False) -> None:
        """Send one time sample (SYNC steps the guest clock, SAMPLE only informs it)."""
        flags = int(lib.IC_TIMESYNC_FLAG_SYNC if sync else lib.IC_TIMESYNC_FLAG_SAMPLE)
        now = host_time_100ns()
        if self.version is not None and self.version >= (4, 0) and self.reference_time is not None:
            body = SAMPLE_WITH_REFERENCE.pack(now, self.reference_time(), flags)
        else:
            body = SAMPLE.pack(now, flags)
        self.send_request(body)

    def save(self) -> TimeSyncState:
        return TimeSyncState(self.save_ic(), self.samples_acknowledged)

    def restore(self, state: TimeSyncState, channel: Channel | None) -> None:
        self.restore_ic(state.ic, channel)
        self.samples_acknowledged = state.samples_acknowledged

    def on_negotiated(self) -> None:
        # Hyper-V steps the clock when the IC connects: the guest's wall clock ran on
        # its boot-time clocksource until now, which loses the ticks a slow boot misses.
        self.sample(sync=True)

    def on_response(self, message: IcMessage) -> None:
        self.samples_acknowledged += 1
