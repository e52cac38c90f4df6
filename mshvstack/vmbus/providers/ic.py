"""The integration-component framework: pipe header, IC message header,
version negotiation as Linux does it, and the request/response transaction."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mshvstack.abi import ffi, lib
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.layout import Layout, array
from mshvstack.vmbus.packets import INBAND, Packet

if TYPE_CHECKING:
    from mshvstack.vmbus.channel import Channel

PIPE = ffi.sizeof("struct vmbus_pipe_header")
ICHDR = ffi.sizeof("struct icmsg_hdr")
HEADERS = PIPE + ICHDR
REQUEST = int(lib.ICMSGHDRFLAG_TRANSACTION | lib.ICMSGHDRFLAG_REQUEST)
RESPONSE = int(lib.ICMSGHDRFLAG_TRANSACTION | lib.ICMSGHDRFLAG_RESPONSE)
FRAMEWORK_VERSIONS = ((3, 0), (1, 0))
MAX_IC_MESSAGE = 16 * 1024
NEGOTIATE = Layout("struct icmsg_negotiate", "icframe_vercnt", "icmsg_vercnt")   # then the versions (ic_version)


@dataclass(frozen=True)
class IcMessage:
    msgtype: int
    framework: tuple[int, int]
    version: tuple[int, int]
    status: int
    flags: int
    body: bytes


def encode(msgtype: int, body: bytes, framework: tuple[int, int], version: tuple[int, int],
           flags: int = REQUEST, status: int = 0) -> bytes:
    pipe = ffi.new("struct vmbus_pipe_header *")
    header = ffi.new("struct icmsg_hdr *")
    header.icverframe.major, header.icverframe.minor = framework
    header.icvermsg.major, header.icvermsg.minor = version
    header.icmsgtype, header.icmsgsize, header.status, header.icflags = msgtype, len(body), status, flags
    pipe.packet_type, pipe.data_size = lib.VMBUS_PIPE_TYPE_DATA, ICHDR + len(body)
    return bytes(ffi.buffer(pipe)) + bytes(ffi.buffer(header)) + body


def decode(payload: bytes) -> IcMessage:
    """Parse pipe + IC headers with bounds on every length the guest wrote."""
    if len(payload) < HEADERS:
        raise VmbusProtocolError(f"IC packet of {len(payload)} bytes is shorter than its headers")
    pipe = ffi.from_buffer("struct vmbus_pipe_header *", payload)
    if pipe.packet_type != lib.VMBUS_PIPE_TYPE_DATA or not ICHDR <= pipe.data_size <= min(len(payload) - PIPE, MAX_IC_MESSAGE):
        raise VmbusProtocolError(f"IC pipe header type {pipe.packet_type} size {pipe.data_size} invalid")
    h = ffi.from_buffer("struct icmsg_hdr *", payload[PIPE:HEADERS])
    if h.icmsgsize > pipe.data_size - ICHDR:
        raise VmbusProtocolError(f"IC message size {h.icmsgsize} exceeds its {pipe.data_size - ICHDR}-byte pipe payload")
    return IcMessage(int(h.icmsgtype), (int(h.icverframe.major), int(h.icverframe.minor)),
                     (int(h.icvermsg.major), int(h.icvermsg.minor)), int(h.status), int(h.icflags),
                     payload[HEADERS : HEADERS + int(h.icmsgsize)])


def negotiate_body(framework: tuple[tuple[int, int], ...], versions: tuple[tuple[int, int], ...]) -> bytes:
    offered = framework + versions
    entries = array(NEGOTIATE.ctype, "icversion_data", len(offered)).pack(*(part for version in offered for part in version))
    return NEGOTIATE.pack(len(framework), len(versions)) + entries


def parse_negotiate_response(body: bytes) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The guest's choice (framework, message version), or None if it found no match."""
    if len(body) < NEGOTIATE.size:
        raise VmbusProtocolError("negotiate response too short")
    frame_count, msg_count = NEGOTIATE.unpack(body)
    if frame_count == 0 or msg_count == 0:
        return None
    chosen = array(NEGOTIATE.ctype, "icversion_data", 2)
    if frame_count != 1 or msg_count != 1 or len(body) < NEGOTIATE.size + chosen.size:
        raise VmbusProtocolError(f"negotiate response with counts {frame_count}/{msg_count}")
    fmaj, fmin, vmaj, vmin = chosen.unpack_from(body, NEGOTIATE.size)
    return (fmaj, fmin), (vmaj, vmin)


@dataclass(frozen=True)
class IcState:
    """What every IC negotiated: framework and message versions (empty: not yet)."""

    VERSION: ClassVar[int] = 1
    framework: tuple[int, ...]
    version: tuple[int, ...]
    negotiation_failed: bool
    responses: int


