"""The channel-management state machine (vmbus_protocol.md §2–3).

One VmbusServer per partition.  Guest messages arrive on the message
connection ids (1, and 4 for protocol 5.0+ INITIATE_CONTACT); every field is
validated, and a bad message is logged and answered with a failure where
the protocol has one — never an exception out of the VP loop.

Locks (docs/concurrency.md): the server's lock guards the connection, the
GPADL table, every channel and every provider; it is taken once, at the
entry points (a guest message, a guest doorbell, the drain worker, a host
operation through ``call``), and everything below them assumes it.  Taken
while holding it, in this order: an IC provider's condition, a ring's lock,
the SynicHost's lock, then the partition's (through hypercalls).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, ParamSpec, TypeVar

from mshvstack.abi import ffi, lib
from mshvstack.partition.memory import GuestMemory
from mshvstack.vmbus.channel import Channel, ChannelSavedState, ChannelState
from mshvstack.vmbus.errors import VmbusProtocolError
from mshvstack.vmbus.gpadl import GPADL_BODY, GPADL_HEADER, MAX_GPADLS, MAX_PENDING_GPADLS, GpadlState, GpadlTable, PendingGpadlState
from mshvstack.vmbus.layout import Layout
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.synic import SynicHost, SynicHostState

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = tuple(int(getattr(lib, f"VMBUS_VERSION_{n}")) for n in (
    "WIN8", "WIN8_1", "WIN10", "WIN10_V4_1", "WIN10_V5", "WIN10_V5_1", "WIN10_V5_2", "WIN10_V5_3"))
VERSION_5_0 = int(lib.VMBUS_VERSION_WIN10_V5)
VERSION_3_0 = int(lib.VMBUS_VERSION_WIN8_1)
VERSION_4_1 = int(lib.VMBUS_VERSION_WIN10_V4_1)    # MODIFYCHANNEL
VERSION_5_3 = int(lib.VMBUS_VERSION_WIN10_V5_3)    # MODIFYCHANNEL_RESPONSE
NO_INTERRUPT = int(lib.VMBUS_VP_INDEX_DISABLE_INTERRUPT)
MESSAGE_TYPE = int(lib.VMBUS_SYNIC_MESSAGE_TYPE)
OK = int(lib.HV_STATUS_SUCCESS)
INVALID_INPUT = int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
INSUFFICIENT_BUFFERS = int(lib.HV_STATUS_INSUFFICIENT_BUFFERS)
GPADL_FAILED = 0x8000FFFF
OPEN_FAILED = 0x8000FFFF
MODIFY_FAILED = 0x8000FFFF
MESSAGE_HEADER = Layout("struct vmbus_channel_message_header", "msgtype")
HEADER = MESSAGE_HEADER.size
GPADL_TEARDOWN = Layout("struct vmbus_channel_gpadl_teardown", "child_relid", "gpadl")
CLOSE_CHANNEL = Layout("struct vmbus_channel_close_channel", "child_relid")
RELID_RELEASED = Layout("struct vmbus_channel_relid_released", "child_relid")
MODIFY_CHANNEL = Layout("struct vmbus_channel_modifychannel", "child_relid", "target_vp")
P = ParamSpec("P")
T = TypeVar("T")


def _min_sizes() -> dict[int, int]:
    sizes = {"REQUESTOFFERS": "vmbus_channel_message_header", "OPENCHANNEL": "vmbus_channel_open_channel",
             "CLOSECHANNEL": "vmbus_channel_close_channel", "GPADL_HEADER": "vmbus_channel_gpadl_header",
             "GPADL_BODY": "vmbus_channel_gpadl_body", "GPADL_TEARDOWN": "vmbus_channel_gpadl_teardown",
             "RELID_RELEASED": "vmbus_channel_relid_released", "INITIATE_CONTACT": "vmbus_channel_initiate_contact",
             "UNLOAD": "vmbus_channel_message_header", "MODIFYCHANNEL": "vmbus_channel_modifychannel"}
    return {int(getattr(lib, f"CHANNELMSG_{m}")): ffi.sizeof(f"struct {s}") for m, s in sizes.items()}


MIN_SIZES = _min_sizes()


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"


@dataclass(frozen=True)
class VmbusState:
    """The connection, its GPADLs (in progress too) and every channel still offered
    (snapshot_migration.md §4: relids, connection ids and GPADLs are kept)."""

    VERSION: ClassVar[int] = 1
    connected: bool
    version: int
    message_vp: int
    message_sint: int
    offers_requested: bool
    protocol_errors: int
    gpadls: tuple[GpadlState, ...] = field(metadata={"max_items": MAX_GPADLS})
    pending_gpadls: tuple[PendingGpadlState, ...] = field(metadata={"max_items": MAX_PENDING_GPADLS})
    channels: tuple[ChannelSavedState, ...] = field(metadata={"max_items": MAX_GPADLS})


@dataclass(frozen=True)
class VmbusRecords:
    """Everything the VMBus host saves: its own state, the SynIC messages waiting for
    delivery and each channel's provider state (by relid)."""

    server: VmbusState
    synic: SynicHostState
    providers: dict[int, Any]


