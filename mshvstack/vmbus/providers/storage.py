"""storvsp: synthetic SCSI over VMBus, serving one disk image at LUN 0.

Every other path, target and LUN is absent, answered as a SCSI target answers
for a LUN it does not have (an INQUIRY with peripheral qualifier 3, an empty
REPORT LUNS): Linux's storvsc turns any failed INQUIRY into success, so an
error status there would make it attach a phantom disk with zeroed data.

The guest drives initialisation (protocol version, properties) and sends
EXECUTE_SRB requests; data moves through GPA-direct page lists that are
checked against guest RAM page by page, then straight between the image and
the guest's pages (preadv/pwritev over views of guest RAM; every DMA into the
guest reported through GuestMemory.wrote).  Rejected requests never touch the
image (writes are only issued after every check passed).  Writes reach the
image before their completion; FUA writes and SYNCHRONIZE CACHE are durable
(fdatasync/fsync) before theirs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.partition.fastdecode import array
from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.packets import GPA_DIRECT, INBAND, Packet
from mshvstack.vmbus.providers.scsi import (
    ASC_INVALID_FIELD,
    CHECK_CONDITION,
    GOOD,
    ILLEGAL_REQUEST,
    INQUIRY,
    READ_OPCODES,
    REPORT_LUNS,
    WRITE_OPCODES,
    DiskImage,
    Extent,
    ScsiResult,
    absent_lun,
    sense,
)
from mshvstack.vmbus.providers.scsi import MAX_TRANSFER as MAX_TRANSFER_BYTES

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel

log = logging.getLogger(__name__)
PACKET = ffi.sizeof("struct vstor_packet")
PAGE = 4096
ACCEPTED_VERSIONS = (int(lib.VSTOR_PROTOCOL_WIN8_1), int(lib.VSTOR_PROTOCOL_WIN8))
EXECUTE_SRB = int(lib.VSTOR_OPERATION_EXECUTE_SRB)
DATA_IN, DATA_OUT = int(lib.VMSCSI_DATA_IN), int(lib.VMSCSI_DATA_OUT)
SUCCESS_STATUS, INVALID_PARAMETER = int(lib.VSTOR_STATUS_SUCCESS), int(lib.VSTOR_STATUS_INVALID_PARAMETER)
# The request and the completion on the data path, one struct call each (offsets from the header).
_OPERATION = Layout("struct vstor_packet", "operation", prefix=4).struct
_SRB = Layout("struct vstor_packet", "operation", "vm_srb.length", "vm_srb.path_id", "vm_srb.target_id", "vm_srb.lun",
              "vm_srb.cdb_length", "vm_srb.data_in", "vm_srb.data_transfer_length")
_REPLY = Layout("struct vstor_packet", "operation", "status", "vm_srb.length", "vm_srb.srb_status", "vm_srb.scsi_status",
                "vm_srb.path_id", "vm_srb.target_id", "vm_srb.lun", "vm_srb.sense_info_length",
                "vm_srb.data_transfer_length")   # in offset order: pack is the struct's own
_CDB_OFFSET, _CDB_SIZE = array(ffi.typeof("struct vstor_packet"), ("vm_srb", "cdb")) or (0, 0)
_SENSE_OFFSET, _SENSE_SIZE = array(ffi.typeof("struct vstor_packet"), ("vm_srb", "sense_data")) or (0, 0)
COMPLETE_IO = int(lib.VSTOR_OPERATION_COMPLETE_IO)


def _srb_reply(address: tuple[int, int, int, int], status: int, srb_status: int, scsi_status: int, transferred: int,
               sense_data: bytes = b"") -> bytes:
    """A COMPLETE_IO for an SRB: the request's length and address echoed, its statuses, the
    bytes moved, and sense data (at most the SRB's sense buffer) when there is any."""
    srb_length, path_id, target_id, lun = address
    sense_data = sense_data[:_SENSE_SIZE]
    reply = _REPLY.pack(COMPLETE_IO, status, srb_length, srb_status, scsi_status, path_id, target_id, lun,
                        len(sense_data), transferred)
    if sense_data:
        reply = reply[:_SENSE_OFFSET] + sense_data + reply[_SENSE_OFFSET + len(sense_data):]
    return reply


@dataclass(frozen=True)
class StorageState:
    """The negotiated protocol and the counters; the instance id keeps the disk the
    guest knows even when the image comes from another path after a restore.  No
    request is ever in flight: each is done under the VMBus lock it arrives with."""

    VERSION: ClassVar[int] = 1
    instance_id: str
    version: int | None
    initialized: bool
    requests: int
    errors: int


class Storage:
    name = "storage"
    class_id = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
    pipe_mode = False
    state_type: ClassVar[type] = StorageState

    def __init__(self, disk: DiskImage, instance_id: uuid.UUID | None = None) -> None:
        self.disk = disk
        self.instance_id = instance_id or uuid.uuid5(uuid.NAMESPACE_URL, f"mshvstack-disk:{disk.path}")
        self.version: int | None = None
        self.initialized = False
        self.requests = 0
        self.errors = 0

    def on_open(self, channel: Channel) -> bool:
        self.version, self.initialized = None, False
        return True

    def on_opened(self, channel: Channel) -> None:
        pass  # the guest speaks first

    def on_close(self, channel: Channel) -> None:
        self.initialized = False

    def save(self) -> StorageState:
        self.disk.flush()   # the image is part of the machine's state: on disk before the snapshot is
        return StorageState(str(self.instance_id), self.version, self.initialized, self.requests, self.errors)

    def restore(self, state: StorageState, channel: Channel | None) -> None:
        if state.version is not None and state.version not in ACCEPTED_VERSIONS:
            raise VmbusProtocolError(f"storvsp: saved protocol version {state.version:#x} is not one we speak")
        try:
            self.instance_id = uuid.UUID(state.instance_id)
        except ValueError:
            raise VmbusProtocolError(f"storvsp: saved instance id {state.instance_id!r} is not a UUID") from None
        self.version, self.initialized = state.version, state.initialized and channel is not None
        self.requests, self.errors = state.requests, state.errors

    def on_packet(self, channel: Channel, packet: Packet) -> None:
        payload = packet.payload
        if packet.type not in (INBAND, GPA_DIRECT) or len(payload) < 12:
            raise VmbusProtocolError(f"storvsp: packet type {packet.type} with {len(payload)} bytes")
        if len(payload) < PACKET:
            payload = payload + bytes(PACKET - len(payload))   # the rest of the request reads as zeros
        self.requests += 1
        if _OPERATION.unpack_from(payload)[0] == EXECUTE_SRB:
            reply = self._execute(channel, packet, payload)   # the data path: no cffi objects
        else:
            reply = self._control(payload)
        if packet.completion_requested:
            channel.send_completion(packet.transaction_id, reply)

    def _control(self, payload: bytes) -> bytes:
        """Initialisation and resets: the rare requests, through the binding's struct."""
        request = ffi.new("struct vstor_packet *")
        ffi.memmove(request, payload, PACKET)
        reply = ffi.new("struct vstor_packet *")
        reply.operation = lib.VSTOR_OPERATION_COMPLETE_IO
        reply.status = lib.VSTOR_STATUS_SUCCESS
        operation = int(request.operation)
        if operation == lib.VSTOR_OPERATION_QUERY_PROTOCOL_VERSION:
            version = int(request.version.major_minor)
            if version in ACCEPTED_VERSIONS:
                self.version = version
                reply.version.major_minor = version
            else:
                reply.status = lib.VSTOR_STATUS_REVISION_MISMATCH
        elif operation == lib.VSTOR_OPERATION_QUERY_PROPERTIES:
            props = reply.storage_channel_properties
            props.max_channel_cnt, props.flags, props.max_transfer_bytes = 1, 0, MAX_TRANSFER_BYTES
        elif operation == lib.VSTOR_OPERATION_END_INITIALIZATION:
            self.initialized = True
        elif operation not in (lib.VSTOR_OPERATION_BEGIN_INITIALIZATION, lib.VSTOR_OPERATION_RESET_LUN,
                               lib.VSTOR_OPERATION_RESET_ADAPTER, lib.VSTOR_OPERATION_RESET_BUS):
            reply.status = lib.VSTOR_STATUS_INVALID_PARAMETER
        return bytes(ffi.buffer(reply))

    # ---- SCSI requests
    def _execute(self, channel: Channel, packet: Packet, payload: bytes) -> bytes:
        """One EXECUTE_SRB: the completion's payload.  READ and WRITE move data between the
        image and the guest's pages with no copy in between (preadv into them, pwritev from
        them); everything else goes through ``DiskImage.execute``."""
        _op, srb_length, path_id, target_id, lun, cdb_length, direction, length = _SRB.unpack(payload)
        cdb = payload[_CDB_OFFSET : _CDB_OFFSET + min(cdb_length, _CDB_SIZE)]
        address = (srb_length, path_id, target_id, lun)
        if path_id or target_id or lun:
            if cdb[:1] not in (INQUIRY, REPORT_LUNS):
                self.errors += 1
                return _srb_reply(address, SUCCESS_STATUS, lib.SRB_STATUS_INVALID_LUN, 0, 0)
            return self._generic(channel, packet, address, cdb, length, direction, present=False)
        opcode = cdb[0] if cdb else -1
        if (opcode in READ_OPCODES and direction == DATA_IN) or (opcode in WRITE_OPCODES and direction == DATA_OUT):
            return self._transfer(channel, packet, address, cdb, length, direction == DATA_IN)
        return self._generic(channel, packet, address, cdb, length, direction, present=True)

    def _transfer(self, channel: Channel, packet: Packet, address: tuple[int, int, int, int], cdb: bytes,
                  length: int, data_in: bool) -> bytes:
        extent = self.disk.extent(cdb)
        if isinstance(extent, ScsiResult):
            return self._failed(address, extent)
        # A READ moves at most the initiator's buffer; a WRITE needs every block from it.
        moved = min(length, extent.length) if data_in else extent.length
        if not data_in and length < extent.length:
            return self._failed(address, ScsiResult(CHECK_CONDITION, b"", sense(ILLEGAL_REQUEST, ASC_INVALID_FIELD)))
        try:
            result = self._move(channel, packet, extent, length, moved, data_in) if moved else ScsiResult(GOOD)
        except VmbusProtocolError as exc:
            return self._refused(address, exc)
        except GuestMemoryError as exc:   # the RAM went away under the request (an unmap meanwhile)
            return self._refused(address, VmbusProtocolError(str(exc)))
        if not result.ok:
            return self._failed(address, result)
        return _srb_reply(address, SUCCESS_STATUS, lib.SRB_STATUS_SUCCESS, GOOD, moved)

    def _move(self, channel: Channel, packet: Packet, extent: Extent, length: int, moved: int, data_in: bool) -> ScsiResult:
        """The data of a READ or WRITE: through one view for one page, in one call where the
        pages lie in one region (the usual case), else through views of each region's part."""
        memory = channel.memory
        pfns, first_offset = self._frames(channel, packet, length, moved)
        if len(pfns) == 1:   # one page (a 4 KiB request): one view costs less than setting up the call
            gpa = pfns[0] * PAGE + first_offset
            pieces = [(gpa, memory.view(gpa, moved))]
        else:
            direct = self.disk.dma(memory, extent.offset, pfns, first_offset, moved, not data_in, extent.fua)
            if direct is not None:
                return direct
            pieces = self._views(memory, pfns, first_offset, moved)
        if not data_in:
            return self.disk.write_from(extent.offset, [view for _gpa, view in pieces], extent.fua)
        try:
            return self.disk.read_into(extent.offset, [view for _gpa, view in pieces])
        finally:   # even after a failed read: bytes may have landed
            memory.wrote_ranges([(gpa, len(view)) for gpa, view in pieces])   # the engines and the dirty log hear of the DMA

    def _generic(self, channel: Channel, packet: Packet, address: tuple[int, int, int, int], cdb: bytes,
                 length: int, direction: int, present: bool) -> bytes:
        memory = channel.memory
        try:
            pieces = self._buffer(channel, packet, length, length) if direction != lib.VMSCSI_NO_DATA and length else None
        except VmbusProtocolError as exc:
            return self._refused(address, exc)
        try:
            data_out = b"".join(view for _gpa, view in pieces) if pieces and direction == DATA_OUT else b""
            allocation = length if direction == DATA_IN else 0
            result: ScsiResult = self.disk.execute(cdb, data_out, allocation) if present else absent_lun(cdb, allocation)
            if not result.ok:
                return self._failed(address, result)
            transferred = 0
            if pieces and direction == DATA_IN:
                transferred = self._scatter(memory, pieces, result.data)
            elif direction == DATA_OUT:
                transferred = len(data_out)
        except GuestMemoryError as exc:   # the RAM went away under the request (an unmap meanwhile)
            return self._refused(address, VmbusProtocolError(str(exc)))
        return _srb_reply(address, SUCCESS_STATUS, lib.SRB_STATUS_SUCCESS, result.status, transferred)

    def _refused(self, address: tuple[int, int, int, int], exc: VmbusProtocolError) -> bytes:
        log.warning("storvsp: %s", str(exc))   # the text: the exception's frames may hold views of guest RAM
        self.errors += 1
        return _srb_reply(address, INVALID_PARAMETER, lib.SRB_STATUS_INVALID_REQUEST, 0, 0)

    def _failed(self, address: tuple[int, int, int, int], result: ScsiResult) -> bytes:
        self.errors += 1
        return _srb_reply(address, SUCCESS_STATUS, lib.SRB_STATUS_ERROR | lib.SRB_STATUS_AUTOSENSE_VALID,
                          result.status, 0, result.sense)

    def _buffer(self, channel: Channel, packet: Packet, length: int, moved: int) -> list[tuple[int, memoryview]]:
        """The first ``moved`` bytes of the guest's ``length``-byte buffer as (gpa, view of
        guest RAM) pieces, consecutive pages joined, each inside one memory region; every
        page checked against RAM and against the channel's own rings (DMA there would
        rewrite the ring indices).  Views, not ``GuestMemory.write``: whoever writes through
        them calls ``GuestMemory.wrote``."""
        pfns, offset = self._frames(channel, packet, length, moved)
        return self._views(channel.memory, pfns, offset, moved)

    @staticmethod
    def _views(memory: GuestMemory, pfns: tuple[int, ...], offset: int, moved: int) -> list[tuple[int, memoryview]]:
        """``_buffer`` for frames ``_frames`` already checked."""
        pages = len(pfns)
        if not moved:
            return []
        memory_regions = memory.regions
        # Runs of consecutive page numbers, each one piece: whole pages, then the first one starts
        # at the range's offset and the last one ends with the transfer.
        starts = [0, *[i for i in range(1, pages) if pfns[i] != pfns[i - 1] + 1]]
        runs = [[pfns[first] * PAGE, (stop - first) * PAGE] for first, stop in zip(starts, [*starts[1:], pages])]
        runs[0][0] += offset
        runs[0][1] -= offset
        runs[-1][1] -= pages * PAGE - (offset + moved)
        # Every check before any view exists (an exception's frames would keep the views, and the RAM, pinned).
        spans: list[tuple[int, int, int]] = []   # (gpa, size, region index): a run split where regions meet
        for gpa, size in runs:
            while size:
                where = next((i for i, r in enumerate(memory_regions) if r.gpa <= gpa < r.end), None)
                if where is None:
                    raise VmbusProtocolError(f"buffer page {gpa // PAGE:#x} is not guest RAM")
                n = min(size, memory_regions[where].end - gpa)
                spans.append((gpa, n, where))
                gpa, size = gpa + n, size - n
        hosts = [(memoryview(region.host), region.gpa) for region in memory_regions]
        return [(gpa, hosts[index][0][gpa - hosts[index][1] : gpa - hosts[index][1] + n]) for gpa, n, index in spans]

    @staticmethod
    def _frames(channel: Channel, packet: Packet, length: int, moved: int) -> tuple[tuple[int, ...], int]:
        """The frames of the first ``moved`` bytes of the guest's ``length``-byte buffer and the
        offset into the first; the buffer checked against the packet's one GPA-direct range and
        against the channel's own rings (DMA there would rewrite the ring indices)."""
        if packet.type != GPA_DIRECT or len(packet.ranges) != 1:
            raise VmbusProtocolError("data transfer without exactly one GPA-direct range")
        gpa_range = packet.ranges[0]
        if length > gpa_range.byte_count or length > MAX_TRANSFER_BYTES:
            raise VmbusProtocolError(f"transfer of {length} bytes exceeds the {gpa_range.byte_count}-byte buffer")
        offset = gpa_range.byte_offset
        if offset >= PAGE:
            raise VmbusProtocolError(f"GPA range offset {offset:#x} lies past its first page")
        pages = (offset + moved + PAGE - 1) // PAGE if moved else 0   # (moving nothing names no page)
        pfns = tuple(gpa_range.pfns[:pages])
        if len(pfns) < pages:
            raise VmbusProtocolError("GPA range shorter than the transfer")
        if not channel.ring_pages.isdisjoint(pfns):
            ring_pfn = next(pfn for pfn in pfns if pfn in channel.ring_pages)
            raise VmbusProtocolError(f"buffer page {ring_pfn:#x} is one of the channel's ring pages")
        return pfns, offset

    @staticmethod
    def _scatter(memory: GuestMemory, pieces: list[tuple[int, memoryview]], data: bytes) -> int:
        done = 0
        source = memoryview(data)
        for gpa, view in pieces:
            chunk = source[done : done + len(view)]
            if not chunk:
                break
            memory.write(gpa, chunk)
            done += len(chunk)
        return done

    def describe(self) -> dict[str, object]:
        return {"image": str(self.disk.path), "read_only": self.disk.read_only, "blocks": self.disk.blocks,
                "requests": self.requests, "errors": self.errors, "flushes": self.disk.flushes}

