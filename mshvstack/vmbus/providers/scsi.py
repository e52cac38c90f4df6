"""A SCSI disk over a raw image file: the command set Linux's sd driver uses.

Pure logic: commands come in as CDB bytes plus a data-out buffer and go
out as status, sense and data-in bytes; the storvsp provider moves the data
to and from guest memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mshvstack.errors import MshvError

if TYPE_CHECKING:
    from mshvstack.partition.memory import GuestMemory

BLOCK = 512
GOOD, CHECK_CONDITION = 0x00, 0x02
# Sense keys / additional sense codes
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT = 0x0, 0x2, 0x3, 0x5, 0x7
ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_INVALID_FIELD, ASC_WRITE_PROTECTED = 0x20, 0x21, 0x24, 0x27
ASC_WRITE_ERROR, ASC_READ_ERROR = 0x0C, 0x11
MAX_TRANSFER = 1 << 20
INQUIRY, REPORT_LUNS = b"\x12", b"\xa0"
# INQUIRY byte 0 for "no device at this LUN": peripheral qualifier 3, device type 0x1F.
NO_DEVICE = 0x7F
READ_OPCODES, WRITE_OPCODES = frozenset((0x28, 0x88)), frozenset((0x2A, 0x8A))
FUA = 0x08   # CDB byte 1 of READ/WRITE(10/16): force unit access (the write is durable before GOOD)
IOV_BATCH = 512   # buffers per preadv/pwritev call (IOV_MAX is 1024 on Linux)


class Extent(NamedTuple):
    """Where a READ or WRITE (10/16) goes in the image: a byte offset and count, and FUA."""

    offset: int
    length: int
    fua: bool


@dataclass(frozen=True)
class ScsiResult:
    status: int
    data: bytes = b""
    sense: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == GOOD


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    """Fixed-format sense data (18 bytes)."""
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


def _after(buffers: list[memoryview], done: int) -> list[memoryview]:
    """What is left of ``buffers`` after their first ``done`` bytes."""
    first = 0
    while first < len(buffers) and done >= len(buffers[first]):
        done -= len(buffers[first])
        first += 1
    rest = buffers[first:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest


def _check(key: int, asc: int) -> ScsiResult:
    return ScsiResult(CHECK_CONDITION, b"", sense(key, asc))


def absent_lun(cdb: bytes, allocation: int) -> ScsiResult:
    """What a target answers for a LUN it does not have (SPC-4 6.6.2, 6.33)."""
    if cdb[:1] == INQUIRY and len(cdb) >= 6 and not cdb[1] & 1:
        return ScsiResult(GOOD, (bytes([NO_DEVICE, 0, 5, 2, 31]) + bytes(31))[:allocation])
    if cdb[:1] == REPORT_LUNS and len(cdb) >= 12:
        return ScsiResult(GOOD, bytes(8)[:allocation])   # a LUN list of length 0
    return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)


class DiskError(MshvError):
    """A disk image cannot be opened as asked."""


class DiskImage:
    """A raw image as a LUN; read-only images refuse writes (DATA PROTECT)."""

    def __init__(self, path: Path, read_only: bool = False, serial: str = "MSHVSTACK0001") -> None:
        self.path = path
        self.read_only = read_only
        self.serial = serial
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as exc:
            hint = " (add ,ro to attach it read-only)" if isinstance(exc, PermissionError) and not read_only else ""
            raise DiskError(f"disk image {str(path)!r}: {exc.strerror}{hint}") from None
        self.size = os.fstat(self.fd).st_size
        if self.size < BLOCK:
            os.close(self.fd)
            raise DiskError(f"disk image {str(path)!r} is smaller than one {BLOCK}-byte block")
        self.blocks = self.size // BLOCK
        self.flushes = 0

    def close(self) -> None:
        os.close(self.fd)

    def flush(self) -> None:
        """Everything written so far on stable storage (a snapshot's disk is its image)."""
        if not self.read_only:
            os.fsync(self.fd)

    def extent(self, cdb: bytes) -> Extent | ScsiResult:
        """A READ or WRITE (10/16): where it goes, or the CHECK CONDITION it gets (out of range,
        too long, a write to a read-only image), before any data moves.  Other opcodes:
        INVALID OPCODE (they go through ``execute``)."""
        opcode = cdb[0] if cdb else -1
        write = opcode in WRITE_OPCODES
        if not write and opcode not in READ_OPCODES:
            return _check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        if len(cdb) < _CDB_LENGTH[opcode]:
            return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        if write and self.read_only:
            return _check(DATA_PROTECT, ASC_WRITE_PROTECTED)
        lba, count = self._lba(cdb)
        if lba + count > self.blocks or count * BLOCK > MAX_TRANSFER:
            return _check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        return Extent(lba * BLOCK, count * BLOCK, bool(cdb[1] & FUA))

    def dma(self, memory: GuestMemory, offset: int, pfns: Sequence[int], first_offset: int, length: int,
            to_disk: bool, fua: bool = False) -> ScsiResult | None:
        """Move ``length`` bytes between the image at ``offset`` and the guest buffer
        ``first_offset`` bytes into frame ``pfns[0]``, in one call with no copy in between
        (``GuestMemory.file_io``); None when the frames are not all in one region (nothing
        moved: use ``read_into``/``write_from`` over views).  A write is durable before GOOD
        with ``fua``."""
        if to_disk and self.read_only:
            return _check(DATA_PROTECT, ASC_WRITE_PROTECTED)
        try:
            if not memory.file_io(self.fd, offset, pfns, first_offset, length, to_file=to_disk):
                return None
            if to_disk and fua:
                os.fdatasync(self.fd)
        except OSError:
            return _check(MEDIUM_ERROR, ASC_WRITE_ERROR if to_disk else ASC_READ_ERROR)
        return ScsiResult(GOOD)

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> ScsiResult:
        """Fill ``buffers`` (writable, in order) from the image at ``offset``, with no copy in
        between (preadv); past the end of a file that shrank under us: zeros."""
        try:
            for start in range(0, len(buffers), IOV_BATCH):
                batch = buffers[start : start + IOV_BATCH]
                wanted = sum(map(len, batch))
                done = os.preadv(self.fd, batch, offset)
                while done < wanted:   # short: the rest one buffer at a time (EOF gives 0)
                    got = self._read_rest(batch, done, offset + done)
                    if got == 0:
                        self._zero_rest(batch, done)
                        break
                    done += got
                offset += wanted
        except OSError:
            return _check(MEDIUM_ERROR, ASC_READ_ERROR)
        return ScsiResult(GOOD)

    def _read_rest(self, batch: Sequence[memoryview], done: int, offset: int) -> int:
        for buffer in batch:
            if done < len(buffer):
                return os.preadv(self.fd, [buffer[done:]], offset)
            done -= len(buffer)
        return 0

    @staticmethod
    def _zero_rest(batch: Sequence[memoryview], done: int) -> None:
        for buffer in batch:
            if done < len(buffer):
                buffer[done:] = bytes(len(buffer) - done)
                done = 0
            else:
                done -= len(buffer)

    def write_from(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> ScsiResult:
        """Write ``buffers`` (in order) to the image at ``offset`` with no copy in between
        (pwritev); with ``fua`` durable (fdatasync) before GOOD, as SBC asks."""
        if self.read_only:
            return _check(DATA_PROTECT, ASC_WRITE_PROTECTED)
        try:
            for start in range(0, len(buffers), IOV_BATCH):
                batch = list(buffers[start : start + IOV_BATCH])
                remaining = sum(map(len, batch))
                while remaining:
                    done = os.pwritev(self.fd, batch, offset)
                    if done <= 0:
                        raise OSError("pwritev wrote nothing")
                    offset, remaining = offset + done, remaining - done
                    if remaining:   # short: the rest again
                        batch = _after(batch, done)
            if fua:
                os.fdatasync(self.fd)
        except OSError:
            return _check(MEDIUM_ERROR, ASC_WRITE_ERROR)
        return ScsiResult(GOOD)

    def execute(self, cdb: bytes, data_out: bytes, allocation: int) -> ScsiResult:
        """Run one command; ``allocation`` is the initiator's data-in buffer size."""
        if not cdb:
            return _check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        handler = _COMMANDS.get(cdb[0])
        if handler is None:
            return _check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        if len(cdb) < _CDB_LENGTH.get(cdb[0], 6):
            return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        result = handler(self, cdb, data_out)
        return ScsiResult(result.status, result.data[:allocation], result.sense)

    # ---- commands
    def _test_unit_ready(self, cdb: bytes, data: bytes) -> ScsiResult:
        return ScsiResult(GOOD)

    def _inquiry(self, cdb: bytes, data: bytes) -> ScsiResult:
        evpd, page = cdb[1] & 1, cdb[2]
        if not evpd:
            return ScsiResult(GOOD, bytes([0, 0, 5, 2, 31, 0, 0, 2]) + b"Msft    " + b"Virtual Disk    " + b"1.0 ")
        if page == 0x00:
            pages = bytes([0x00, 0x80, 0x83])
            return ScsiResult(GOOD, bytes([0, 0, 0, len(pages)]) + pages)
        if page == 0x80:
            serial = self.serial.encode()
            return ScsiResult(GOOD, bytes([0, 0x80, 0, len(serial)]) + serial)
        if page == 0x83:
            ident = b"MSHVSTK" + self.serial.encode()[:16]
            designator = bytes([0x02, 0x01, 0, len(ident)]) + ident  # ASCII, vendor-specific
            return ScsiResult(GOOD, bytes([0, 0x83, 0, len(designator)]) + designator)
        return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)

    def _read_capacity10(self, cdb: bytes, data: bytes) -> ScsiResult:
        last = min(self.blocks - 1, 0xFFFFFFFF)
        return ScsiResult(GOOD, struct.pack(">II", last, BLOCK))

    def _service_action_in(self, cdb: bytes, data: bytes) -> ScsiResult:
        if cdb[1] & 0x1F != 0x10:  # READ CAPACITY(16)
            return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        return ScsiResult(GOOD, struct.pack(">QI", self.blocks - 1, BLOCK) + bytes(20))

    def _report_luns(self, cdb: bytes, data: bytes) -> ScsiResult:
        return ScsiResult(GOOD, struct.pack(">II", 8, 0) + bytes(8))

    def _mode_sense(self, cdb: bytes, data: bytes) -> ScsiResult:
        wp = 0x80 if self.read_only else 0
        caching = bytes([0x08, 0x12, 0x04]) + bytes(17)  # caching page: write cache enabled
        page = cdb[2] & 0x3F
        pages = caching if page in (0x08, 0x3F) else b""
        if cdb[0] == 0x1A:
            return ScsiResult(GOOD, bytes([3 + len(pages), 0, wp, 0]) + pages)
        return ScsiResult(GOOD, struct.pack(">HBBHH", 6 + len(pages), 0, wp, 0, 0) + pages)

    def _lba(self, cdb: bytes) -> tuple[int, int]:
        if cdb[0] in (0x28, 0x2A):
            lba, count = struct.unpack_from(">IxH", cdb, 2)
        else:
            lba, count = struct.unpack_from(">QI", cdb, 2)
        return lba, count

    def _read(self, cdb: bytes, data: bytes) -> ScsiResult:
        lba, count = self._lba(cdb)
        if lba + count > self.blocks or count * BLOCK > MAX_TRANSFER:
            return _check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        buffer = bytearray(count * BLOCK)
        result = self.read_into(lba * BLOCK, [memoryview(buffer)])
        return ScsiResult(GOOD, bytes(buffer)) if result.ok else result

    def _write(self, cdb: bytes, data: bytes) -> ScsiResult:
        if self.read_only:
            return _check(DATA_PROTECT, ASC_WRITE_PROTECTED)
        lba, count = self._lba(cdb)
        if lba + count > self.blocks or count * BLOCK > MAX_TRANSFER:
            return _check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        if len(data) < count * BLOCK:
            return _check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        return self.write_from(lba * BLOCK, [memoryview(data)[: count * BLOCK]], bool(cdb[1] & FUA))

    def _synchronize_cache(self, cdb: bytes, data: bytes) -> ScsiResult:
        try:
            if not self.read_only:
                os.fsync(self.fd)
        except OSError:
            return _check(MEDIUM_ERROR, ASC_WRITE_ERROR)
        self.flushes += 1
        return ScsiResult(GOOD)

    def _request_sense(self, cdb: bytes, data: bytes) -> ScsiResult:
        return ScsiResult(GOOD, sense(NO_SENSE, 0))

    def _noop(self, cdb: bytes, data: bytes) -> ScsiResult:
        return ScsiResult(GOOD)


_COMMANDS = {
    0x00: DiskImage._test_unit_ready, 0x03: DiskImage._request_sense, 0x12: DiskImage._inquiry,
    0x1A: DiskImage._mode_sense, 0x5A: DiskImage._mode_sense, 0x25: DiskImage._read_capacity10,
    0x9E: DiskImage._service_action_in, 0xA0: DiskImage._report_luns, 0x28: DiskImage._read,
    0x88: DiskImage._read, 0x2A: DiskImage._write, 0x8A: DiskImage._write, 0x35: DiskImage._synchronize_cache,
    0x91: DiskImage._synchronize_cache, 0x1B: DiskImage._noop, 0x1E: DiskImage._noop,
}
_CDB_LENGTH = {0x25: 10, 0x28: 10, 0x2A: 10, 0x35: 10, 0x5A: 10, 0x88: 16, 0x8A: 16, 0x91: 16, 0x9E: 16, 0xA0: 12}
