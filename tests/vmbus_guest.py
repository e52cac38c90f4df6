"""A guest-side VMBus client for tests.

Plays the guest's part through the simulator's guest-facing interface: a
small long-mode stub guest executes real hypercalls (through the hypercall
page the hypervisor overlays) and WRMSRs on the harness's command, and the
harness reads the guest's SynIC message page and rings in guest RAM — as
Linux's hv_vmbus would.  The host side is the real mshvstack VMBus server.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.hvcall import HvRegister
from mshvstack.partition import HypercallIntercept, IoPortIntercept, Mshv, PartitionConfig, SintDeliverable
from mshvstack.vmbus import packets
from mshvstack.vmbus.gpadl import GpadlRingMem
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.ring import IncomingRing, OutgoingRing
from mshvstack.vmbus.server import VmbusServer
from mshvstack.vmbus.synic import SynicHost
from mshvstack.vmm.loader.x86boot import long_mode

from guests import assemble

STUB = 0x200000
# Clear of the loader's page tables (0x9000-0xE000) and GDT (0x500).
MAILBOX = 0x30000
POST_INPUT = 0x31000
HYPERCALL_PAGE = 0x32000
SIMP = 0x33000
SIEFP = 0x34000
RING_AREA = 0x400000
COMMAND_PORT = 0xE0
CMD_HYPERCALL, CMD_WRMSR = 1, 2

# The stub: wait for a command (OUT to port 0xE0), run it, loop.
STUB_SOURCE = f"""
1:  out %al, $0xe0
    mov {MAILBOX:#x}, %rax
    cmp $1, %rax
    je 2f
    cmp $2, %rax
    je 3f
    jmp 1b
2:  mov {MAILBOX + 0x08:#x}, %rcx
    mov {MAILBOX + 0x10:#x}, %rdx
    mov {MAILBOX + 0x18:#x}, %r8
    mov ${HYPERCALL_PAGE:#x}, %rax
    call *%rax
    mov %rax, {MAILBOX + 0x20:#x}
    jmp 1b
3:  mov {MAILBOX + 0x28:#x}, %ecx
    mov {MAILBOX + 0x30:#x}, %eax
    mov {MAILBOX + 0x34:#x}, %edx
    wrmsr
    jmp 1b
"""


class GuestChannel:
    """The guest's end of one open channel: its rings in guest RAM."""

    def __init__(self, guest: VmbusGuest, relid: int, connection_id: int, send: OutgoingRing, receive: IncomingRing) -> None:
        self.guest = guest
        self.relid = relid
        self.connection_id = connection_id
        self.send_ring = send
        self.receive_ring = receive

    def send(self, packet: bytes) -> int:
        """Write a packet and ring the host's doorbell; returns HvSignalEvent's status."""
        self.send_ring.write(packet)
        return self.guest.signal_event(self.connection_id)

    def receive(self) -> packets.Packet | None:
        item = self.receive_ring.read()
        return None if item is None else packets.parse(item[0])


class VmbusGuest:
    def __init__(self, providers: list[Provider], workdir: Path, memory: int = 16 << 20) -> None:
        image, _symbols = assemble(STUB_SOURCE, workdir, origin=STUB)
        self.mshv = Mshv.open("sim")
        self.partition = self.mshv.create_partition(PartitionConfig(lapic=True))
        self.partition.initialize()
        self.partition.map_memory(0, memory)
        self.memory = self.partition.memory
        self.memory.write(STUB, image)
        self.vp = self.partition.create_vp(0)
        boot = long_mode(self.memory, STUB, stack=0x80000)
        self.vp.sregs = boot.sregs
        regs = boot.regs
        regs.rflags = 2  # interrupts stay off: messages are polled from the SIMP page
        self.vp.regs = regs
        self.partition.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
        self.synic = SynicHost(self.partition.hv, self.memory, lambda index: self.partition.vps[index])
        self.server = VmbusServer(self.synic, self.memory, providers)
        self._pending_out = False
        self._next_ring = RING_AREA
        self.gpadl_counter = 0xE1E10
        self._run_to_command()
        for msr, value in ((0x40000000, 0x8100000000000000), (0x40000001, HYPERCALL_PAGE | 1),
                           (0x40000083, SIMP | 1), (0x40000082, SIEFP | 1), (0x40000092, 0x50), (0x40000080, 1)):
            self.wrmsr(msr, value)

    # ---- driving the stub
    def _run_to_command(self) -> None:
        """Run the VP until the stub asks for its next command, serving VMBus exits."""
        if self._pending_out:
            (rip,) = self.vp.get_registers([HvRegister.RIP])
            self.vp.set_registers({HvRegister.RIP: rip + 2})
        for _ in range(10_000):
            exit_ = self.vp.run()
            if isinstance(exit_, IoPortIntercept) and exit_.port_number == COMMAND_PORT:
                self._pending_out = True
                return
            if isinstance(exit_, HypercallIntercept):
                self.synic.handle_hypercall(self.vp, exit_)
            elif isinstance(exit_, SintDeliverable):
                self.synic.on_sint_deliverable(self.vp, exit_)
            else:
                raise AssertionError(f"unexpected exit {exit_}")
        raise AssertionError("stub guest never came back")

    def _command(self, values: dict[int, int]) -> int:
        for offset, value in values.items():
            self.memory.write_u64(MAILBOX + offset, value)
        self._run_to_command()
        return self.memory.read_u64(MAILBOX + 0x20)

    def hypercall(self, control: int, rdx: int, r8: int = 0) -> int:
        return self._command({0: CMD_HYPERCALL, 8: control, 0x10: rdx, 0x18: r8}) & 0xFFFF

    def wrmsr(self, index: int, value: int) -> None:
        self._command({0: CMD_WRMSR, 0x28: index, 0x30: value})

    # ---- SynIC
    def post_message(self, payload: bytes, connection_id: int = 1, message_type: int = 1) -> int:
        self.memory.write(POST_INPUT, struct.pack("<IIII", connection_id, 0, message_type, len(payload)) + payload)
        return self.hypercall(int(lib.HVCALL_POST_MESSAGE), POST_INPUT)

    def signal_event(self, connection_id: int, flag: int = 0) -> int:
        return self.hypercall(int(lib.HVCALL_SIGNAL_EVENT) | int(lib.HV_HYPERCALL_FAST_BIT), connection_id | flag << 32)

    def receive_message(self) -> bytes | None:
        """Take the message in SINT2's slot (as Linux does: copy, free, EOM if pending)."""
        slot = SIMP + 2 * 256
        header = self.memory.read(slot, 16)
        message_type, size, flags = struct.unpack_from("<IBB", header)
        if message_type == 0:
            return None
        payload = self.memory.read(slot + 16, size)
        self.memory.write(slot, bytes(4))
        if flags & 1:
            self.wrmsr(0x40000084, 0)  # EOM: the host has more
        return payload

    def messages(self) -> list[bytes]:
        out = []
        while (m := self.receive_message()) is not None:
            out.append(m)
        return out

    def event_flags(self) -> int:
        return int.from_bytes(self.memory.read(SIEFP + 2 * 256, 256), "little")

    # ---- channel management, as hv_vmbus does it
    def connect(self, version: int = int(lib.VMBUS_VERSION_WIN10_V5_3)) -> bytes:
        msg = ffi.new("struct vmbus_channel_initiate_contact *")
        msg.header.msgtype = lib.CHANNELMSG_INITIATE_CONTACT
        msg.vmbus_version_requested = version
        if version >= lib.VMBUS_VERSION_WIN10_V5:
            msg.target.msg_sint = 2
        status = self.post_message(bytes(ffi.buffer(msg)), 4 if version >= lib.VMBUS_VERSION_WIN10_V5 else 1)
        assert status == lib.HV_STATUS_SUCCESS, status
        (reply,) = self.messages()
        return reply

    def request_offers(self) -> list[bytes]:
        assert self.post_message(struct.pack("<II", lib.CHANNELMSG_REQUESTOFFERS, 0)) == 0
        return self.messages()

    def allocate(self, pages: int) -> list[int]:
        start = self._next_ring
        self._next_ring += pages * 4096
        self.memory.write(start, bytes(pages * 4096))
        return [(start >> 12) + i for i in range(pages)]

    def create_gpadl(self, relid: int, pfns: list[int], gpadl_id: int | None = None) -> tuple[int, list[bytes]]:
        gpadl_id = gpadl_id if gpadl_id is not None else self.gpadl_counter
        self.gpadl_counter += 1
        first, rest = pfns[:26], pfns[26:]
        header = struct.pack("<IIIIHHII", lib.CHANNELMSG_GPADL_HEADER, 0, relid, gpadl_id, 8 + 8 * len(pfns), 1,
                             len(pfns) * 4096, 0) + struct.pack(f"<{len(first)}Q", *first)
        assert self.post_message(header) == 0
        while rest:
            chunk, rest = rest[:28], rest[28:]
            body = struct.pack("<IIII", lib.CHANNELMSG_GPADL_BODY, 0, 0, gpadl_id) + struct.pack(f"<{len(chunk)}Q", *chunk)
            assert self.post_message(body) == 0
        return gpadl_id, self.messages()

    def open_channel(self, relid: int, connection_id: int, ring_pages: int = 4) -> tuple[GuestChannel | None, int]:
        pfns = self.allocate(2 * ring_pages)
        gpadl_id, replies = self.create_gpadl(relid, pfns)
        assert struct.unpack_from("<IIIII", replies[-1])[4] == 0, "GPADL_CREATED failed"
        msg = struct.pack("<IIIIIII", lib.CHANNELMSG_OPENCHANNEL, 0, relid, relid, gpadl_id, 0, ring_pages) + bytes(120)
        assert self.post_message(msg) == 0
        replies = self.messages()
        status = struct.unpack_from("<IIIII", replies[-1])[4]
        if status:
            return None, status
        send = OutgoingRing(GpadlRingMem(self.memory, tuple(pfns[:ring_pages])))
        receive = IncomingRing(GpadlRingMem(self.memory, tuple(pfns[ring_pages:])))
        return GuestChannel(self, relid, connection_id, send, receive), 0

    def close(self) -> None:
        self.partition.close()
        self.mshv.close()


def parse_offer(message: bytes) -> dict[str, Any]:
    offer = ffi.from_buffer("struct vmbus_channel_offer_channel *", message)
    import uuid
    return {"class": uuid.UUID(bytes_le=bytes(offer.if_type)), "instance": uuid.UUID(bytes_le=bytes(offer.if_instance)),
            "relid": int(offer.child_relid), "connection_id": int(offer.connection_id), "flags": int(offer.chn_flags)}


def linux_negotiate_response(payload: bytes, framework_prefs: tuple[tuple[int, int], ...],
                             message_prefs: tuple[tuple[int, int], ...]) -> bytes:
    """What Linux's vmbus_prep_negotiate_resp sends back for a host negotiate request."""
    icmsg = bytearray(payload[8:28])
    frame_count, msg_count = struct.unpack_from("<HH", payload, 28)
    entries = [struct.unpack_from("<HH", payload, 36 + 4 * i) for i in range(frame_count + msg_count)]
    host_frames, host_msgs = entries[:frame_count], entries[frame_count:]
    frame = next((v for v in framework_prefs if v in host_frames), None)
    message = next((v for v in message_prefs if v in host_msgs), None)
    if frame is None or message is None:
        body = struct.pack("<HHI", 0, 0, 0)
    else:
        body = struct.pack("<HHIHHHH", 1, 1, 0, *frame, *message)
        struct.pack_into("<HH", icmsg, 0, *frame)
        struct.pack_into("<HH", icmsg, 6, *message)
    struct.pack_into("<H", icmsg, 10, len(body))
    icmsg[17] = 0x5  # TRANSACTION | RESPONSE
    data = bytes(icmsg) + body
    return struct.pack("<II", 1, len(data)) + data


def ic_reply(payload: bytes, body: bytes | None = None, status: int = 0) -> bytes:
    """Echo an IC request as a response (Linux rewrites the buffer in place)."""
    icmsg = bytearray(payload[8:28])
    icmsg[17] = 0x5
    struct.pack_into("<I", icmsg, 12, status)
    new_body = payload[28:] if body is None else body
    struct.pack_into("<H", icmsg, 10, len(new_body))
    data = bytes(icmsg) + new_body
    return struct.pack("<II", 1, len(data)) + data
