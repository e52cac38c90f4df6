"""netvsp: a synthetic NIC (NVSP over VMBus, RNDIS inside) that Linux's hv_netvsc drives.

The guest leads (netvsc.md §2.3): NVSP version, NDIS config and version,
then a receive and a send buffer, each a GPADL on this channel; RNDIS then
flows in NVSP SEND_RNDIS_PKT messages.  Linux waits for every completion
and every RNDIS reply without a timeout, so each request the guest marks
completion-requested is completed exactly once, with its id.

Guest → host: the RNDIS bytes are a send-buffer section followed by the
packet's GPA ranges; frames go to the backend, the packet is completed.
Host → guest: each frame (and each RNDIS reply or status indication) is
written into a free receive section and announced in a transfer-page packet
(one range per message); the guest completes that packet, which frees its
sections.  Sections are bounded by the guest's buffer: with none free, or no
room in the ring, a frame is dropped and counted (TCP recovers), never
queued; a few sections are kept for control replies, and the replies that
find none wait in a short bounded queue.

Subchannels (vRSS) are declined: the RSS-capabilities OID answers
NOT_SUPPORTED (Linux then never asks) and a SUBCHANNEL request completes
with a failure (Linux falls back to one channel).  No offloads are
advertised (rndis.py).

Every callback runs with the VMBus server's lock held (base.Provider);
the backend's frames arrive through ``VmbusServer.call(receive, frames)``.
"""

from __future__ import annotations

import enum
import logging
import struct
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.net.backend import NetBackend
from mshvstack.partition.memory import GuestMemoryError
from mshvstack.vmbus import packets
from mshvstack.vmbus.bufmem import BufferMem
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.layout import Layout, array
from mshvstack.vmbus.packets import COMPLETION, GPA_DIRECT, INBAND, Packet
from mshvstack.vmbus.providers.rndis import (
    PACKET_CSUM,
    PACKET_HEADER_SIZE,
    RndisDevice,
    RndisState,
    checksummed_packet_header,
    indicate_status,
    packet_header,
)

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel

log = logging.getLogger(__name__)
PAGE = int(lib.VMBUS_PAGE_SIZE)
NVSP_SIZE = ffi.sizeof("struct nvsp_message")
MESSAGE_TYPE_SIZE = ffi.sizeof(ffi.typeof("struct nvsp_message").fields[0][1].type)
MESSAGE = Layout("struct nvsp_message", "msg_type")
INIT = Layout("struct nvsp_message", "msg_type", "msg.init.min_protocol_ver", "msg.init.max_protocol_ver")
INIT_COMPLETE = Layout("struct nvsp_message", "msg_type", "msg.init_complete.negotiated_protocol_ver",
                       "msg.init_complete.max_mdl_chain_len", "msg.init_complete.status")
NDIS_VERSION = Layout("struct nvsp_message", "msg_type", "msg.send_ndis_ver.ndis_major_ver", "msg.send_ndis_ver.ndis_minor_ver")
NDIS_CONFIG = Layout("struct nvsp_message", "msg_type", "msg.ndis_config.mtu", "msg.ndis_config.capability")
SEND_BUFFER = Layout("struct nvsp_message", "msg_type", "msg.send_buf.gpadl_handle", "msg.send_buf.id")
RECV_BUF_COMPLETE = Layout("struct nvsp_message", "msg_type", "msg.recv_buf_complete.status",
                           "msg.recv_buf_complete.num_sections", "msg.recv_buf_complete.section.offset",
                           "msg.recv_buf_complete.section.sub_alloc_size",
                           "msg.recv_buf_complete.section.num_sub_allocs",
                           "msg.recv_buf_complete.section.end_offset")
SEND_BUF_COMPLETE = Layout("struct nvsp_message", "msg_type", "msg.send_buf_complete.status",
                           "msg.send_buf_complete.section_size")
RNDIS_PKT = Layout("struct nvsp_message", "msg_type", "msg.rndis_pkt.channel_type", "msg.rndis_pkt.send_buf_section_index",
                   "msg.rndis_pkt.send_buf_section_size")
RNDIS_PKT_COMPLETE = Layout("struct nvsp_message", "msg_type", "msg.rndis_pkt_complete.status")
SUBCHANNEL_COMPLETE = Layout("struct nvsp_message", "msg_type", "msg.subchannel_complete.status",
                             "msg.subchannel_complete.num_subchannels")
