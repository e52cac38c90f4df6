"""The guest's side of netvsc for tests: what Linux's hv_netvsc does, step by step.

Runs over the scripted VMBus guest (vmbus_guest.py): the NIC's channel, its
receive and send buffers as GPADLs in guest RAM, NVSP requests and RNDIS
messages written the way Linux writes them, and the host's transfer-page
packets read back out of the receive buffer and completed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from mshvstack.abi import lib
from mshvstack.net.backend import LoopbackBackend
from mshvstack.vmbus import packets
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.providers import netvsc as nv
from mshvstack.vmbus.providers import rndis

from vmbus_guest import GuestChannel, VmbusGuest, parse_offer

MAC = bytes.fromhex("00155d0a0b0c")
NO_RESPONSE = 0xFFFFFFFFFFFFFFFD
RECEIVE_PAGES = 256
SEND_PAGES = 64
GPA_DIRECT_HEADER = Layout("struct vmdata_gpa_direct_header", "d.type", "d.offset8", "d.len8", "d.flags", "d.trans_id",
                           "range_count")
RANGE = Layout("struct vmtransfer_page_range", "byte_count", "byte_offset")   # a GPA range's first two words


@dataclass
class Received:
    """One transfer-page packet from the host: its id and the RNDIS messages its ranges hold."""

    transaction_id: int
    messages: list[bytes]
    control: bool


def nvsp(layout: Layout, *values: int) -> bytes:
    return layout.pack(*values)


def rndis_message(kind: int, body: bytes) -> bytes:
    return rndis.HEADER.pack(kind, rndis.HEADER_SIZE + len(body)) + body


def rndis_oid(kind: int, req_id: int, oid: int, info: bytes = b"") -> bytes:
    body = rndis.OID_REQUEST.pack(req_id, oid, len(info), rndis.OID_REQUEST.size if info else 0) + info
    return rndis_message(kind, body)


def rndis_packet(frame: bytes) -> bytes:
    return rndis.packet_header(len(frame)) + frame


class NetGuest:
    """A guest with one NIC, brought up to where Linux registers eth0."""

    def __init__(self, tmp_path: Path, backend: LoopbackBackend | None = None, ring_pages: int = 16) -> None:
        self.backend = backend or LoopbackBackend()
        self.nic = nv.Netvsc(self.backend, MAC)
        self.guest = VmbusGuest([self.nic], tmp_path, memory=32 << 20)
        self.guest.connect()
        offer = parse_offer(self.guest.request_offers()[0])
        assert offer["class"] == nv.Netvsc.class_id
        channel, status = self.guest.open_channel(offer["relid"], offer["connection_id"], ring_pages=ring_pages)
        assert status == 0 and channel is not None
        self.channel: GuestChannel = channel
        self.relid = offer["relid"]
        self.backend.start(lambda frames: self.guest.server.call(self.nic.receive, frames))
        self.next_id = 1
        self.receive_pfns: list[int] = []
        self.send_pfns: list[int] = []
        self.section_size = 0
        self.pending: list[packets.Packet] = []
        self.scratch: list[int] = []
        self.send_section = 0

    def close(self) -> None:
        self.backend.close()
        self.guest.close()

    # ---- NVSP
    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def request(self, payload: bytes) -> packets.Packet:
        """An NVSP request with a completion requested; its completion."""
        transaction = self._id()
        self.channel.send(packets.inband(payload, transaction, completion_requested=True))
        reply = self.take(lambda p: p.type == packets.COMPLETION and p.transaction_id == transaction)
        assert reply is not None, "no completion"
        return reply

    def post(self, payload: bytes) -> None:
        """An NVSP message that wants no completion."""
        self.channel.send(packets.inband(payload, NO_RESPONSE))

    def poll(self) -> None:
        while (packet := self.channel.receive()) is not None:
            self.pending.append(packet)

    def take(self, match: object) -> packets.Packet | None:
        self.poll()
        for index, packet in enumerate(self.pending):
            if match(packet):   # type: ignore[operator]
                return self.pending.pop(index)
        return None

    def initialize(self, version: int = int(lib.NVSP_PROTOCOL_VERSION_61), mtu: int = 1500) -> None:
        """Linux's sequence (netvsc.md §2.3) up to the RNDIS handshake."""
        reply = self.request(nvsp(nv.INIT, nv.NvspType.INIT, version, version))
        assert nv.INIT_COMPLETE.unpack_from(reply.payload.ljust(40, b"\0"))[3] == nv.NvspStatus.SUCCESS
        if version >= lib.NVSP_PROTOCOL_VERSION_2:
            self.post(nvsp(nv.NDIS_CONFIG, nv.NvspType.SEND_NDIS_CONFIG, mtu + 14, lib.NVSP_CAP_IEEE8021Q))
        self.post(nvsp(nv.NDIS_VERSION, nv.NvspType.SEND_NDIS_VER, 6, 1 if version <= lib.NVSP_PROTOCOL_VERSION_4 else 30))
        self.receive_pfns = self.guest.allocate(RECEIVE_PAGES)
        gpadl, _ = self.guest.create_gpadl(self.relid, self.receive_pfns)
        reply = self.request(nvsp(nv.SEND_BUFFER, nv.NvspType.SEND_RECV_BUF, gpadl, lib.NETVSC_RECEIVE_BUFFER_ID))
        _t, status, sections, offset, size, count, end = nv.RECV_BUF_COMPLETE.unpack_from(reply.payload)
        assert (status, sections, offset) == (nv.NvspStatus.SUCCESS, 1, 0)
        assert size >= 68 and size * count == end <= RECEIVE_PAGES * 4096
        self.section_size = size
        self.send_pfns = self.guest.allocate(SEND_PAGES)
        gpadl, _ = self.guest.create_gpadl(self.relid, self.send_pfns)
        reply = self.request(nvsp(nv.SEND_BUFFER, nv.NvspType.SEND_SEND_BUF, gpadl, 0))
        _t, status, self.send_section = nv.SEND_BUF_COMPLETE.unpack_from(reply.payload)
        assert status == nv.NvspStatus.SUCCESS and self.send_section >= 68
        self.scratch = self.guest.allocate(4)   # pages for GPA-direct requests

    # ---- RNDIS
    def send_rndis(self, stream: bytes, section: int | None = 0, ranges: bytes | None = None,
                   control: bool = False) -> int:
        """RNDIS bytes in send-buffer ``section`` (None: in the GPA range after the send buffer);
        returns the completion's status."""
        transaction = self._id()
        kind = lib.NVSP_CHANNEL_TYPE_CONTROL if control else lib.NVSP_CHANNEL_TYPE_DATA
        if section is not None:
            self.guest.memory.write(self.send_pfns[0] * 4096 + section * self.send_section, stream)
            message = nvsp(nv.RNDIS_PKT, nv.NvspType.SEND_RNDIS_PKT, kind, section, len(stream))
            self.channel.send(packets.inband(message, transaction, completion_requested=True))
        else:
            scratch = self.scratch[0]
            self.guest.memory.write(scratch * 4096, stream)
            message = nvsp(nv.RNDIS_PKT, nv.NvspType.SEND_RNDIS_PKT, kind, lib.NETVSC_INVALID_SECTION, 0)
            self.channel.send(gpa_direct(message, transaction, ranges or page_range(len(stream), 0, [scratch])))
        reply = self.take(lambda p: p.type == packets.COMPLETION and p.transaction_id == transaction)
        assert reply is not None
        kind_, status = nv.GUEST_RX_COMPLETION.unpack_from(reply.payload)
        assert kind_ == nv.NvspType.SEND_RNDIS_PKT_COMPLETE
        return int(status)

    def received(self, complete: bool = True) -> list[Received]:
        """Every transfer-page packet waiting, its messages read out (and completed, as Linux does)."""
        out = []
        self.poll()
        keep = []
        base = self.receive_pfns[0] * 4096
        for packet in self.pending:
            if packet.type != packets.XFER_PAGES:
                keep.append(packet)
                continue
            assert packet.xfer_pageset_id == lib.NETVSC_RECEIVE_BUFFER_ID
            _t, channel_type, _index, _size = nv.RNDIS_PKT.unpack_from(packet.payload.ljust(40, b"\0"))
            messages = [self.guest.memory.read(base + offset, count) for count, offset in packet.xfer_ranges]
            out.append(Received(packet.transaction_id, messages, channel_type == lib.NVSP_CHANNEL_TYPE_CONTROL))
            if complete:
                self.complete(packet.transaction_id)
        self.pending = keep
        return out

    def complete(self, transaction: int, status: int = nv.NvspStatus.SUCCESS) -> None:
        self.channel.send(packets.completion(transaction, nv.GUEST_RX_COMPLETION.pack(nv.NvspType.SEND_RNDIS_PKT_COMPLETE, status)))

    def control(self, message: bytes) -> bytes:
        """One RNDIS control request the way Linux sends it (GPA direct); its reply."""
        assert self.send_rndis(message, section=None, control=True) == nv.NvspStatus.SUCCESS
        replies = [m for r in self.received() for m in r.messages]
        assert len(replies) == 1, replies
        return replies[0]

    def query(self, oid: int, info: bytes = b"") -> tuple[int, bytes, int]:
        """(status, data, info offset) of an RNDIS QUERY."""
        reply = self.control(rndis_oid(rndis.RndisType.QUERY, 7, oid, info))
        kind, _length = rndis.HEADER.unpack_from(reply)
        assert kind == rndis.RndisType.QUERY_C
        req_id, status, length, offset = rndis.QUERY_COMPLETE.unpack_from(reply, rndis.HEADER_SIZE)
        assert req_id == 7
        return status, reply[rndis.HEADER_SIZE + offset : rndis.HEADER_SIZE + offset + length], offset

    def set(self, oid: int, info: bytes) -> int:
        reply = self.control(rndis_oid(rndis.RndisType.SET, 8, oid, info))
        kind, _length = rndis.HEADER.unpack_from(reply)
        assert kind == rndis.RndisType.SET_C
        req_id, status = rndis.SET_COMPLETE.unpack_from(reply, rndis.HEADER_SIZE)
        assert req_id == 8
        return int(status)

    def bring_up(self) -> None:
        """Everything Linux does until eth0 is up: NVSP, RNDIS INIT, filter 0x0D."""
        self.initialize()
        reply = self.control(rndis_message(rndis.RndisType.INIT, rndis.INIT_REQUEST.pack(1, 1, 0) + bytes(4)))
        assert rndis.INIT_COMPLETE.unpack_from(reply, rndis.HEADER_SIZE)[1] == rndis.RndisStatus.SUCCESS
        assert self.set(rndis.Oid.CURRENT_PACKET_FILTER, rndis.U32.pack(0x0D)) == rndis.RndisStatus.SUCCESS


def page_range(count: int, offset: int, pfns: list[int]) -> bytes:
    return RANGE.pack(count, offset) + struct.pack(f"<{len(pfns)}Q", *pfns)


def gpa_direct(payload: bytes, transaction: int, ranges: bytes, range_count: int = 1) -> bytes:
    header = GPA_DIRECT_HEADER.size + len(ranges)
    body = payload + bytes(-len(payload) % 8)
    return GPA_DIRECT_HEADER.pack(packets.GPA_DIRECT, header // 8, (header + len(body)) // 8, packets.COMPLETION_REQUESTED,
                                  transaction, range_count) + ranges + body
