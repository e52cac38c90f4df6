"""Regression tests for the concurrency map (docs/concurrency.md): races and lock-order
problems found while writing it down, each provoked where it can be."""

from __future__ import annotations

import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mshvstack.abi import lib
from mshvstack.partition import Interrupted, Partition, Vp
from mshvstack.vmbus.packets import INBAND, Packet
from mshvstack.vmbus.providers.ic import RESPONSE, encode, negotiate_body
from mshvstack.vmbus.providers.timesync import TimeSync

from guests import assemble
from smpguest import CODE, DATA, lapic_partition, long_mode_vp, prepare


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


# ---- dirty-page tracking while the guest writes: the VMM's clear-and-protect against a VP's tracking fault
@pytest.fixture
def part() -> Iterator[Partition]:
    with lapic_partition() as part:
        yield part


BUFFER, PAGES = 0x100000, 32
PASSES = DATA


def _writer(out_dir: Path) -> bytes:
    """Write every page of the buffer, count the pass, forever (the test kicks the VPs out)."""
    image, _ = assemble(f"""
1:  mov ${BUFFER}, %rdi
    mov ${PAGES}, %ecx
2:  incq (%rdi, %rbx, 8)
    add $4096, %rdi
    dec %ecx
    jnz 2b
    lock incq {PASSES}
    jmp 1b
""", out_dir, origin=CODE)
    return image


@pytest.mark.parametrize("vcpus", [1, 2])
def test_every_page_written_after_a_clear_is_reported_dirty(part: Partition, tmp_path: Path, vcpus: int) -> None:
    """The VMM clears the dirty bits (write-protecting the pages again) while the VPs' writes
    fault on them and unprotect them.  A fault taken beside the clear of its page left the page
    recorded as protected but writable in the engine: its later writes were never reported (a
    live migration then copies a stale page).  Every page written after a clear must be dirty."""
    prepare(part, _writer(tmp_path), {})
    vps = [long_mode_vp(part, index) for index in range(vcpus)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(vp: Vp) -> None:
        try:
            while not stop.is_set():
                exit_ = vp.run()
                if not isinstance(exit_, Interrupted):
                    raise AssertionError(f"VP {vp.index}: unexpected exit {exit_}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    def passes() -> int:
        return int(struct.unpack("<Q", part.memory.read(PASSES, 8))[0])

    part.set_property(lib.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1)
    threads = [threading.Thread(target=run, args=(vp,), name=f"test-vp{vp.index}") for vp in vps]
    for thread in threads:
        thread.start()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # interleave the VMM's clear with the VPs' faults often
    try:
        part.dirty_pages(BUFFER, PAGES * 4096)   # clear: every page protected
        for round_ in range(60):
            seen = passes()
            deadline = time.monotonic() + 30
            while passes() < seen + 2 * vcpus:   # a whole pass after the clear, by some VP
                if errors:
                    raise errors[0]
                assert time.monotonic() < deadline, "the guest stopped writing"
                time.sleep(0.001)
            dirty = part.dirty_pages(BUFFER, PAGES * 4096)   # and clear again
            missing = sorted(set(range(BUFFER, BUFFER + PAGES * 4096, 4096)) - set(dirty))
            assert not missing, f"round {round_}: pages written but not reported dirty: {[hex(p) for p in missing]}"
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        for vp in vps:
            vp.kick()
        for thread in threads:
            thread.join(timeout=30)
    if errors:
        raise errors[0]


def test_no_page_the_vmm_writes_while_its_log_is_taken_is_lost() -> None:
    """The VMM's writes to guest RAM (storvsp's DMA, on a VP's thread) are logged for a migration,
    whose thread takes the log in passes.  An add to the set being taken was lost (about one page
    in 50,000 here), and so was a page recorded before its bytes were in."""
    from mshvstack.partition import Mshv

    size = 64 << 20
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with Mshv.open() as mshv, mshv.create_partition() as part:
            part.initialize()
            part.map_memory(gpa=0, size=size)
            memory = part.memory
            for _round in range(20):
                memory.log_writes(True)
                seen: set[int] = set()
                done = threading.Event()

                def take(seen: set[int], done: threading.Event) -> None:
                    while not done.is_set():
                        seen.update(memory.take_logged())   # what this pass would send

                taker = threading.Thread(target=take, args=(seen, done))
                taker.start()
                for gpa in range(0, size, 4096):
                    memory.write(gpa, b"x")
                done.set()
                taker.join()
                seen |= memory.take_logged()
                memory.log_writes(False)
                assert not set(range(0, size, 4096)) - seen, "pages written but never taken from the log"
    finally:
        sys.setswitchinterval(switch)