GUEST_RX_COMPLETION = Layout("struct nvsp_rndis_packet_completion", "msg_type", "status")
XFER_HEADER = Layout("struct vmtransfer_page_packet_header", "d.type", "d.offset8", "d.len8", "d.flags", "d.trans_id",
                     "xfer_pageset_id", "sender_owns_set", "range_count")
XFER_RANGE = Layout("struct vmtransfer_page_range", "byte_count", "byte_offset")

SUPPORTED_VERSIONS = frozenset(int(getattr(lib, f"NVSP_PROTOCOL_VERSION_{v}")) for v in ("1", "2", "4", "5", "6", "61"))
RECEIVE_BUFFER_ID = int(lib.NETVSC_RECEIVE_BUFFER_ID)
SEND_SECTION_SIZE = 6144            # Linux's own choice; the host picks it
RESERVED_CONTROL_SECTIONS = 16      # kept for RNDIS replies: data never takes the last ones
CONTROL_BACKLOG = 64                # replies waiting for a section; more and the guest is not returning any
MAX_RANGES_PER_PACKET = 64          # frames per transfer-page packet (Linux takes ~560: 4624 bytes)
MAX_RECEIVE_BUFFER = 64 << 20
MAX_SEND_BUFFER = 64 << 20
MIN_MTU, MAX_MTU = 68, 65521
DEFAULT_MTU = 1500
ETHERNET_HEADER = 14
SECTION_SLACK = 64                  # room for PPIs we might add later


class NvspType(enum.IntEnum):
    INIT = lib.NVSP_MSG_TYPE_INIT
    INIT_COMPLETE = lib.NVSP_MSG_TYPE_INIT_COMPLETE
    SEND_NDIS_VER = lib.NVSP_MSG1_TYPE_SEND_NDIS_VER
    SEND_RECV_BUF = lib.NVSP_MSG1_TYPE_SEND_RECV_BUF
    SEND_RECV_BUF_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE
    REVOKE_RECV_BUF = lib.NVSP_MSG1_TYPE_REVOKE_RECV_BUF
    SEND_SEND_BUF = lib.NVSP_MSG1_TYPE_SEND_SEND_BUF
    SEND_SEND_BUF_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE
    REVOKE_SEND_BUF = lib.NVSP_MSG1_TYPE_REVOKE_SEND_BUF
    SEND_RNDIS_PKT = lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT
    SEND_RNDIS_PKT_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE
    SEND_NDIS_CONFIG = lib.NVSP_MSG2_TYPE_SEND_NDIS_CONFIG
    SWITCH_DATA_PATH = lib.NVSP_MSG4_TYPE_SWITCH_DATA_PATH
    SUBCHANNEL = lib.NVSP_MSG5_TYPE_SUBCHANNEL


class NvspStatus(enum.IntEnum):
    SUCCESS = lib.NVSP_STAT_SUCCESS
    FAIL = lib.NVSP_STAT_FAIL


