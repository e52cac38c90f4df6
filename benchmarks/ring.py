"""VMBus ring throughput, against a plain memoryview copy of the same bytes
measured in the same run.

Large packets: each packet is written host->guest (OutgoingRing.write) and
read back out of the same ring (IncomingRing.read, the host's reader on the
guest's pages), against copying the same bytes into a memoryview and out
into a new bytes object.  Both copy each byte in once and out once: the
ring's read copies into the ring's reusable buffer and returns a view of it
(the caller copies what it keeps, as packets.parse does with the payload).  Small packets: each direction on its own, with a
guest side that costs next to nothing: for host->guest, the guest "drains"
by moving its read index up to the write index once per batch; for
guest->host, the ring holds a batch of packets written once, and the guest
"produces" it again by moving the read index back once per batch.  Only the
host's ring calls are counted as packets; the guest's index store is in the
time.

    python benchmarks/ring.py [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mshvstack.abi import ffi
from mshvstack.partition import Mshv
from mshvstack.vmbus import packets
from mshvstack.vmbus.gpadl import GpadlRingMem
from mshvstack.vmbus.ring import IncomingRing, OutgoingRing

RING_PAGES = 257  # control page + 1 MiB of data
BATCH = 64        # packets between two moves of the guest's index
LARGE, SMALL = 64 * 1024, 256
READ_INDEX = ffi.offsetof("struct vmbus_ring_control", "read_index")


@contextmanager
def ring_pages() -> Iterator[tuple[OutgoingRing, IncomingRing, GpadlRingMem]]:
    """One ring in a simulated partition's RAM: the host's writer and reader over it, and its memory."""
    with Mshv.open("sim") as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(0, 4 << 20)
        pfns = tuple(range(16, 16 + RING_PAGES))
        memory = GpadlRingMem(part.memory, pfns)
        writer, reader = OutgoingRing(memory), IncomingRing(GpadlRingMem(part.memory, pfns))
        writer.start()
        reader.start()
        yield writer, reader, memory


def timed(seconds: float, batch: Callable[[], int]) -> float:
    """Items per second of calling ``batch`` (it returns how many it did) for ``seconds``."""
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += batch()
    return done / (time.perf_counter() - start)


def round_trip_rate(payload: int, seconds: float) -> float:
    """MB/s of writing packets host->guest and reading each back out of the ring."""
    with ring_pages() as (writer, reader, _memory):
        packet = packets.inband(bytes(payload))
        write, read = writer.write, reader.read

        def batch() -> int:
            for _ in range(8):
                write(packet)
                read()
            return 8

        return timed(seconds, batch) * payload / 1e6


def write_rate(payload: int, seconds: float) -> float:
    """Packets/s of OutgoingRing.write; the guest drains by moving its read index."""
    with ring_pages() as (writer, _reader, memory):
        packet = packets.inband(bytes(payload))
        write, indices = writer.write, memory.read_control

        def batch() -> int:
            for _ in range(BATCH):
                write(packet)
            memory.write_control(READ_INDEX, indices(0))   # the guest read everything
            return BATCH

        return timed(seconds, batch)


def read_rate(payload: int, seconds: float) -> float:
    """Packets/s of IncomingRing.read; the guest produces by moving the read index back
    over the batch it wrote once."""
    with ring_pages() as (writer, reader, memory):
        packet = packets.inband(bytes(payload))
        for _ in range(BATCH):
            writer.write(packet)
        read = reader.read

        def batch() -> int:
            memory.write_control(READ_INDEX, 0)   # the same batch is there to read again
            for _ in range(BATCH):
                read()
            return BATCH

        return timed(seconds, batch)


def copy_rate(payload: int, seconds: float) -> float:
    """MB/s of copying the same payloads into and out of a memoryview."""
    target = memoryview(bytearray(1 << 20))
    data = bytes(payload)
    copied = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(64):
            offset = (copied * payload) % ((1 << 20) - payload)
            target[offset : offset + payload] = data
            bytes(target[offset : offset + payload])
            copied += 1
    return copied * payload / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.25, help="per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    # Ring and baseline take turns and each keeps its best round, so a slow
    # spell of this (shared, virtual) machine falls on both alike.
    ring = base = writes = reads = small_base = 0.0
    for _ in range(args.rounds):
        ring = max(ring, round_trip_rate(LARGE, args.seconds))
        base = max(base, copy_rate(LARGE, args.seconds))
        writes = max(writes, write_rate(SMALL, args.seconds))
        reads = max(reads, read_rate(SMALL, args.seconds))
        small_base = max(small_base, copy_rate(SMALL, args.seconds))
    print(f"{LARGE:>6}-byte packets, write then read each (the read returns a view of the ring's buffer): "
          f"ring {ring:8.1f} MB/s; memoryview copy in and out {base:8.1f} MB/s; ratio {ring / base:.3f}")
    print(f"{SMALL:>6}-byte packets, host->guest (OutgoingRing.write; guest drains by an index store per {BATCH}): "
          f"{writes:9,.0f} packets/s")
    print(f"{SMALL:>6}-byte packets, guest->host (IncomingRing.read; guest refills by an index store per {BATCH}): "
          f"{reads:9,.0f} packets/s")
    print(f"{SMALL:>6}-byte memoryview copy in and out: {small_base * 1e6 / SMALL:9,.0f} copies/s (for scale)")
    print(f"(the best of {args.rounds} interleaved rounds of {args.seconds:g} s each)")


if __name__ == "__main__":
    main()
