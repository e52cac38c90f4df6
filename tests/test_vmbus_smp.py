"""VMBus on every VP: each VP has its own SynIC (SIMP, SIEFP, SINT2, EOM), the
server's messages go to the VP named in INITIATE_CONTACT, a channel's
interrupts to the VP named in OPENCHANNEL and, where the protocol has it,
MODIFYCHANNEL; the guest's hypercalls may come from any VP.

The guest is real code on every VP: a stub that runs the hypercalls and
WRMSRs the test asks of it on that VP, and a SINT2 interrupt handler that
counts per VP (and, when told to, consumes messages as Linux does: copy,
free the slot, a barrier, EOM if a message is pending).  The host side is the
real SynicHost and VmbusServer, driven from the VPs' threads as the machine
drives them.
"""

from __future__ import annotations

import queue
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshvstack.abi import ffi, lib
from mshvstack.hvcall import HvRegister
from mshvstack.partition import HypercallIntercept, Interrupted, IoPortIntercept, Partition, SintDeliverable, Vp
from mshvstack.vmbus import packets
from mshvstack.vmbus.channel import Channel, ChannelState
from mshvstack.vmbus.gpadl import GpadlRingMem
from mshvstack.vmbus.ring import IncomingRing, OutgoingRing
from mshvstack.vmbus.server import MESSAGE_TYPE, VmbusServer
from mshvstack.vmbus.synic import SynicHost

from guests import assemble
from smpguest import CODE, DATA, VP_INDEX_FROM_RSP, lapic_partition, long_mode_vp, prepare


@pytest.fixture
def part() -> Iterator[Partition]:
    with lapic_partition() as part:
        yield part


MAILBOX = DATA + 0x8000          # VP i: 0x100 bytes
INTS, CONSUME, RECEIVED_COUNT = DATA, DATA + 0x40, DATA + 0x80
RECEIVED = DATA + 0x10000        # VP i: u64 payload heads at RECEIVED + 0x8000 * i
HYPERCALL_PAGE = 0x300000
POST_INPUT = 0x301000            # VP i: its own page
SIMP_BASE, SIEFP_BASE = 0x310000, 0x320000
RING_AREA = 0x340000
SINT = int(lib.VMBUS_MESSAGE_SINT)
SINT_VECTOR = 0x50
COMMAND = 0xE0
HYPERCALL, WRMSR, IDLE, SERVE = 1, 2, 3, 4
SLOT = int(lib.HV_MESSAGE_SIZE)
EOM = int(lib.HV_X64_MSR_EOM)
V5_3, V4_1, V4_0 = int(lib.VMBUS_VERSION_WIN10_V5_3), int(lib.VMBUS_VERSION_WIN10_V4_1), int(lib.VMBUS_VERSION_WIN10)

STUB = f"""
    mov %rbx, %r15
    mov %rbx, %r14
    shl $8, %r14
    add ${MAILBOX}, %r14                  /* my mailbox */
next:
    cli
    out %al, ${COMMAND}
    mov (%r14), %rax
    cmp ${HYPERCALL}, %rax
    je hypercall
    cmp ${WRMSR}, %rax
    je wrmsr
    cmp ${IDLE}, %rax
    je idle
    cmp ${SERVE}, %rax
    je serve
    jmp next
hypercall:
    mov 0x08(%r14), %rcx
    mov 0x10(%r14), %rdx
    mov 0x18(%r14), %r8
    mov ${HYPERCALL_PAGE}, %rax
    call *%rax
    mov %rax, 0x20(%r14)
    jmp next
wrmsr:
    mov 0x28(%r14), %ecx
    mov 0x30(%r14), %eax
    mov 0x34(%r14), %edx
    wrmsr
    jmp next
idle:                                     /* take what is pending */
    sti
    nop
    nop
    cli
    jmp next
serve:                                    /* interrupts on until the handler consumed as many messages as asked */
    cli
    mov {RECEIVED_COUNT}(,%r15,4), %eax
    cmp 0x38(%r14), %eax
    jae next
    sti
    hlt
    jmp serve

sint_handler:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
{VP_INDEX_FROM_RSP}
    lock incl {INTS}(,%rdx,4)
    cmpl $0, {CONSUME}(,%rdx,4)
    je 2f
    mov %rdx, %rsi
    shl $12, %rsi
    add ${SIMP_BASE + SINT * SLOT}, %rsi  /* my SINT2 slot */
    cmpl $0, (%rsi)
    je 2f
    mov 16(%rsi), %rax                    /* the payload's first 8 bytes */
    mov {RECEIVED_COUNT}(,%rdx,4), %ecx
    mov %rdx, %rdi
    shl $15, %rdi
    mov %rax, {RECEIVED}(%rdi,%rcx,8)
    incl {RECEIVED_COUNT}(,%rdx,4)
    movl $0, (%rsi)                       /* free the slot, then EOM if the host has more */
    mfence
    testb $1, 5(%rsi)
    jz 2f
    mov ${EOM}, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
2:  mov ${int(lib.HV_X64_MSR_EOI)}, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
"""


