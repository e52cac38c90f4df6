"""storvsp's host cost per request, without a guest: what the provider itself adds to
each disk request (the SRB read, the buffer's pages checked, the data moved between
the image and guest RAM, the completion built), measured on the simulator's guest
memory so every DMA into the guest is reported as the machine reports it.

The guest's side (its driver, the ring, the doorbell and the interrupt) is what
benchmarks/linux_disk.py measures; this isolates the provider's share of it.

    python benchmarks/storvsp.py
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

from mshvstack.abi import ffi, lib
from mshvstack.partition import Mshv, PartitionConfig
from mshvstack.partition.memory import GuestMemory
from mshvstack.vmbus import packets
from mshvstack.vmbus.providers.scsi import DiskImage
from mshvstack.vmbus.providers.storage import Storage

PAGE = 4096
IMAGE_MIB = 64


class Channel:
    """What the provider uses of a channel: guest memory, the ring pages, completions."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.ring_pages: frozenset[int] = frozenset()
        self.completions = 0

    def send_completion(self, transaction_id: int, payload: bytes) -> None:
        status = ffi.from_buffer("struct vstor_packet *", bytearray(payload)).vm_srb.srb_status
        if status != lib.SRB_STATUS_SUCCESS:
            raise RuntimeError(f"request failed: SRB status {status:#x}")
        self.completions += 1


def _request(cdb: bytes, length: int, data_in: bool, pfns: list[int]) -> packets.Packet:
    request = ffi.new("struct vstor_packet *")
    request.operation, request.flags = lib.VSTOR_OPERATION_EXECUTE_SRB, 1
    srb = request.vm_srb
    srb.length, srb.cdb_length, srb.sense_info_length = ffi.sizeof("struct vmscsi_request"), len(cdb), 20
    srb.data_in = lib.VMSCSI_DATA_IN if data_in else lib.VMSCSI_DATA_OUT
    srb.data_transfer_length = length
    ffi.memmove(srb.cdb, cdb, len(cdb))
    ranges = packets.GPA_RANGE.pack(length, 0) + struct.pack(f"<{len(pfns)}Q", *pfns)
    header = packets.GPA_DIRECT_HEADER.size + len(ranges)
    body = bytes(ffi.buffer(request))
    head = bytearray(packets.GPA_DIRECT_HEADER.pack(1))   # one range; the descriptor at its start
    head[: packets.DESCRIPTOR_SIZE] = packets.DESCRIPTOR.pack(packets.GPA_DIRECT, header // 8, (header + len(body)) // 8,
                                                              packets.COMPLETION_REQUESTED, 7)
    raw = bytes(head) + ranges + body
    return packets.parse(raw)


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        image = Path(work) / "disk.img"
        image.write_bytes(os.urandom(IMAGE_MIB << 20))
        mshv = Mshv.open("sim")
        partition = mshv.create_partition(PartitionConfig())
        partition.initialize()
        partition.map_memory(0, 64 << 20)
        partition.create_vp(0)
        disk = DiskImage(image)
        storage = Storage(disk)
        channel = Channel(partition.memory)
        scattered = [0x1000 + 2 * i for i in range(256)]   # every other page: 256 pieces
        contiguous = [0x1000 + i for i in range(256)]
        cases = [("read 4 KiB", 8, True, [0x1000], 4000), ("write 4 KiB", 8, False, [0x1000], 4000),
                 ("read 1 MiB, 256 pages apart", 2048, True, scattered, 200),
                 ("write 1 MiB, 256 pages apart", 2048, False, scattered, 200),
                 ("read 1 MiB, contiguous", 2048, True, contiguous, 200),
                 ("write 1 MiB, contiguous", 2048, False, contiguous, 200)]
        print(f"{'request':32} {'µs each':>9} {'MB/s':>9}")
        try:
            for name, blocks, data_in, pfns, count in cases:
                opcode = 0x28 if data_in else 0x2A
                packet = _request(bytes([opcode, 0]) + struct.pack(">IxH", 16, blocks) + bytes(1), blocks * 512, data_in, pfns)
                for _ in range(count // 10):
                    storage.on_packet(channel, packet)   # type: ignore[arg-type]
                started = time.perf_counter()
                for _ in range(count):
                    storage.on_packet(channel, packet)   # type: ignore[arg-type]
                each = (time.perf_counter() - started) / count
                print(f"{name:32} {each * 1e6:9.1f} {blocks * 512 / each / 1e6:9.0f}")
        finally:
            disk.close()
            partition.close()
            mshv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