def _message(ctype: str, **fields: Any) -> bytes:
    msg = ffi.new(f"struct {ctype} *")
    for name, value in fields.items():
        setattr(msg, name, value)
    return bytes(ffi.buffer(msg))


class VmbusServer:
    """``vp_count``: the partition's VPs (target VPs beyond them are refused; None: not checked).

    The public methods and the two guest entry points (``on_message``, ``_doorbell``)
    take the server's lock; every other private method runs with it held.
    """

    def __init__(self, synic: SynicHost, memory: GuestMemory, providers: list[Provider], vp_count: int | None = None) -> None:
        self.synic = synic
        self.memory = memory
        self.vp_count = vp_count
        # Guards everything below and every channel and provider (see the module docstring).
        # Not reentrant: taken at the entry points only; helpers that need it held say so.
        self._lock = threading.Lock()
        self.state = ConnectionState.DISCONNECTED
        self.version = 0
        self.message_vp = 0
        self.message_sint = int(lib.VMBUS_MESSAGE_SINT)
        self.offers_requested = False
        self.gpadls = GpadlTable(memory)
        self.channels: dict[int, Channel] = {}
        self.protocol_errors = 0
        for relid, provider in enumerate(providers, start=1):
            self.channels[relid] = Channel(relid, provider, synic, memory, defer=self._defer_locked, doorbell=self._doorbell,
                                           gpadls=self.gpadls)
        # Channels whose doorbell work was cut at its budget, drained by a worker one budget at a time
        # (the condition is the server's lock itself: the worker holds it for each pass).
        self._work = threading.Condition(self._lock)
        self._deferred: set[int] = set()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._handlers: dict[int, Callable[[bytes], None]] = {
            lib.CHANNELMSG_INITIATE_CONTACT: self._initiate_contact,
            lib.CHANNELMSG_REQUESTOFFERS: self._request_offers,
            lib.CHANNELMSG_GPADL_HEADER: self._gpadl_header,
            lib.CHANNELMSG_GPADL_BODY: self._gpadl_body,
            lib.CHANNELMSG_GPADL_TEARDOWN: self._gpadl_teardown,
            lib.CHANNELMSG_OPENCHANNEL: self._open_channel,
            lib.CHANNELMSG_CLOSECHANNEL: self._close_channel,
            lib.CHANNELMSG_RELID_RELEASED: self._relid_released,
            lib.CHANNELMSG_UNLOAD: self._unload,
            lib.CHANNELMSG_MODIFYCHANNEL: self._modify_channel,
        }
        synic.register_message_port(int(lib.VMBUS_MESSAGE_CONNECTION_ID), self.on_message)
        synic.register_message_port(int(lib.VMBUS_MESSAGE_CONNECTION_ID_4), self.on_message)

    # ---- guest -> host
    def on_message(self, message_type: int, payload: bytes) -> int:
        """A guest HvPostMessage for VMBus (on the VP's thread, no lock held): returns the hypercall status."""
        if message_type != MESSAGE_TYPE or len(payload) < HEADER:
            return INVALID_INPUT
        (msgtype,) = MESSAGE_HEADER.unpack(payload)
        log.debug("VMBus: channel message type %d, %d bytes", msgtype, len(payload))
        handler = self._handlers.get(msgtype)
        with self._lock:
            if handler is None or len(payload) < MIN_SIZES.get(msgtype, HEADER):
                self._protocol_error(f"message type {msgtype} ({len(payload)} bytes) not accepted")
                return OK
            if self.state is ConnectionState.DISCONNECTED and msgtype != lib.CHANNELMSG_INITIATE_CONTACT:
                self._protocol_error(f"message type {msgtype} before INITIATE_CONTACT")
                return OK
            try:
                handler(payload)
            except VmbusProtocolError as exc:
                self._protocol_error(str(exc))
        return OK

    def _doorbell(self, channel: Channel) -> None:
        """A guest HvSignalEvent on an open channel's connection id (on the VP's thread, no lock held)."""
        with self._lock:
            channel.on_doorbell()

    def _vp_exists(self, vp_index: int) -> bool:
        return vp_index < (self.vp_count if self.vp_count is not None else int(lib.HV_MAX_VP_INDEX) + 1)

    def _protocol_error(self, what: str) -> None:
        self.protocol_errors += 1
        log.warning("VMBus: %s", what)

    def _send(self, ctype: str, **fields: Any) -> None:
        payload = _message(ctype, **fields)
        self.synic.post_message(self.message_vp, self.message_sint, MESSAGE_TYPE, payload)

    def _header(self, msgtype: int) -> Any:
        header = ffi.new("struct vmbus_channel_message_header *")
        header.msgtype = msgtype
        return header[0]

    def _initiate_contact(self, payload: bytes) -> None:
        msg = ffi.from_buffer("struct vmbus_channel_initiate_contact *", payload)
        version = int(msg.vmbus_version_requested)
        if self.state is ConnectionState.CONNECTED:
            self._reset()  # a new INITIATE_CONTACT implicitly unloads (kexec, firmware hand-over)
        target_vp = int(msg.target_vcpu) if version >= VERSION_3_0 else 0
        sint = int(msg.target.msg_sint) if version >= VERSION_5_0 else int(lib.VMBUS_MESSAGE_SINT)
        known_vp = self._vp_exists(target_vp)
        # Messages go to the VP the guest named (from 3.0), on its SIMP; a VP that does not exist hears nothing.
        self.message_vp, self.message_sint = target_vp if known_vp else 0, sint if 0 < sint < 16 else int(lib.VMBUS_MESSAGE_SINT)
        supported = version in SUPPORTED_VERSIONS and known_vp
        if not known_vp:
            log.warning("VMBus: INITIATE_CONTACT names VP %d, which does not exist", target_vp)
        if supported:
            self.version = version
            self.state = ConnectionState.CONNECTED
            log.info("VMBus: the guest connected with protocol %d.%d", version >> 16, version & 0xFFFF)
        else:
            log.info("VMBus: the guest asked for protocol %#x, which is not offered", version)
        self._send("vmbus_channel_version_response", header=self._header(lib.CHANNELMSG_VERSION_RESPONSE),
                   version_supported=int(supported), connection_state=0 if supported else 2,
                   msg_conn_id=int(lib.VMBUS_MESSAGE_CONNECTION_ID))

    def _request_offers(self, payload: bytes) -> None:
        if self.offers_requested:
            raise VmbusProtocolError("REQUESTOFFERS sent twice on one connection")
        self.offers_requested = True
        for channel in self.channels.values():
            if channel.state is not ChannelState.RESCINDED:
                self._offer(channel)
                log.info("VMBus: offered channel %d (%s)", channel.relid, channel.provider.name)
        self._send("vmbus_channel_message_header", msgtype=lib.CHANNELMSG_ALLOFFERS_DELIVERED)

    def _offer(self, channel: Channel) -> None:
        offer = ffi.new("struct vmbus_channel_offer_channel *")
        offer.header.msgtype = lib.CHANNELMSG_OFFERCHANNEL
        provider = channel.provider
        ffi.memmove(offer.if_type, provider.class_id.bytes_le, 16)
        ffi.memmove(offer.if_instance, provider.instance_id.bytes_le, 16)
        if provider.pipe_mode:
            offer.chn_flags = lib.VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE | lib.VMBUS_CHANNEL_NAMED_PIPE_MODE
            offer.pipe.pipe_mode = lib.VMBUS_PIPE_MODE_MESSAGE
        offer.child_relid = channel.relid
        offer.monitorid = 0xFF
        offer.is_dedicated_interrupt = 1
        offer.connection_id = channel.connection_id
        self.synic.post_message(self.message_vp, self.message_sint, MESSAGE_TYPE, bytes(ffi.buffer(offer)))

    def _channel(self, relid: int) -> Channel:
        channel = self.channels.get(relid)
        if channel is None:
            raise VmbusProtocolError(f"no channel with relid {relid}")
        return channel

    def _gpadl_header(self, payload: bytes) -> None:
        relid, gpadl_id, _buflen, _count = GPADL_HEADER.unpack(payload)
        try:
            self._channel(relid)
            gpadl = self.gpadls.header(payload)
        except VmbusProtocolError as exc:
            self.gpadls.abandon(gpadl_id)
            self._gpadl_created(relid, gpadl_id, GPADL_FAILED)
            raise exc
        if gpadl is not None:
            self._gpadl_created(relid, gpadl_id, 0)

    def _gpadl_body(self, payload: bytes) -> None:
        try:
            gpadl_id, gpadl = self.gpadls.body(payload)
        except VmbusProtocolError:
            (gpadl_id,) = GPADL_BODY.unpack(payload)
            self.gpadls.abandon(gpadl_id)
            raise
        if gpadl is not None:
            self._gpadl_created(gpadl.relid, gpadl_id, 0)

    def _gpadl_created(self, relid: int, gpadl_id: int, status: int) -> None:
        self._send("vmbus_channel_gpadl_created", header=self._header(lib.CHANNELMSG_GPADL_CREATED),
                   child_relid=relid, gpadl=gpadl_id, creation_status=status)

    def _gpadl_teardown(self, payload: bytes) -> None:
        _relid, gpadl_id = GPADL_TEARDOWN.unpack(payload)
        for channel in self.channels.values():
            if channel.ring_gpadl is not None and channel.ring_gpadl.gpadl_id == gpadl_id:
                channel.close()  # the guest tore down a ring still in use: stop touching it first
        self.gpadls.teardown(gpadl_id)
        self._send("vmbus_channel_gpadl_torndown", header=self._header(lib.CHANNELMSG_GPADL_TORNDOWN), gpadl=gpadl_id)

    def _open_channel(self, payload: bytes) -> None:
        msg = ffi.from_buffer("struct vmbus_channel_open_channel *", payload)
        relid, open_id = int(msg.child_relid), int(msg.openid)
        status = OPEN_FAILED
        try:
            channel = self._channel(relid)
            if channel.state is not ChannelState.OFFERED:
                raise VmbusProtocolError(f"OPENCHANNEL for channel {relid} which is {channel.state.value}")
            gpadl = self.gpadls.established.get(int(msg.ringbuffer_gpadlhandle))
            if gpadl is None:
                raise VmbusProtocolError(f"OPENCHANNEL {relid}: unknown ring GPADL {int(msg.ringbuffer_gpadlhandle):#x}")
            target_vp = int(msg.target_vp) if self.version >= int(lib.VMBUS_VERSION_WIN8) else 0
            if target_vp != NO_INTERRUPT and not self._vp_exists(target_vp):
                raise VmbusProtocolError(f"OPENCHANNEL {relid}: target VP {target_vp} does not exist")
            channel.open(gpadl, int(msg.downstream_ringbuffer_pageoffset), target_vp)
            if channel.provider.on_open(channel):
                status = 0
            else:
                channel.close()
        finally:
            self._send("vmbus_channel_open_result", header=self._header(lib.CHANNELMSG_OPENCHANNEL_RESULT),
                       child_relid=relid, openid=open_id, status=status)
        if status == 0:
            log.info("VMBus: the guest opened channel %d (%s)", relid, channel.provider.name)
            channel.provider.on_opened(channel)  # host-first devices (ICs) speak now

    def _close_channel(self, payload: bytes) -> None:
        (relid,) = CLOSE_CHANNEL.unpack(payload)
        self._channel(relid).close()

    def _relid_released(self, payload: bytes) -> None:
        (relid,) = RELID_RELEASED.unpack(payload)
        channel = self._channel(relid)
        if channel.state is not ChannelState.RESCINDED:
            raise VmbusProtocolError(f"RELID_RELEASED for channel {relid} that was not rescinded")
        del self.channels[relid]

    def _modify_channel(self, payload: bytes) -> None:
        """Rebind an open channel's interrupts to another VP (from 4.1; answered from 5.3)."""
        relid, target_vp = MODIFY_CHANNEL.unpack(payload)
        if self.version < VERSION_4_1:
            raise VmbusProtocolError(f"MODIFYCHANNEL on protocol {self.version >> 16}.{self.version & 0xFFFF}, "
                                     "which does not have it")
        channel = self._channel(relid)
        problem = None
        if channel.state is not ChannelState.OPEN:
            problem = f"MODIFYCHANNEL for channel {relid} which is {channel.state.value}"
        elif target_vp != NO_INTERRUPT and not self._vp_exists(target_vp):
            problem = f"MODIFYCHANNEL {relid}: target VP {target_vp} does not exist"
        else:
            channel.retarget(target_vp)
            log.info("VMBus: channel %d (%s) now interrupts VP %d", relid, channel.provider.name, target_vp)
        if self.version >= VERSION_5_3:
            self._send("vmbus_channel_modifychannel_response", header=self._header(lib.CHANNELMSG_MODIFYCHANNEL_RESPONSE),
                       child_relid=relid, status=MODIFY_FAILED if problem else 0)
        if problem:
            raise VmbusProtocolError(problem)

    def _unload(self, payload: bytes) -> None:
        self._reset()
        self._send("vmbus_channel_message_header", msgtype=lib.CHANNELMSG_UNLOAD_RESPONSE)

    def _reset(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.gpadls.clear()
        self.offers_requested = False
        self.state = ConnectionState.DISCONNECTED
        self.version = 0

    # ---- deferred doorbells
    def _defer_locked(self, channel: Channel) -> None:
        """Drain ``channel`` again later, on the worker (the channel calls this with the lock held)."""
        if self._closed:
            return
        self._deferred.add(channel.relid)
        if self._worker is None:
            self._worker = threading.Thread(target=self._drain_deferred, name="vmbus-drain", daemon=True)
            self._worker.start()
        self._work.notify()

    def _drain_deferred(self) -> None:
        while True:
            with self._work:   # the server's lock, released between passes
                while not self._deferred and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                relids, self._deferred = sorted(self._deferred), set()
                for relid in relids:
                    channel = self.channels.get(relid)
                    if channel is not None:
                        channel.on_doorbell()

    def close(self) -> None:
        """Stop the deferred-drain worker (the channels go with their partition)."""
        with self._work:
            self._closed = True
            self._work.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # ---- snapshots
    @contextlib.contextmanager
    def quiesced(self) -> Iterator[VmbusRecords]:
        """Hold the VMBus host still (its lock: no doorbell, drain pass or host request
        runs) and give its records; the caller saves guest memory inside, so that the
        rings in memory and the records agree.  Only with the VPs out of their runs."""
        with self._lock:
            gpadls, pending = self.gpadls.save()
            server = VmbusState(self.state is ConnectionState.CONNECTED, self.version, self.message_vp, self.message_sint,
                                self.offers_requested, self.protocol_errors, gpadls, pending,
                                tuple(c.save() for c in self.channels.values()))
            yield VmbusRecords(server, self.synic.save(), {relid: c.provider.save() for relid, c in self.channels.items()})

    def restore(self, records: VmbusRecords) -> None:
        """Take saved records into a server that has not met its guest yet (a machine
        being restored); VmbusProtocolError names what does not fit this machine."""
        saved = records.server
        with self._lock:
            if self.state is not ConnectionState.DISCONNECTED or self.gpadls.established:
                raise VmbusProtocolError("a VMBus host that is already connected cannot be restored")
            if saved.connected != (saved.version in SUPPORTED_VERSIONS) or (saved.version and not saved.connected):
                raise VmbusProtocolError(f"protocol version {saved.version:#x} with connected={saved.connected}")
            if not self._vp_exists(saved.message_vp) or not 0 < saved.message_sint < 16:
                raise VmbusProtocolError(f"messages to VP {saved.message_vp} SINT {saved.message_sint}")
            relids = [c.relid for c in saved.channels]
            if len(set(relids)) != len(relids) or not set(relids) <= set(self.channels) or set(records.providers) != set(relids):
                raise VmbusProtocolError(f"channels {sorted(relids)} (providers {sorted(records.providers)}) "
                                         f"are not this machine's {sorted(self.channels)}")
            self.gpadls.restore(saved.gpadls, saved.pending_gpadls)
            for relid in set(self.channels) - set(relids):
                del self.channels[relid]   # released by the guest after a rescind
            for channel_state in saved.channels:
                channel = self.channels[channel_state.relid]
                channel.restore(channel_state, self.gpadls.established, self._vp_exists)
                channel.provider.restore(records.providers[channel.relid], channel if channel.state is ChannelState.OPEN else None)
            try:
                self.synic.restore(records.synic, self.vp_count if self.vp_count is not None else int(lib.HV_MAX_VP_INDEX) + 1)
            except ValueError as exc:
                raise VmbusProtocolError(str(exc)) from None
            self.state = ConnectionState.CONNECTED if saved.connected else ConnectionState.DISCONNECTED
            self.version, self.message_vp, self.message_sint = saved.version, saved.message_vp, saved.message_sint
            self.offers_requested, self.protocol_errors = saved.offers_requested, saved.protocol_errors

    def resignal(self) -> None:
        """After a restore, with the VPs about to run: deliver the messages that waited and
        signal every open channel both ways (a signal sent into the pause is lost)."""
        self.synic.flush_all()
        with self._lock:
            for channel in list(self.channels.values()):
                channel.resignal()

    # ---- host-initiated
    def call(self, operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a host-initiated provider operation (a heartbeat, a time sample, a KVP or
        shutdown request) with the server's lock, as every guest-initiated one runs:
        providers and their channels are guarded by it.  Never wait for the guest inside
        ``operation``: the guest's answer needs the lock to arrive."""
        with self._lock:
            return operation(*args, **kwargs)

    def rescind(self, relid: int) -> None:
        with self._lock:
            channel = self._channel(relid)
            channel.close()
            channel.state = ChannelState.RESCINDED
            if self.state is ConnectionState.CONNECTED:
                self._send("vmbus_channel_rescind_offer", header=self._header(lib.CHANNELMSG_RESCIND_CHANNELOFFER),
                           child_relid=relid)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state.value, "version": f"{self.version >> 16}.{self.version & 0xFFFF}" if self.version else None,
                    "channels": [c.describe() for c in self.channels.values()], "protocol_errors": self.protocol_errors}

    def providers(self) -> list[Provider]:
        """The providers of the channels offered now (a RELID_RELEASED removes one)."""
        with self._lock:
            return [c.provider for c in self.channels.values()]

    def channel_for(self, provider_type: type) -> Channel | None:
        with self._lock:
            return next((c for c in self.channels.values() if isinstance(c.provider, provider_type)), None)

