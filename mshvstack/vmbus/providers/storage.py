"""storvsp: synthetic SCSI over VMBus, serving one disk image at LUN 0.

Every other path, target and LUN is absent, answered as a SCSI target answers
for a LUN it does not have (an INQUIRY with peripheral qualifier 3, an empty
REPORT LUNS): Linux's storvsc turns any failed INQUIRY into success, so an
error status there would make it attach a phantom disk with zeroed data.

The guest drives initialisation (protocol version, properties) and sends
EXECUTE_SRB requests; data moves through GPA-direct page lists that are
checked against guest RAM page by page.  Rejected requests never touch the
image (writes are only issued after every check passed).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.packets import GPA_DIRECT, INBAND, Packet
from mshvstack.vmbus.providers.scsi import INQUIRY, REPORT_LUNS, DiskImage, ScsiResult, absent_lun
from mshvstack.vmbus.providers.scsi import MAX_TRANSFER as MAX_TRANSFER_BYTES

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel

log = logging.getLogger(__name__)
PACKET = ffi.sizeof("struct vstor_packet")
PAGE = 4096
ACCEPTED_VERSIONS = (int(lib.VSTOR_PROTOCOL_WIN8_1), int(lib.VSTOR_PROTOCOL_WIN8))


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
        if packet.type not in (INBAND, GPA_DIRECT) or len(packet.payload) < 12:
            raise VmbusProtocolError(f"storvsp: packet type {packet.type} with {len(packet.payload)} bytes")
        request = ffi.new("struct vstor_packet *")
        ffi.memmove(request, packet.payload[:PACKET], min(len(packet.payload), PACKET))
        reply = ffi.new("struct vstor_packet *")
        reply.operation = lib.VSTOR_OPERATION_COMPLETE_IO
        reply.status = lib.VSTOR_STATUS_SUCCESS
        self.requests += 1
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
        elif operation == lib.VSTOR_OPERATION_EXECUTE_SRB:
            self._execute(channel, packet, request, reply)
        elif operation not in (lib.VSTOR_OPERATION_BEGIN_INITIALIZATION, lib.VSTOR_OPERATION_RESET_LUN,
                               lib.VSTOR_OPERATION_RESET_ADAPTER, lib.VSTOR_OPERATION_RESET_BUS):
            reply.status = lib.VSTOR_STATUS_INVALID_PARAMETER
        if packet.completion_requested:
            channel.send_completion(packet.transaction_id, bytes(ffi.buffer(reply)))

    # ---- SCSI requests
    def _execute(self, channel: Channel, packet: Packet, request: Any, reply: Any) -> None:
        memory = channel.memory
        srb = request.vm_srb
        out = reply.vm_srb
        out.length = srb.length
        out.path_id, out.target_id, out.lun = srb.path_id, srb.target_id, srb.lun
        cdb = bytes(srb.cdb)[: min(int(srb.cdb_length), 16)]
        length = int(srb.data_transfer_length)
        direction = int(srb.data_in)
        present = not (srb.target_id or srb.lun or srb.path_id)
        if not present and cdb[:1] not in (INQUIRY, REPORT_LUNS):
            out.srb_status, out.scsi_status = lib.SRB_STATUS_INVALID_LUN, 0
            self.errors += 1
            return
        try:
            buffer = self._buffer(channel, packet, length) if direction != lib.VMSCSI_NO_DATA and length else None
        except VmbusProtocolError as exc:
            log.warning("storvsp: %s", exc)
            out.srb_status, self.errors = lib.SRB_STATUS_INVALID_REQUEST, self.errors + 1
            reply.status = lib.VSTOR_STATUS_INVALID_PARAMETER
            return
        data_out = b"".join(memory.read(gpa, n) for gpa, n in buffer) if buffer and direction == lib.VMSCSI_DATA_OUT else b""
        allocation = length if direction == lib.VMSCSI_DATA_IN else 0
        result: ScsiResult = self.disk.execute(cdb, data_out, allocation) if present else absent_lun(cdb, allocation)
        transferred = 0
        if result.ok and buffer and direction == lib.VMSCSI_DATA_IN:
            transferred = self._scatter(memory, buffer, result.data)
        elif result.ok and direction == lib.VMSCSI_DATA_OUT:
            transferred = len(data_out)
        out.data_transfer_length = transferred
        out.scsi_status = result.status
        if result.ok:
            out.srb_status = lib.SRB_STATUS_SUCCESS
        else:
            self.errors += 1
            out.srb_status = lib.SRB_STATUS_ERROR | lib.SRB_STATUS_AUTOSENSE_VALID
            out.sense_info_length = min(len(result.sense), lib.VMSCSI_SENSE_SIZE)
            ffi.memmove(out.sense_data, result.sense, out.sense_info_length)

    def _buffer(self, channel: Channel, packet: Packet, length: int) -> list[tuple[int, int]]:
        """(gpa, size) pieces of the guest buffer, every page checked against RAM and
        against the channel's own rings (DMA there would rewrite the ring indices)."""
        memory = channel.memory
        if packet.type != GPA_DIRECT or len(packet.ranges) != 1:
            raise VmbusProtocolError("data transfer without exactly one GPA-direct range")
        gpa_range = packet.ranges[0]
        if length > gpa_range.byte_count or length > MAX_TRANSFER_BYTES:
            raise VmbusProtocolError(f"transfer of {length} bytes exceeds the {gpa_range.byte_count}-byte buffer")
        pieces: list[tuple[int, int]] = []
        done, offset = 0, gpa_range.byte_offset
        for pfn in gpa_range.pfns:
            if done >= length:
                break
            n = min(PAGE - offset, length - done)
            if pfn in channel.ring_pages:
                raise VmbusProtocolError(f"buffer page {pfn:#x} is one of the channel's ring pages")
            gpa = pfn * PAGE + offset
            try:
                memory.view(gpa, n)   # page by page: a buffer may straddle two memory regions
            except GuestMemoryError:
                raise VmbusProtocolError(f"buffer page {pfn:#x} is not guest RAM") from None
            if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)   # contiguous pages: one piece
            else:
                pieces.append((gpa, n))
            done += n
            offset = 0
        if done < length:
            raise VmbusProtocolError("GPA range shorter than the transfer")
        return pieces

    @staticmethod
    def _scatter(memory: GuestMemory, pieces: list[tuple[int, int]], data: bytes) -> int:
        done = 0
        for gpa, n in pieces:
            chunk = data[done : done + n]
            if not chunk:
                break
            memory.write(gpa, chunk)
            done += len(chunk)
        return done

    def describe(self) -> dict[str, object]:
        return {"image": str(self.disk.path), "read_only": self.disk.read_only, "blocks": self.disk.blocks,
                "requests": self.requests, "errors": self.errors, "flushes": self.disk.flushes}