class IcProvider:
    """Base of every IC: negotiates, then runs one request at a time.

    The provider interface and the requests run with the VMBus server's lock
    (providers/base.py).  The condition guards what the host's threads wait
    for (the negotiated version, the open channel, a subclass's answer):
    taken after the server's lock, released before a hook runs (a hook sends,
    and a send can close the channel, whose on_close takes it again)."""

    msgtype: int = 0
    versions: tuple[tuple[int, int], ...] = ()
    name = "ic"
    class_id = uuid.UUID(int=0)
    instance_id = uuid.UUID(int=0)
    pipe_mode = True
    state_type: ClassVar[type] = IcState

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        if instance_id is not None:
            self.instance_id = instance_id
        self.channel: Channel | None = None
        self.framework: tuple[int, int] | None = None
        self.version: tuple[int, int] | None = None
        self.negotiation_failed = False
        self._cond = threading.Condition(threading.Lock())
        self.last_response: IcMessage | None = None
        self.responses = 0
        self.last_seen: float | None = None

    # ---- provider interface
    def on_open(self, channel: Channel) -> bool:
        with self._cond:
            self.channel = channel
            self.framework = self.version = None
            self.negotiation_failed = False
        return True

    def on_opened(self, channel: Channel) -> None:
        body = negotiate_body(((1, 0), (3, 0)), tuple(sorted(self.versions)))
        channel.send_inband(encode(int(lib.ICMSGTYPE_NEGOTIATE), body, (0, 0), (0, 0)))

    def on_close(self, channel: Channel) -> None:
        with self._cond:
            self.channel = None
            self._cond.notify_all()

    def on_packet(self, channel: Channel, packet: Packet) -> None:
        if packet.type != INBAND:
            raise VmbusProtocolError(f"{self.name}: unexpected packet type {packet.type}")
        message = decode(packet.payload)
        if message.flags & RESPONSE != RESPONSE:
            raise VmbusProtocolError(f"{self.name}: guest sent a non-response (flags {message.flags:#x})")
        negotiated = False
        with self._cond:
            self.last_seen = time.monotonic()
            self.responses += 1
            if message.msgtype == lib.ICMSGTYPE_NEGOTIATE:
                chosen = parse_negotiate_response(message.body)
                if chosen is None or chosen[1] not in self.versions:
                    self.negotiation_failed = True
                else:
                    self.framework, self.version = chosen
                    negotiated = True
            else:
                self.last_response = message
        if negotiated:
            self.on_negotiated()
        elif message.msgtype != lib.ICMSGTYPE_NEGOTIATE:
            self.on_response(message)
        with self._cond:   # the waiters look again, at the hook's state too
            self._cond.notify_all()

    # ---- snapshots (a subclass with state of its own wraps these in its record)
    def save(self) -> Any:
        return self.save_ic()

    def restore(self, state: Any, channel: Channel | None) -> None:
        self.restore_ic(state, channel)

    def save_ic(self) -> IcState:
        with self._cond:
            return IcState(self.framework or (), self.version or (), self.negotiation_failed, self.responses)

    def restore_ic(self, state: IcState, channel: Channel | None) -> None:
        framework = tuple(state.framework) if state.framework else None
        version = tuple(state.version) if state.version else None
        if (framework is None) != (version is None) or (framework is not None and framework not in FRAMEWORK_VERSIONS) \
                or (version is not None and (version not in self.versions or channel is None)):
            raise VmbusProtocolError(f"{self.name}: saved versions {state.framework}/{state.version} are not ones it negotiates")
        with self._cond:
            self.channel = channel
            self.framework, self.version = framework, version
            self.negotiation_failed, self.responses = state.negotiation_failed, state.responses
            self._cond.notify_all()

    # ---- for subclasses and users
    def on_negotiated(self) -> None:
        """The guest accepted a version: a device that speaks first does so here
        (with the server's lock, without the condition)."""

    def on_response(self, message: IcMessage) -> None:
        """A response to one of our requests (after negotiation; with the server's lock,
        without the condition: the waiters are woken after it)."""

    @property
    def ready(self) -> bool:
        return self.version is not None and self.channel is not None

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the guest to negotiate (never with the VMBus server's lock held: the answer needs it)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.ready or self.negotiation_failed, timeout) and self.ready

    def send_request(self, body: bytes) -> None:
        if not self.ready or self.channel is None:
            raise VmbusProtocolError(f"{self.name} is not negotiated yet")
        assert self.framework is not None and self.version is not None
        self.channel.send_inband(encode(self.msgtype, body, self.framework, self.version))

    def describe(self) -> dict[str, object]:
        return {"negotiated": self.version is not None, "version": ".".join(map(str, self.version)) if self.version else None,
                "responses": self.responses, "last_seen": self.last_seen}
