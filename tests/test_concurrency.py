"""Regression tests for the concurrency map (docs/concurrency.md): races and lock-order
problems found while writing it down, each provoked where it can be."""

from __future__ import annotations

import threading
from typing import Any

from mshvstack.abi import lib
from mshvstack.vmbus.packets import INBAND, Packet
from mshvstack.vmbus.providers.ic import RESPONSE, encode, negotiate_body
from mshvstack.vmbus.providers.timesync import TimeSync


class _ClosingChannel:
    """A channel whose send closes it, as a full backlog does (Channel.send -> close -> on_close)."""

    def __init__(self, provider: TimeSync) -> None:
        self.provider = provider
        self.sent = 0

    def send_inband(self, payload: bytes, transaction_id: int = 0, completion_requested: bool = False) -> None:
        self.sent += 1
        self.provider.on_close(self)   # type: ignore[arg-type]


def test_an_ic_hook_whose_send_closes_the_channel_does_not_deadlock() -> None:
    """TimeSync speaks first once negotiated; when that send closes the channel, on_close takes the
    IC's condition again.  The hooks therefore run without it (it is a plain lock now)."""
    provider = TimeSync()
    channel: Any = _ClosingChannel(provider)
    provider.on_open(channel)
    body = negotiate_body(((3, 0),), ((3, 0),))
    packet = Packet(INBAND, 0, False, encode(int(lib.ICMSGTYPE_NEGOTIATE), body, (3, 0), (3, 0), flags=RESPONSE))
    worker = threading.Thread(target=provider.on_packet, args=(channel, packet), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "on_packet deadlocked on the IC's condition"
    assert channel.sent == 1 and provider.version == (3, 0) and provider.channel is None
    assert not provider.wait_ready(0)   # closed: not ready, and the waiter is not stuck