class Echo:
    """A device that sends every packet back."""

    name = "echo"
    class_id = uuid.UUID("3f0e3d4f-1a4b-4b8e-9a36-7c2f4e5d6a01")
    instance_id = uuid.UUID("3f0e3d4f-1a4b-4b8e-9a36-7c2f4e5d6a02")
    pipe_mode = False

    def on_open(self, channel: Channel) -> bool:
        return True

    def on_opened(self, channel: Channel) -> None:
        pass

    def on_packet(self, channel: Channel, packet: packets.Packet) -> None:
        channel.send_inband(packet.payload)

    def on_close(self, channel: Channel) -> None:
        pass


class GuestRings:
    def __init__(self, memory: object, pfns: list[int], ring_pages: int) -> None:
        self.send = OutgoingRing(GpadlRingMem(memory, tuple(pfns[:ring_pages])))   # type: ignore[arg-type]
        self.receive = IncomingRing(GpadlRingMem(memory, tuple(pfns[ring_pages:])))   # type: ignore[arg-type]


class SmpVmbusGuest:
    """N VPs, each running the stub on its own thread; commands go to one VP at a time."""

    def __init__(self, part: Partition, tmp_path: Path, vcpus: int) -> None:
        self.part = part
        self.memory = part.memory
        self.vcpus = vcpus
        image, symbols = assemble(STUB, tmp_path, origin=CODE)
        prepare(part, image, {SINT_VECTOR: symbols["sint_handler"]})
        part.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
        self.synic = SynicHost(part.hv, self.memory, lambda index: part.vps[index])
        self.server = VmbusServer(self.synic, self.memory, [Echo(), Echo()], vp_count=vcpus)
        self.vps = [long_mode_vp(part, index) for index in range(vcpus)]
        self._commands: list[queue.Queue[dict[int, int]]] = [queue.Queue() for _ in range(vcpus)]
        self._done = [threading.Event() for _ in range(vcpus)]
        self._busy = [False] * vcpus
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._next_ring = RING_AREA
        self._gpadl = 0xE1E10
        self._threads = [threading.Thread(target=self._run, args=(vp,), name=f"vmbus-vp{vp.index}") for vp in self.vps]
        for thread in self._threads:
            thread.start()
        for vp in range(vcpus):
            if vp == 0:   # partition-wide: once
                self.wrmsr(0, int(lib.HV_X64_MSR_GUEST_OS_ID), 0x8100000000000000)
                self.wrmsr(0, int(lib.HV_X64_MSR_HYPERCALL), HYPERCALL_PAGE | int(lib.HV_X64_MSR_HYPERCALL_ENABLE))
            self.wrmsr(vp, int(lib.HV_X64_MSR_SIMP), self.simp(vp) | int(lib.HV_SYNIC_SIMP_ENABLE))
            self.wrmsr(vp, int(lib.HV_X64_MSR_SIEFP), self.siefp(vp) | int(lib.HV_SYNIC_SIEFP_ENABLE))
            self.wrmsr(vp, int(lib.HV_X64_MSR_SINT0) + SINT, SINT_VECTOR)
            self.wrmsr(vp, int(lib.HV_X64_MSR_SCONTROL), int(lib.HV_SYNIC_CONTROL_ENABLE))

    # ---- the VPs' threads, as the machine runs them
    def _run(self, vp: Vp) -> None:
        try:
            while not self._stop.is_set():
                exit_ = vp.run()
                if isinstance(exit_, Interrupted):
                    continue
                if isinstance(exit_, HypercallIntercept):
                    self.synic.handle_hypercall(vp, exit_)
                elif isinstance(exit_, SintDeliverable):
                    self.synic.on_sint_deliverable(vp, exit_)
                elif isinstance(exit_, IoPortIntercept) and exit_.port_number == COMMAND:
                    vp.set_registers({HvRegister.RIP: exit_.header.next_rip})
                    self._next_command(vp)
                else:
                    raise AssertionError(f"VP {vp.index}: unexpected exit {exit_}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            self.errors.append(exc)
            for done in self._done:
                done.set()

    def _next_command(self, vp: Vp) -> None:
        index = vp.index
        if self._busy[index]:
            self._busy[index] = False
            self._done[index].set()
        while not self._stop.is_set():
            try:
                values = self._commands[index].get(timeout=0.05)
            except queue.Empty:
                continue
            for offset, value in values.items():
                self.memory.write(MAILBOX + 0x100 * index + offset, struct.pack("<Q", value))
            self._busy[index] = True
            return

    def command(self, vp: int, values: dict[int, int], timeout: float = 60.0) -> int:
        self._done[vp].clear()
        self._commands[vp].put(values)
        assert self._done[vp].wait(timeout), f"VP {vp} did not finish its command"
        if self.errors:
            raise self.errors[0]
        return int(struct.unpack("<Q", self.memory.read(MAILBOX + 0x100 * vp + 0x20, 8))[0])

    def close(self) -> None:
        self._stop.set()
        for vp in self.vps:
            vp.kick()
        for thread in self._threads:
            thread.join(timeout=30)
        self.server.close()

    # ---- guest operations on a chosen VP
    @staticmethod
    def simp(vp: int) -> int:
        return SIMP_BASE + 0x1000 * vp

    @staticmethod
    def siefp(vp: int) -> int:
        return SIEFP_BASE + 0x1000 * vp

    def wrmsr(self, vp: int, msr: int, value: int) -> None:
        self.command(vp, {0: WRMSR, 0x28: msr, 0x30: value})

    def idle(self, vp: int) -> None:
        self.command(vp, {0: IDLE})

    def hypercall(self, vp: int, control: int, rdx: int, r8: int = 0) -> int:
        return self.command(vp, {0: HYPERCALL, 8: control, 0x10: rdx, 0x18: r8}) & 0xFFFF

    def post(self, vp: int, payload: bytes, connection_id: int = int(lib.VMBUS_MESSAGE_CONNECTION_ID)) -> None:
        page = POST_INPUT + 0x1000 * vp
        self.memory.write(page, struct.pack("<IIII", connection_id, 0, MESSAGE_TYPE, len(payload)) + payload)
        assert self.hypercall(vp, int(lib.HVCALL_POST_MESSAGE), page) == lib.HV_STATUS_SUCCESS

    def signal(self, vp: int, connection_id: int) -> None:
        status = self.hypercall(vp, int(lib.HVCALL_SIGNAL_EVENT) | int(lib.HV_HYPERCALL_FAST_BIT), connection_id)
        assert status == lib.HV_STATUS_SUCCESS

    def take_message(self, vp: int) -> bytes | None:
        """The message in VP ``vp``'s SINT2 slot, as Linux takes it (EOM on that VP if more wait)."""
        slot = self.simp(vp) + SINT * SLOT
        message_type, size, flags = struct.unpack("<IBB", self.memory.read(slot, 6))
        if message_type == lib.HVMSG_NONE:
            return None
        payload = self.memory.read(slot + 16, size)
        self.memory.write(slot, bytes(4))
        if flags & 1:
            self.wrmsr(vp, EOM, 0)
        return payload

    def messages(self, vp: int) -> list[bytes]:
        out = []
        while (message := self.take_message(vp)) is not None:
            out.append(message)
        return out

    def interrupts(self, vp: int) -> int:
        return int(struct.unpack("<I", self.memory.read(INTS + 4 * vp, 4))[0])

    def event_flags(self, vp: int) -> int:
        return int.from_bytes(self.memory.read(self.siefp(vp) + SINT * 256, 256), "little")

    def clear_event_flags(self, vp: int) -> None:
        self.memory.write(self.siefp(vp) + SINT * 256, bytes(256))

    # ---- channel management, as hv_vmbus does it
    def connect(self, from_vp: int, target_vcpu: int, version: int = V5_3) -> None:
        msg = ffi.new("struct vmbus_channel_initiate_contact *")
        msg.header.msgtype = lib.CHANNELMSG_INITIATE_CONTACT
        msg.vmbus_version_requested = version
        msg.target_vcpu = target_vcpu
        connection = int(lib.VMBUS_MESSAGE_CONNECTION_ID)
        if version >= lib.VMBUS_VERSION_WIN10_V5:
            msg.target.msg_sint = SINT
            connection = int(lib.VMBUS_MESSAGE_CONNECTION_ID_4)
        self.post(from_vp, bytes(ffi.buffer(msg)), connection)

    def open(self, from_vp: int, relid: int, target_vp: int, ring_pages: int = 2) -> tuple[GuestRings, int, int]:
        """GPADL and OPENCHANNEL; returns the rings, the GPADL_CREATED and the open result statuses
        (read back from the message VP by the caller's ``replies``)."""
        pfns = [(self._next_ring >> 12) + i for i in range(2 * ring_pages)]
        self._next_ring += 2 * ring_pages * 4096
        self.memory.write(pfns[0] << 12, bytes(2 * ring_pages * 4096))
        gpadl = self._gpadl
        self._gpadl += 1
        header = struct.pack("<IIIIHHII", lib.CHANNELMSG_GPADL_HEADER, 0, relid, gpadl, 8 + 8 * len(pfns), 1,
                             len(pfns) * 4096, 0) + struct.pack(f"<{len(pfns)}Q", *pfns)
        self.post(from_vp, header)
        self.post(from_vp, struct.pack("<IIIIIII", lib.CHANNELMSG_OPENCHANNEL, 0, relid, relid, gpadl, target_vp, ring_pages)
                  + bytes(120))
        return GuestRings(self.memory, pfns, ring_pages), gpadl, relid

    def modify(self, from_vp: int, relid: int, target_vp: int) -> None:
        self.post(from_vp, struct.pack("<IIII", lib.CHANNELMSG_MODIFYCHANNEL, 0, relid, target_vp))


def _msgtype(message: bytes) -> int:
    return int(struct.unpack_from("<I", message)[0])


@pytest.fixture
def make_guest(part: Partition, tmp_path: Path) -> Iterator[object]:
    guests: list[SmpVmbusGuest] = []

    def make(vcpus: int) -> SmpVmbusGuest:
        guests.append(SmpVmbusGuest(part, tmp_path, vcpus))
        return guests[-1]

    yield make
    for guest in guests:
        guest.close()


def _echo(guest: SmpVmbusGuest, rings: GuestRings, from_vp: int, connection_id: int, payload: bytes) -> None:
    """Send a packet from ``from_vp`` and wait until the host's echo is in the guest's ring."""
    rings.send.write(packets.inband(payload))
    guest.signal(from_vp, connection_id)
    item = rings.receive.read()
    assert item is not None and packets.parse(item[0]).payload == payload


@pytest.mark.parametrize("vcpus", [2, 4])
def test_messages_and_channel_interrupts_go_to_the_vps_the_guest_names(make_guest: object, vcpus: int) -> None:
    guest: SmpVmbusGuest = make_guest(vcpus)   # type: ignore[operator]
    message_vp = vcpus - 1
    others = [vp for vp in range(vcpus) if vp != message_vp]

    # INITIATE_CONTACT from VP 0, naming the last VP for messages.
    guest.connect(from_vp=0, target_vcpu=message_vp)
    (reply,) = guest.messages(message_vp)
    assert _msgtype(reply) == lib.CHANNELMSG_VERSION_RESPONSE and reply[8] == 1
    assert all(guest.take_message(vp) is None for vp in others)
    guest.idle(message_vp)
    assert guest.interrupts(message_vp) == 1 and all(guest.interrupts(vp) == 0 for vp in others)

    # Offers: more messages than one slot holds, taken on the message VP with EOMs there.
    guest.post(0, struct.pack("<II", lib.CHANNELMSG_REQUESTOFFERS, 0))
    offers = guest.messages(message_vp)
    assert [_msgtype(m) for m in offers] == [lib.CHANNELMSG_OFFERCHANNEL] * 2 + [lib.CHANNELMSG_ALLOFFERS_DELIVERED]
    first, second = (struct.unpack_from("<I", m, ffi.offsetof("struct vmbus_channel_offer_channel", "child_relid"))[0]
                     for m in offers[:2])
    connection = {relid: guest.server.channels[relid].connection_id for relid in (first, second)}

    # Channel 1 opened from VP 0 with its interrupts on VP 1.
    rings, _gpadl, relid = guest.open(0, first, target_vp=1)
    created, opened = guest.messages(message_vp)
    assert _msgtype(created) == lib.CHANNELMSG_GPADL_CREATED and struct.unpack_from("<I", created, 16)[0] == 0
    assert _msgtype(opened) == lib.CHANNELMSG_OPENCHANNEL_RESULT and struct.unpack_from("<I", opened, 16)[0] == 0
    for vp in range(vcpus):
        guest.idle(vp)   # what the messages left pending
    before = [guest.interrupts(vp) for vp in range(vcpus)]
    _echo(guest, rings, 0, connection[relid], b"to VP 1 please!!")
    assert guest.event_flags(1) == 1 << relid and all(guest.event_flags(vp) == 0 for vp in range(vcpus) if vp != 1)
    for vp in range(vcpus):
        guest.idle(vp)
    after = [guest.interrupts(vp) for vp in range(vcpus)]
    assert [a - b for a, b in zip(after, before)] == [1 if vp == 1 else 0 for vp in range(vcpus)]
    guest.clear_event_flags(1)

    # MODIFYCHANNEL (5.3: answered on the message VP) moves them to VP 0.
    guest.modify(1, relid, 0)
    (response,) = guest.messages(message_vp)
    assert _msgtype(response) == lib.CHANNELMSG_MODIFYCHANNEL_RESPONSE
    assert struct.unpack_from("<II", response, 8) == (relid, 0)
    _echo(guest, rings, 1, connection[relid], b"now to VP 0 ....")
    assert guest.event_flags(0) == 1 << relid and all(guest.event_flags(vp) == 0 for vp in range(1, vcpus))
    guest.clear_event_flags(0)

    # A VP that does not exist: MODIFYCHANNEL fails and changes nothing; OPENCHANNEL fails.
    guest.modify(0, relid, vcpus)
    (response,) = guest.messages(message_vp)
    assert struct.unpack_from("<I", response, 12)[0] != 0
    assert guest.server.channels[relid].target_vp == 0
    _rings2, _gpadl2, relid2 = guest.open(0, second, target_vp=vcpus)
    _created, opened = guest.messages(message_vp)
    assert struct.unpack_from("<I", opened, 16)[0] != 0
    assert guest.server.channels[relid2].state is ChannelState.OFFERED
    assert not guest.errors


@pytest.mark.parametrize("version, answered", [(V4_0, None), (V4_1, False), (V5_3, True)])
def test_modifychannel_follows_the_negotiated_version(make_guest: object, version: int, answered: bool | None) -> None:
    """Before 4.1 there is no MODIFYCHANNEL (refused, the target stays); 4.1 to 5.2 move
    the channel without an answer; 5.3 answers."""
    guest: SmpVmbusGuest = make_guest(2)   # type: ignore[operator]
    guest.connect(from_vp=0, target_vcpu=0, version=version)
    guest.messages(0)
    guest.post(0, struct.pack("<II", lib.CHANNELMSG_REQUESTOFFERS, 0))
    offers = guest.messages(0)
    relid = struct.unpack_from("<I", offers[0], ffi.offsetof("struct vmbus_channel_offer_channel", "child_relid"))[0]
    rings, _gpadl, _ = guest.open(0, relid, target_vp=0)
    assert len(guest.messages(0)) == 2
    errors = guest.server.protocol_errors
    guest.modify(0, relid, 1)
    replies = guest.messages(0)
    channel = guest.server.channels[relid]
    if answered is None:
        assert replies == [] and channel.target_vp == 0 and guest.server.protocol_errors == errors + 1
    else:
        assert channel.target_vp == 1
        assert [_msgtype(m) for m in replies] == ([lib.CHANNELMSG_MODIFYCHANNEL_RESPONSE] if answered else [])
    _echo(guest, rings, 0, channel.connection_id, b"where is it now?")
    assert guest.event_flags(channel.target_vp) == 1 << relid


MESSAGES = 1500


@pytest.mark.parametrize("poster", ["host thread", "other VP"])
def test_messages_posted_while_the_target_vp_consumes_them_are_all_delivered_in_order(make_guest: object,
                                                                                      poster: str) -> None:
    """VP 1 takes messages in its interrupt handler as Linux does, while the host posts them
    from another thread: a slot freed between the host's busy check and its MessagePending,
    or an EOM before the deliverability notification is armed, must lose nothing."""
    guest: SmpVmbusGuest = make_guest(2)   # type: ignore[operator]
    guest.memory.write(CONSUME + 4, struct.pack("<I", 1))
    payloads = [struct.pack("<Q", 0x5EC0000000000000 | n) + bytes(8) for n in range(MESSAGES)]

    def post_all() -> None:
        for payload in payloads:
            guest.synic.post_message(1, SINT, MESSAGE_TYPE, payload)

    if poster == "host thread":
        posting = threading.Thread(target=post_all)
        posting.start()
    else:   # VP 0's thread: the way a reply to VP 0's hypercall reaches VP 1
        guest.server.synic.register_message_port(0x77, lambda _type, _payload: (post_all(), 0)[1])
        posting = threading.Thread(target=guest.post, args=(0, b"go", 0x77))
        posting.start()
    guest.command(1, {0: SERVE, 0x38: MESSAGES}, timeout=120)
    posting.join(timeout=60)
    received = struct.unpack(f"<{MESSAGES}Q", guest.memory.read(RECEIVED + 0x8000, 8 * MESSAGES))
    assert [value & 0xFFFFFFFF for value in received] == list(range(MESSAGES))
    assert guest.synic.pending_messages() == 0


# ---- the two interleavings that lost a message, replayed deterministically
SIMP_PAGE = 0x10000


@pytest.fixture
def synic_vp(part: Partition) -> Iterator[tuple[Vp, object]]:
    """VP 0 with its SynIC on (no guest code runs: the test plays the guest), and its SimVp."""
    vp = part.create_vp(0)
    vp.set_registers({HvRegister.SIMP: SIMP_PAGE | int(lib.HV_SYNIC_SIMP_ENABLE), HvRegister.SINT2: SINT_VECTOR,
                      HvRegister.SCONTROL: int(lib.HV_SYNIC_CONTROL_ENABLE)})
    yield vp, part.mshv.backend.vp_of(vp.fd)   # type: ignore[attr-defined]


def _slot_message(part: Partition) -> bytes:
    slot = SIMP_PAGE + SINT * SLOT
    message_type, size = struct.unpack("<IB", part.memory.read(slot, 5))
    return part.memory.read(slot + 16, size) if message_type else b""


def test_a_slot_freed_while_the_hypervisor_marks_it_pending_takes_the_message(part: Partition, synic_vp: tuple[Vp, object],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest frees the slot and reads MessagePending (clear: no EOM) between the
    hypervisor's busy check and its MessagePending store: the message must go in now,
    since no EOM will ever ask for it."""
    _vp, sim = synic_vp
    memory = sim.partition.memory   # type: ignore[attr-defined]
    message = ffi.new("struct hv_message *")
    message.header.message_type = MESSAGE_TYPE
    message.header.payload_size = 8
    assert sim.post_message(SINT, bytes(ffi.buffer(message))) == lib.HV_STATUS_SUCCESS   # type: ignore[attr-defined]
    slot = SIMP_PAGE + SINT * SLOT
    flags = slot + ffi.offsetof("struct hv_message_header", "message_flags")
    write = memory.write
    guest_saw: list[int] = []

    def interleaved(gpa: int, data: bytes) -> None:
        if gpa == flags and not guest_saw:
            write(slot, bytes(4))                          # the guest: message_type = HVMSG_NONE; mb();
            guest_saw.append(memory.read(flags, 1)[0] & 1)  # ... if (msg_pending) EOM: not yet set
        write(gpa, data)

    monkeypatch.setattr(memory, "write", interleaved)
    message.u.payload[0] = 0x42
    status = sim.post_message(SINT, bytes(ffi.buffer(message)))   # type: ignore[attr-defined]
    assert guest_saw == [0]
    assert status == lib.HV_STATUS_SUCCESS and _slot_message(part)[0] == 0x42


def test_an_eom_before_the_deliverability_notification_is_armed_loses_nothing(part: Partition,
                                                                            synic_vp: tuple[Vp, object]) -> None:
    """The host's post finds the slot busy; before it arms the deliverability notification,
    the guest (on its own VP) frees the slot and writes EOM, which notifies nobody: the
    host must try again once armed."""
    vp, sim = synic_vp
    armed: list[int] = []

    class GuestRacesTheArming:
        index = 0

        def get_registers(self, names: list[int]) -> list[int]:
            return vp.get_registers(names)

        def set_registers(self, values: dict[int, int]) -> None:
            if not armed:
                part.memory.write(SIMP_PAGE + SINT * SLOT, bytes(4))   # the guest frees the slot ...
                sim.end_of_message()                                  # type: ignore[attr-defined]  # ... and writes EOM
                armed.append(1)
            vp.set_registers(values)

    synic = SynicHost(part.hv, part.memory, lambda index: GuestRacesTheArming())
    synic.post_message(0, SINT, MESSAGE_TYPE, b"first...")
    synic.post_message(0, SINT, MESSAGE_TYPE, b"second..")
    assert armed and _slot_message(part) == b"second.."
    assert synic.pending_messages() == 0