@dataclass
class NicStats:
    """Counters both ways (``--stats``, QMP)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    tx_errors: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _ReceiveBuffer:
    gpadl_id: int
    mem: BufferMem
    section_size: int
    sections: int
    free: deque[int]


@dataclass
class _SendBuffer:
    gpadl_id: int
    mem: BufferMem
    sections: int


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


def _ranges_struct(count: int) -> struct.Struct:
    """``count`` transfer-page ranges back to back."""
    return array("struct vmtransfer_page_packet_header", "ranges", count)


class Netvsc:
    """One NIC: its MAC, its backend, its channel's NVSP state."""

    name = "network"
    class_id = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
    pipe_mode = False
    state_type: ClassVar[type] = NicStats   # never saved: a machine with a NIC refuses to migrate (vmm/migration.py)

    def __init__(self, backend: NetBackend, mac: bytes, label: str = "net0") -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.backend = backend
        self.label = label
        self.instance_id = uuid.uuid5(uuid.NAMESPACE_URL, f"mshvstack-nic:{mac.hex()}")
        self.rndis = RndisDevice(mac)
        self.stats = NicStats()
        self.channel: Channel | None = None
        self.version = 0
        self.ndis_version: tuple[int, int] | None = None
        self.receive_buffer: _ReceiveBuffer | None = None
        self.send_buffer: _SendBuffer | None = None
        self._in_flight: dict[int, tuple[int, ...]] = {}   # our transfer-page packet id -> its sections
        self._next_id = 1
        self._control: deque[bytes] = deque()               # RNDIS replies waiting for a section
        self.protocol_errors = 0
        # Frames the backend built itself (libslirp) carry good checksums: the guest is told so.
        checksummed = bool(getattr(backend, "checksummed", False))
        self._header = checksummed_packet_header if checksummed else packet_header
        self._header_size = PACKET_CSUM.size if checksummed else PACKET_HEADER_SIZE

    @property
    def mac(self) -> bytes:
        return self.rndis.mac

    # ---- channel lifecycle
    def _reset(self) -> None:
        self.version = 0
        self.ndis_version = None
        self.receive_buffer = self.send_buffer = None
        self._in_flight.clear()
        self._control.clear()
        self.rndis.reset()
        self.rndis.nvsp_version = 0

    def on_open(self, channel: Channel) -> bool:
        self._reset()
        self.channel = channel
        return True

    def on_opened(self, channel: Channel) -> None:
        pass   # the guest speaks first

    def on_close(self, channel: Channel) -> None:
        self._reset()
        self.channel = None

    # ---- guest -> host
    def on_packet(self, channel: Channel, packet: Packet) -> None:
        if packet.type == COMPLETION:
            self._guest_completion(packet)
            return
        if packet.type not in (INBAND, GPA_DIRECT) or len(packet.payload) < MESSAGE_TYPE_SIZE:
            raise VmbusProtocolError(f"netvsp: packet type {packet.type} with {len(packet.payload)} bytes")
        message = bytes(packet.payload[:NVSP_SIZE]).ljust(NVSP_SIZE, b"\0")
        (kind,) = MESSAGE.unpack_from(message)
        if packet.type == GPA_DIRECT and kind != NvspType.SEND_RNDIS_PKT:
            raise VmbusProtocolError(f"netvsp: NVSP message {kind} with page ranges")
        if kind == NvspType.INIT:
            self._init(packet, message)
        elif kind == NvspType.SEND_NDIS_VER:
            _t, major, minor = NDIS_VERSION.unpack_from(message)
            self.ndis_version = (major, minor)
        elif kind == NvspType.SEND_NDIS_CONFIG:
            self._ndis_config(message)
        elif kind == NvspType.SEND_RECV_BUF:
            self._receive_buffer(channel, packet, message)
        elif kind == NvspType.SEND_SEND_BUF:
            self._send_buffer(channel, packet, message)
        elif kind == NvspType.REVOKE_RECV_BUF:
            self.receive_buffer = None
            self._in_flight.clear()
            self._control.clear()
        elif kind == NvspType.REVOKE_SEND_BUF:
            self.send_buffer = None
        elif kind == NvspType.SEND_RNDIS_PKT:
            self._rndis(channel, packet, message)
        elif kind == NvspType.SWITCH_DATA_PATH:
            if packet.completion_requested:
                channel.send_completion(packet.transaction_id, b"")   # the one payload-less completion Linux knows
        elif kind == NvspType.SUBCHANNEL:
            if packet.completion_requested:
                channel.send_completion(packet.transaction_id,
                                        SUBCHANNEL_COMPLETE.pack(NvspType.SUBCHANNEL, NvspStatus.FAIL, 0))
        else:
            raise VmbusProtocolError(f"netvsp: NVSP message type {kind} is not a guest request")

    def _complete(self, packet: Packet, payload: bytes) -> None:
        if not packet.completion_requested:
            raise VmbusProtocolError(f"netvsp: NVSP request {MESSAGE.unpack_from(payload)[0]} without a completion id")
        assert self.channel is not None
        self.channel.send_completion(packet.transaction_id, payload)

    def _init(self, packet: Packet, message: bytes) -> None:
        _t, low, high = INIT.unpack_from(message)
        usable = self.receive_buffer is None and self.send_buffer is None
        accepted = next((v for v in sorted(SUPPORTED_VERSIONS, reverse=True) if low <= v <= high), None) if usable else None
        if accepted is not None:
            self.version = accepted
            self.rndis.nvsp_version = accepted
            log.info("netvsp %s: NVSP version %#x", self.label, accepted)
        status = NvspStatus.SUCCESS if accepted is not None else NvspStatus.FAIL
        self._complete(packet, INIT_COMPLETE.pack(NvspType.INIT_COMPLETE, accepted or 0, 34, status))

    def _ndis_config(self, message: bytes) -> None:
        _t, mtu, _capability = NDIS_CONFIG.unpack_from(message)
        mtu -= ETHERNET_HEADER
        if self.version < lib.NVSP_PROTOCOL_VERSION_2 or self.receive_buffer is not None or not MIN_MTU <= mtu <= MAX_MTU:
            raise VmbusProtocolError(f"netvsp: NDIS_CONFIG with MTU {mtu} at NVSP {self.version:#x}")
        self.rndis.mtu = mtu

    def _buffer_gpadl(self, channel: Channel, handle: int, limit: int) -> BufferMem | None:
        gpadl = channel.gpadls.established.get(handle) if channel.gpadls is not None else None
        if gpadl is None or gpadl.relid != channel.relid or gpadl is channel.ring_gpadl:
            log.warning("netvsp %s: buffer GPADL %#x is not one of this channel's", self.label, handle)
            return None
        if gpadl.byte_count > limit:
            log.warning("netvsp %s: a %d-byte buffer (at most %d)", self.label, gpadl.byte_count, limit)
            return None
        return BufferMem(channel.memory, gpadl, channel.ring_pages)

    def _receive_buffer(self, channel: Channel, packet: Packet, message: bytes) -> None:
        _t, handle, buffer_id = SEND_BUFFER.unpack_from(message)
        # Sized for the larger of the guest's MTU and the backend's: libslirp keeps sending
        # 1500-byte packets on connections a guest opened before lowering its MTU, and Linux
        # takes a frame up to its section's size whatever its MTU.
        mtu = max(self.rndis.mtu, int(getattr(self.backend, "mtu", DEFAULT_MTU)))
        section = (PACKET_HEADER_SIZE + mtu + ETHERNET_HEADER + 4 + SECTION_SLACK + 63) & ~63
        mem = None
        if self.version and self.receive_buffer is None and buffer_id == RECEIVE_BUFFER_ID:
            mem = self._buffer_gpadl(channel, handle, MAX_RECEIVE_BUFFER)
        count = mem.size // section if mem is not None else 0
        if mem is None or count <= RESERVED_CONTROL_SECTIONS:
            self._complete(packet, RECV_BUF_COMPLETE.pack(NvspType.SEND_RECV_BUF_COMPLETE, NvspStatus.FAIL, 0, 0, 0, 0, 0))
            return
        self.receive_buffer = _ReceiveBuffer(handle, mem, section, count, deque(range(count)))
        log.info("netvsp %s: receive buffer of %d sections of %d bytes", self.label, count, section)
        self._complete(packet, RECV_BUF_COMPLETE.pack(NvspType.SEND_RECV_BUF_COMPLETE, NvspStatus.SUCCESS, 1, 0,
                                                      section, count, section * count))

    def _send_buffer(self, channel: Channel, packet: Packet, message: bytes) -> None:
        _t, handle, _id = SEND_BUFFER.unpack_from(message)
        mem = None
        if self.version and self.send_buffer is None:
            mem = self._buffer_gpadl(channel, handle, MAX_SEND_BUFFER)
        if mem is None or mem.size < SEND_SECTION_SIZE:
            self._complete(packet, SEND_BUF_COMPLETE.pack(NvspType.SEND_SEND_BUF_COMPLETE, NvspStatus.FAIL, 0))
            return
        self.send_buffer = _SendBuffer(handle, mem, mem.size // SEND_SECTION_SIZE)
        self._complete(packet, SEND_BUF_COMPLETE.pack(NvspType.SEND_SEND_BUF_COMPLETE, NvspStatus.SUCCESS, SEND_SECTION_SIZE))

    def _rndis(self, channel: Channel, packet: Packet, message: bytes) -> None:
        """SEND_RNDIS_PKT: the section's bytes, then the page ranges', as one RNDIS stream."""
        _t, _channel_type, index, size = RNDIS_PKT.unpack_from(message)
        if self.receive_buffer is None or not self.version:
            raise VmbusProtocolError("netvsp: RNDIS before the receive buffer")
        stream = b""
        if index != lib.NETVSC_INVALID_SECTION:
            send = self.send_buffer
            if send is None or index >= send.sections or size > SEND_SECTION_SIZE:
                raise VmbusProtocolError(f"netvsp: send section {index} ({size} bytes) outside the send buffer")
            stream = send.mem.read(index * SEND_SECTION_SIZE, size)
        if packet.ranges:
            stream += self._read_ranges(channel, packet)
        result = self.rndis.handle(stream)
        if result.errors:
            self.stats.tx_errors += result.errors
        for frame in result.frames:
            if self.backend.send(frame):
                self.stats.tx_packets += 1
                self.stats.tx_bytes += len(frame)
            else:
                self.stats.tx_dropped += 1
        status = NvspStatus.FAIL if result.errors else NvspStatus.SUCCESS
        if packet.completion_requested:
            channel.send_completion(packet.transaction_id, RNDIS_PKT_COMPLETE.pack(NvspType.SEND_RNDIS_PKT_COMPLETE, status))
        for reply in result.replies:
            self._send_control(reply)

    @staticmethod
    def _read_ranges(channel: Channel, packet: Packet) -> bytes:
        memory = channel.memory
        parts = []
        try:
            for gpa_range in packet.ranges:
                done, offset = 0, gpa_range.byte_offset
                for pfn in gpa_range.pfns:
                    if done >= gpa_range.byte_count:
                        break
                    n = min(PAGE - offset, gpa_range.byte_count - done)
                    parts.append(memory.read(pfn * PAGE + offset, n))
                    done, offset = done + n, 0
        except GuestMemoryError as exc:   # a page outside RAM
            raise VmbusProtocolError(f"netvsp: page range: {exc}") from None
        return b"".join(parts)

    def _guest_completion(self, packet: Packet) -> None:
        """The guest is done with one of our transfer-page packets: its sections are free."""
        if len(packet.payload) < GUEST_RX_COMPLETION.size:
            raise VmbusProtocolError("netvsp: a receive completion shorter than 8 bytes")
        kind, status = GUEST_RX_COMPLETION.unpack_from(packet.payload)
        sections = self._in_flight.pop(packet.transaction_id, None) if kind == NvspType.SEND_RNDIS_PKT_COMPLETE else None
        if sections is None:
            # Unknown, repeated, or for a buffer revoked since: nothing to free (Linux completes
            # what it had in flight while it tears down), so it is counted and ignored.
            self.protocol_errors += 1
            log.debug("netvsp %s: completion %d for unknown transaction %#x", self.label, kind, packet.transaction_id)
            return
        if status != NvspStatus.SUCCESS:
            self.stats.rx_errors += 1
        if self.receive_buffer is not None:
            self.receive_buffer.free.extend(sections)
        self._flush_control()

    # ---- host -> guest
    def _transfer(self, ranges: list[tuple[int, int]], sections: tuple[int, ...], control: bool) -> bytes:
        """A transfer-page packet announcing ``ranges`` (byte count, offset) of the receive buffer."""
        transaction = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFFFFFF or 1
        self._in_flight[transaction] = sections
        header_size = XFER_HEADER.size + XFER_RANGE.size * len(ranges)
        offset8 = header_size // 8
        flat = [value for pair in ranges for value in pair]
        channel_type = lib.NVSP_CHANNEL_TYPE_CONTROL if control else lib.NVSP_CHANNEL_TYPE_DATA
        return (XFER_HEADER.pack(lib.VMBUS_PACKET_DATA_USING_XFER_PAGES, offset8, offset8 + NVSP_SIZE // 8,
                                 packets.COMPLETION_REQUESTED, transaction, RECEIVE_BUFFER_ID, 0, len(ranges))
                + _ranges_struct(len(ranges)).pack(*flat)
                + RNDIS_PKT.pack(NvspType.SEND_RNDIS_PKT, channel_type, lib.NETVSC_INVALID_SECTION, 0))

    def _send_control(self, reply: bytes) -> None:
        if len(self._control) >= CONTROL_BACKLOG:
            raise VmbusProtocolError("netvsp: the guest returns no receive sections; control replies pile up")
        self._control.append(reply)
        self._flush_control()

    def _flush_control(self) -> None:
        buffer, channel = self.receive_buffer, self.channel
        while self._control and buffer is not None and channel is not None and buffer.free:
            reply = self._control[0]
            if len(reply) > buffer.section_size:
                self._control.popleft()
                log.warning("netvsp %s: a %d-byte RNDIS reply does not fit a section", self.label, len(reply))
                continue
            section = buffer.free.popleft()
            buffer.mem.write(section * buffer.section_size, reply)
            self._control.popleft()
            channel.send(self._transfer([(len(reply), section * buffer.section_size)], (section,), True))

    def receive(self, frames: list[bytes]) -> None:
        """Frames from the backend for the guest (with the server's lock, through VmbusServer.call)."""
        channel, buffer = self.channel, self.receive_buffer
        if channel is None or buffer is None or not self.rndis.receiving:
            self.stats.rx_dropped += len(frames)
            return
        try:
            self._receive(channel, buffer, frames)
        except VmbusProtocolError as exc:
            self.protocol_errors += 1
            log.warning("netvsp %s: %s; closing the channel", self.label, exc)
            channel.close()

    def _receive(self, channel: Channel, buffer: _ReceiveBuffer, frames: list[bytes]) -> None:
        ranges: list[tuple[int, int]] = []
        sections: list[int] = []
        header, header_size = self._header, self._header_size
        limit = buffer.section_size - header_size
        for frame in frames:
            if len(frame) > limit or len(frame) < ETHERNET_HEADER or len(buffer.free) <= RESERVED_CONTROL_SECTIONS:
                self.stats.rx_dropped += 1
                continue
            section = buffer.free.popleft()
            offset = section * buffer.section_size
            buffer.mem.write(offset, header(len(frame)) + frame)
            ranges.append((header_size + len(frame), offset))
            sections.append(section)
            self.stats.rx_bytes += len(frame)
            if len(ranges) == MAX_RANGES_PER_PACKET:
                self._post(channel, buffer, ranges, sections)
                ranges, sections = [], []
        if ranges:
            self._post(channel, buffer, ranges, sections)

    def _post(self, channel: Channel, buffer: _ReceiveBuffer, ranges: list[tuple[int, int]], sections: list[int]) -> None:
        size = XFER_HEADER.size + XFER_RANGE.size * len(ranges) + NVSP_SIZE
        if not channel.has_room(size):
            buffer.free.extend(sections)   # never queued: the ring is full, the frames are dropped
            self.stats.rx_dropped += len(ranges)
            self.stats.rx_bytes -= sum(count - self._header_size for count, _offset in ranges)
            return
        channel.send(self._transfer(ranges, tuple(sections), False))
        self.stats.rx_packets += len(ranges)

    def save(self) -> Any:
        raise VmbusProtocolError("the NIC's state is not a record yet: a machine with a NIC cannot be saved")

    def restore(self, state: Any, channel: Channel | None) -> None:
        raise VmbusProtocolError("the NIC's state is not a record yet: a machine with a NIC cannot be restored")

    # ---- host operations (through VmbusServer.call)
    def set_link(self, up: bool) -> None:
        """Link up or down, as the host's cable: the guest hears a media-status indication."""
        if up == self.rndis.link_up:
            return
        self.rndis.link_up = up
        log.info("netvsp %s: link %s", self.label, "up" if up else "down")
        if self.channel is not None and self.receive_buffer is not None and self.rndis.state is RndisState.OPERATIONAL:
            status = lib.RNDIS_STATUS_MEDIA_CONNECT if up else lib.RNDIS_STATUS_MEDIA_DISCONNECT
            try:
                self._send_control(indicate_status(status))
            except VmbusProtocolError as exc:
                log.warning("netvsp %s: %s", self.label, exc)

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.rndis.state is RndisState.OPERATIONAL

    def describe(self) -> dict[str, Any]:
        buffer = self.receive_buffer
        return {"id": self.label, "mac": mac_text(self.mac), "mtu": self.rndis.mtu, "link": "up" if self.rndis.link_up else "down",
                "state": self.rndis.state.value if self.channel is not None else "closed",
                "nvsp_version": f"{self.version >> 16}.{self.version & 0xFFFF}" if self.version else None,
                "packet_filter": self.rndis.packet_filter,
                "receive_sections": {"total": buffer.sections, "free": len(buffer.free), "size": buffer.section_size}
                if buffer else None,
                "send_sections": self.send_buffer.sections if self.send_buffer else None,
                **self.stats.as_dict(), "protocol_errors": self.protocol_errors, **self.backend.describe()}
