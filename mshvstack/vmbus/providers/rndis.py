"""RNDIS, the message layer netvsc carries inside NVSP: a NIC's control and data.

Pure logic over bytes: a stream of RNDIS messages from the guest goes in,
Ethernet frames for the backend and reply messages for the guest come out.
What Linux's hv_netvsc asks (netvsc.md §3.3) is answered: every QUERY and SET
gets a reply, since Linux waits for each one without a timeout; OIDs this
device does not implement answer NOT_SUPPORTED with the info offset at 16
(Linux rejects 0).  No offloads are advertised: the guest then computes every
checksum and never sends a frame larger than its MTU plus the Ethernet
header, so frames pass to any backend unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mshvstack.abi import ffi, lib
from mshvstack.vmbus.layout import Layout

HEADER = Layout("struct rndis_msg_header", "msg_type", "msg_len")
HEADER_SIZE = HEADER.size
PACKET = Layout("struct rndis_packet_message", "header.msg_type", "header.msg_len", "packet.data_offset",
                "packet.data_len", "packet.oob_data_offset", "packet.oob_data_len", "packet.num_oob_data_elements",
                "packet.per_pkt_info_offset", "packet.per_pkt_info_len", "packet.vc_handle")
PACKET_HEADER_SIZE = PACKET.size                       # 44: what precedes a frame in a receive section
PACKET_CSUM = Layout("struct rndis_packet_message_csum", "header.msg_type", "header.msg_len", "packet.data_offset",
                     "packet.data_len", "packet.per_pkt_info_offset", "packet.per_pkt_info_len", "ppi.size", "ppi.type",
                     "ppi.ppi_offset", "csum_info")
PPI_SIZE = ffi.sizeof("struct rndis_per_packet_info")
CSUM_PPI_SIZE = PACKET_CSUM.size - PACKET_HEADER_SIZE
RX_CHECKSUMS_GOOD = (lib.RNDIS_RX_CSUM_TCP_SUCCEEDED | lib.RNDIS_RX_CSUM_UDP_SUCCEEDED
                     | lib.RNDIS_RX_CSUM_IP_SUCCEEDED)
PACKET_BODY_SIZE = ffi.sizeof("struct rndis_packet")  # data_offset counts from here
OID_REQUEST = Layout("struct rndis_oid_request", "req_id", "oid", "info_buflen", "info_buf_offset")
INIT_REQUEST = Layout("struct rndis_initialize_request", "req_id", "major_ver", "minor_ver")
REQ_ID = Layout("struct rndis_halt_request", "req_id")
INIT_COMPLETE = Layout("struct rndis_initialize_complete", "req_id", "status", "major_ver", "minor_ver", "dev_flags",
                       "medium", "max_pkt_per_msg", "max_xfer_size", "pkt_alignment_factor")
QUERY_COMPLETE = Layout("struct rndis_query_complete", "req_id", "status", "info_buflen", "info_buf_offset")
SET_COMPLETE = Layout("struct rndis_set_complete", "req_id", "status")
KEEPALIVE_COMPLETE = Layout("struct rndis_keepalive_complete", "req_id", "status")
RESET_COMPLETE = Layout("struct rndis_reset_complete", "status", "addressing_reset")
INDICATE = Layout("struct rndis_indicate_status", "status", "status_buflen", "status_buf_offset")
U32 = Layout("struct rndis_oid_u32", "value")   # an OID's 32-bit value
PACKET_BODY = Layout("struct rndis_packet", "data_offset", "data_len", "oob_data_offset", "oob_data_len",
                     "num_oob_data_elements")
OFFLOAD = Layout("struct ndis_offload", "header.type", "header.revision", "header.size")
ETHERNET_HEADER = 14
ETHERNET_VLAN_HEADER = 18
LINK_SPEED_100BPS = 100_000_000        # 10 Gb/s in the OID's 100 b/s units
MAX_PACKETS_PER_MESSAGE = 8
ALIGNMENT_SHIFT = 3


class RndisType(enum.IntEnum):
    PACKET = lib.RNDIS_MSG_PACKET
    INIT = lib.RNDIS_MSG_INIT
    HALT = lib.RNDIS_MSG_HALT
    QUERY = lib.RNDIS_MSG_QUERY
    SET = lib.RNDIS_MSG_SET
    RESET = lib.RNDIS_MSG_RESET
    INDICATE = lib.RNDIS_MSG_INDICATE
    KEEPALIVE = lib.RNDIS_MSG_KEEPALIVE
    INIT_C = lib.RNDIS_MSG_INIT_C
    QUERY_C = lib.RNDIS_MSG_QUERY_C
    SET_C = lib.RNDIS_MSG_SET_C
    RESET_C = lib.RNDIS_MSG_RESET_C
    KEEPALIVE_C = lib.RNDIS_MSG_KEEPALIVE_C


class RndisStatus(enum.IntEnum):
    SUCCESS = lib.RNDIS_STATUS_SUCCESS
    FAILURE = lib.RNDIS_STATUS_FAILURE
    INVALID_DATA = lib.RNDIS_STATUS_INVALID_DATA
    NOT_SUPPORTED = lib.RNDIS_STATUS_NOT_SUPPORTED
    MEDIA_CONNECT = lib.RNDIS_STATUS_MEDIA_CONNECT
    MEDIA_DISCONNECT = lib.RNDIS_STATUS_MEDIA_DISCONNECT


class Oid(enum.IntEnum):
    MAXIMUM_FRAME_SIZE = lib.OID_GEN_MAXIMUM_FRAME_SIZE
    LINK_SPEED = lib.OID_GEN_LINK_SPEED
    CURRENT_PACKET_FILTER = lib.OID_GEN_CURRENT_PACKET_FILTER
    MEDIA_CONNECT_STATUS = lib.OID_GEN_MEDIA_CONNECT_STATUS
    RECEIVE_SCALE_CAPABILITIES = lib.OID_GEN_RECEIVE_SCALE_CAPABILITIES
    RECEIVE_SCALE_PARAMETERS = lib.OID_GEN_RECEIVE_SCALE_PARAMETERS
    FRIENDLY_NAME = lib.OID_GEN_FRIENDLY_NAME
    RNDIS_CONFIG_PARAMETER = lib.OID_GEN_RNDIS_CONFIG_PARAMETER
    PERMANENT_ADDRESS = lib.OID_802_3_PERMANENT_ADDRESS
    CURRENT_ADDRESS = lib.OID_802_3_CURRENT_ADDRESS
    OFFLOAD_PARAMETERS = lib.OID_TCP_OFFLOAD_PARAMETERS
    OFFLOAD_HARDWARE_CAPABILITIES = lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES


class RndisState(enum.Enum):
    UNINITIALIZED = "uninitialized"
    OPERATIONAL = "operational"
    HALTED = "halted"


class RndisError(ValueError):
    """A malformed RNDIS message: the NVSP packet carrying it completes with a failure."""


def offload_size(nvsp_version: int) -> tuple[int, int]:
    """(revision, size) of the NDIS_OFFLOAD object Linux asks for at this NVSP version."""
    if nvsp_version >= lib.NVSP_PROTOCOL_VERSION_5:
        return int(lib.NDIS_OFFLOAD_REVISION_3), ffi.sizeof("struct ndis_offload")
    if nvsp_version >= lib.NVSP_PROTOCOL_VERSION_4:
        return 2, int(lib.NDIS_OFFLOAD_SIZE_6_1)
    return int(lib.NDIS_OFFLOAD_REVISION_1), int(lib.NDIS_OFFLOAD_SIZE_6_0)


@dataclass
class Result:
    """What one guest RNDIS stream produced."""

    frames: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    errors: int = 0


def _message(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, HEADER_SIZE + len(body)) + body


def packet_header(frame_length: int) -> bytes:
    """The 44 bytes before a frame in a receive section: a PACKET message, no PPIs, no OOB."""
    return PACKET.pack(RndisType.PACKET, PACKET_HEADER_SIZE + frame_length, PACKET_BODY_SIZE, frame_length,
                       0, 0, 0, 0, 0, 0)


def checksummed_packet_header(frame_length: int) -> bytes:
    """A PACKET header whose one PPI tells the guest the frame's checksums are good, so
    it skips verifying them (for frames a backend built itself, as libslirp does)."""
    return PACKET_CSUM.pack(RndisType.PACKET, PACKET_CSUM.size + frame_length, PACKET_BODY_SIZE + CSUM_PPI_SIZE,
                            frame_length, PACKET_BODY_SIZE, CSUM_PPI_SIZE, CSUM_PPI_SIZE,
                            lib.RNDIS_PPI_TCPIP_CHKSUM, PPI_SIZE, RX_CHECKSUMS_GOOD)


def indicate_status(status: int) -> bytes:
    return _message(RndisType.INDICATE, INDICATE.pack(status, 0, INDICATE.size))


class RndisDevice:
    """One NIC's RNDIS state: MAC, MTU, link, packet filter."""

    def __init__(self, mac: bytes, mtu: int = 1500) -> None:
        self.mac = mac
        self.mtu = mtu
        self.nvsp_version = 0
        self.state = RndisState.UNINITIALIZED
        self.packet_filter = 0
        self.link_up = True
        self.oids: dict[int, int] = {}   # OID -> times asked (for the status report)

    def reset(self) -> None:
        self.state = RndisState.UNINITIALIZED
        self.packet_filter = 0

    @property
    def receiving(self) -> bool:
        """Frames may go to the guest: initialized, a nonzero filter, link up."""
        return self.state is RndisState.OPERATIONAL and self.packet_filter != 0 and self.link_up

    def max_frame(self) -> int:
        return self.mtu + ETHERNET_VLAN_HEADER

    def handle(self, stream: bytes | memoryview) -> Result:
        """Every RNDIS message in ``stream`` (back to back, each ``msg_len`` long)."""
        result = Result()
        position, end = 0, len(stream)
        while position < end:
            if end - position < HEADER_SIZE:
                if any(stream[position:end]):
                    result.errors += 1
                return result   # zero padding after the last message
            kind, length = HEADER.unpack_from(stream, position)
            if length < HEADER_SIZE or length > end - position:
                result.errors += 1
                return result
            body = stream[position + HEADER_SIZE : position + length]
            try:
                self._one(kind, body, result)
            except RndisError:
                result.errors += 1
            position += length
        return result

    def _one(self, kind: int, body: bytes | memoryview, result: Result) -> None:
        if kind == RndisType.PACKET:
            frame = self._frame(body)
            if self.state is RndisState.OPERATIONAL and self.link_up:
                result.frames.append(frame)
            return
        if kind == RndisType.HALT:
            self.state = RndisState.HALTED   # no reply: Linux waits for none
            return
        if len(body) < REQ_ID.size:
            raise RndisError(f"RNDIS message {kind:#x} without its request id")
        (req_id,) = REQ_ID.unpack_from(body)
        if kind == RndisType.INIT:
            result.replies.append(self._initialize(req_id))
        elif kind in (RndisType.QUERY, RndisType.SET):
            result.replies.append(self._oid(kind, req_id, body))
        elif kind == RndisType.KEEPALIVE:
            result.replies.append(_message(RndisType.KEEPALIVE_C, KEEPALIVE_COMPLETE.pack(req_id, RndisStatus.SUCCESS)))
        elif kind == RndisType.RESET:
            self.packet_filter = 0
            result.replies.append(_message(RndisType.RESET_C, RESET_COMPLETE.pack(RndisStatus.SUCCESS, 0)))
        else:
            raise RndisError(f"RNDIS message type {kind:#x} is not a guest request")

    def _frame(self, body: bytes | memoryview) -> bytes:
        if len(body) < PACKET_BODY_SIZE:
            raise RndisError("RNDIS PACKET shorter than its header")
        data_offset, data_len, oob_offset, oob_len, oob_count = PACKET_BODY.unpack_from(body)
        if oob_offset or oob_len or oob_count:
            raise RndisError("RNDIS PACKET with out-of-band data")
        if data_offset < PACKET_BODY_SIZE or data_offset + data_len > len(body):
            raise RndisError(f"RNDIS PACKET data {data_offset}+{data_len} outside its {len(body)}-byte body")
        if not ETHERNET_HEADER <= data_len <= self.max_frame():
            raise RndisError(f"a {data_len}-byte frame (MTU {self.mtu})")
        return bytes(body[data_offset : data_offset + data_len])

    def _initialize(self, req_id: int) -> bytes:
        self.state = RndisState.OPERATIONAL
        self.packet_filter = 0
        return _message(RndisType.INIT_C, INIT_COMPLETE.pack(
            req_id, RndisStatus.SUCCESS, lib.RNDIS_MAJOR_VERSION, lib.RNDIS_MINOR_VERSION, lib.RNDIS_DF_CONNECTIONLESS,
            lib.RNDIS_MEDIUM_802_3, MAX_PACKETS_PER_MESSAGE, 0xEFFFFFFF, ALIGNMENT_SHIFT))

    def _oid(self, kind: int, req_id: int, body: bytes | memoryview) -> bytes:
        if len(body) < OID_REQUEST.size:
            raise RndisError("RNDIS QUERY/SET shorter than its header")
        _req, oid, length, offset = OID_REQUEST.unpack_from(body)
        self.oids[oid] = self.oids.get(oid, 0) + 1
        valid = length == 0 or (offset >= OID_REQUEST.size and offset + length <= len(body))
        info = bytes(body[offset : offset + length]) if valid else b""
        if kind == RndisType.QUERY:
            status, data = self._query(oid) if valid else (RndisStatus.INVALID_DATA, b"")
            return _message(RndisType.QUERY_C, QUERY_COMPLETE.pack(req_id, status, len(data), QUERY_COMPLETE.size) + data)
        status = self._set(oid, info) if valid else RndisStatus.INVALID_DATA
        return _message(RndisType.SET_C, SET_COMPLETE.pack(req_id, status))

    def _query(self, oid: int) -> tuple[int, bytes]:
        if oid == Oid.MAXIMUM_FRAME_SIZE:
            return RndisStatus.SUCCESS, U32.pack(self.mtu)
        if oid in (Oid.PERMANENT_ADDRESS, Oid.CURRENT_ADDRESS):
            return RndisStatus.SUCCESS, self.mac
        if oid == Oid.MEDIA_CONNECT_STATUS:
            state = lib.NDIS_MEDIA_STATE_CONNECTED if self.link_up else lib.NDIS_MEDIA_STATE_DISCONNECTED
            return RndisStatus.SUCCESS, U32.pack(state)
        if oid == Oid.LINK_SPEED:
            return RndisStatus.SUCCESS, U32.pack(LINK_SPEED_100BPS)
        if oid == Oid.OFFLOAD_HARDWARE_CAPABILITIES:
            revision, size = offload_size(self.nvsp_version)
            # All capabilities zero: the guest checksums and segments everything itself.
            return RndisStatus.SUCCESS, OFFLOAD.pack(lib.NDIS_OBJECT_TYPE_OFFLOAD, revision, size)[:size]
        return RndisStatus.NOT_SUPPORTED, b""

    def _set(self, oid: int, info: bytes) -> int:
        if oid == Oid.CURRENT_PACKET_FILTER:
            if len(info) < U32.size:
                return RndisStatus.INVALID_DATA
            (self.packet_filter,) = U32.unpack_from(info)
            return RndisStatus.SUCCESS
        if oid == Oid.OFFLOAD_PARAMETERS:
            # Linux turns nothing on that we did not advertise (nothing); it only needs the SET to succeed.
            return RndisStatus.SUCCESS
        return RndisStatus.NOT_SUPPORTED
