"""The host's side of the guest's SynIC.

Guest → host: HvPostMessage and HvSignalEvent arrive as hypercall
intercepts; they are validated and routed by connection id to registered
ports.  Host → guest: messages go out with post-message-direct (queued per
VP and SINT, retried when the hypervisor reports the slot deliverable) and
events with signal-event-direct.

Locks (docs/concurrency.md): one, private, that guards the port tables and
the outgoing queues.  Any thread uses a SynicHost: the VP that took the
guest's hypercall, the VMBus server (which may hold its own lock: it comes
first), the drain worker.  Handlers run without it (they take their owner's
lock); under it only hypercalls are issued (the partition's lock comes after).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from mshvstack.abi import ffi, lib
from mshvstack.hvcall import HvError, HvRegister, calls
from mshvstack.hvcall.call import HvTarget
from mshvstack.partition.exits import HypercallIntercept, SintDeliverable
from mshvstack.partition.memory import GuestMemory, GuestMemoryError
from mshvstack.vmbus.layout import Layout

log = logging.getLogger(__name__)

MessageHandler = Callable[[int, bytes], int]   # (message type, payload) -> HV status
EventHandler = Callable[[], None]
QUEUE_LIMIT = 16          # like the hypervisor's per-port message buffers
OUTGOING_LIMIT = 4096     # hard cap per VP/SINT (one request can queue many offers)
MAX_SAVED_MESSAGES = 1 << 16
# HvPostMessage's input: its header, read before the payload it announces.
POST_INPUT = Layout("struct hv_input_post_message", "connectionid", "reserved", "message_type", "payload_size",
                    prefix=ffi.offsetof("struct hv_input_post_message", "payload"))
OK = int(lib.HV_STATUS_SUCCESS)


@dataclass(frozen=True)
class QueuedMessage:
    VERSION: ClassVar[int] = 1
    vp: int
    sint: int
    message_type: int
    payload: bytes = field(metadata={"max_bytes": int(lib.VMBUS_MESSAGE_MAX_PAYLOAD)})


@dataclass(frozen=True)
class SynicHostState:
    """Host → guest messages not delivered yet, in their order per VP and SINT."""

    VERSION: ClassVar[int] = 1
    queued: tuple[QueuedMessage, ...] = field(metadata={"max_items": MAX_SAVED_MESSAGES})


class VpRegisters(Protocol):
    index: int

    def get_registers(self, names: list[int]) -> list[int]: ...
    def set_registers(self, values: dict[int, int]) -> None: ...


class SynicHost:
    def __init__(self, target: HvTarget, memory: GuestMemory, vp_registers: Callable[[int], VpRegisters]) -> None:
        self.target = target
        self.memory = memory
        self.vp_registers = vp_registers
        self._message_ports: dict[int, MessageHandler] = {}
        self._event_ports: dict[int, EventHandler] = {}
        self._outgoing: dict[tuple[int, int], deque[tuple[int, bytes]]] = {}
        # Guards the two port tables and the outgoing queues; taken after the VMBus server's lock,
        # before the partition's.  Not reentrant: a handler is called after it is released.
        self._lock = threading.Lock()
        self._signals: dict[tuple[int, int, int], calls.EventSignal] = {}   # built on first use, kept
        self.rejected = 0

    # ---- ports
    def register_message_port(self, connection_id: int, handler: MessageHandler) -> None:
        with self._lock:
            self._message_ports[connection_id & lib.VMBUS_CONNECTION_ID_MASK] = handler

    def unregister_message_port(self, connection_id: int) -> None:
        with self._lock:
            self._message_ports.pop(connection_id, None)

    def register_event_port(self, connection_id: int, handler: EventHandler) -> None:
        with self._lock:
            self._event_ports[connection_id & lib.VMBUS_CONNECTION_ID_MASK] = handler

    def unregister_event_port(self, connection_id: int) -> None:
        with self._lock:
            self._event_ports.pop(connection_id, None)

    # ---- guest -> host
    def handle_hypercall(self, vp: VpRegisters, exit_: HypercallIntercept) -> None:
        """Complete an intercepted guest hypercall: status in RAX, RIP past the call.
        On ``vp``'s thread, with no lock held: the port's handler takes its owner's."""
        code = exit_.call_code
        if code == lib.HVCALL_POST_MESSAGE:
            status = self._post_message(exit_)
        elif code == lib.HVCALL_SIGNAL_EVENT:
            status = self._signal_event(exit_)
        else:
            status = int(lib.HV_STATUS_INVALID_HYPERCALL_CODE)
        if status != OK:
            with self._lock:
                self.rejected += 1
        vp.set_registers({**exit_.result_registers(status), HvRegister.RIP: exit_.header.next_rip})

    def _post_message(self, exit_: HypercallIntercept) -> int:
        if exit_.fast:
            return int(lib.HV_STATUS_INVALID_HYPERCALL_CODE)
        gpa = exit_.input_value
        if gpa % 8:
            return int(lib.HV_STATUS_INVALID_ALIGNMENT)
        try:
            raw = self.memory.read(gpa, POST_INPUT.size)
        except GuestMemoryError:
            return int(lib.HV_STATUS_INVALID_PARAMETER)
        connection_id, reserved, message_type, size = POST_INPUT.unpack(raw)
        if reserved or connection_id & ~lib.VMBUS_CONNECTION_ID_MASK or size > lib.VMBUS_MESSAGE_MAX_PAYLOAD or message_type & 0x80000000:
            return int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
        with self._lock:
            handler = self._message_ports.get(connection_id)
        if handler is None:
            return int(lib.HV_STATUS_INVALID_CONNECTION_ID)
        if self.pending_messages() >= QUEUE_LIMIT:
            # Our replies are piling up unread: push back; Linux retries with back-off.
            return int(lib.HV_STATUS_INSUFFICIENT_BUFFERS)
        try:
            payload = self.memory.read(gpa + POST_INPUT.size, size)
        except GuestMemoryError:
            return int(lib.HV_STATUS_INVALID_PARAMETER)
        return handler(message_type, payload)

    def _signal_event(self, exit_: HypercallIntercept) -> int:
        if exit_.fast:
            value = exit_.input_value
        else:
            try:
                value = int.from_bytes(self.memory.read(exit_.input_value, 8), "little")
            except GuestMemoryError:
                return int(lib.HV_STATUS_INVALID_PARAMETER)
        connection_id, flag, reserved = value & 0xFFFFFFFF, (value >> 32) & 0xFFFF, value >> 48
        if reserved or connection_id & ~lib.VMBUS_CONNECTION_ID_MASK:
            return int(lib.HV_STATUS_INVALID_HYPERCALL_INPUT)
        if flag:
            return int(lib.HV_STATUS_INVALID_PORT_ID)
        with self._lock:
            handler = self._event_ports.get(connection_id)
        if handler is None:
            return int(lib.HV_STATUS_INVALID_CONNECTION_ID)
        handler()
        return OK

    # ---- host -> guest
    def post_message(self, vp_index: int, sint: int, message_type: int, payload: bytes) -> None:
        """Deliver in order: straight into the slot, or queued until it frees."""
        with self._lock:
            queue = self._outgoing.setdefault((vp_index, sint), deque())
            if len(queue) >= OUTGOING_LIMIT:
                log.warning("VP %d SINT %d does not take messages; dropping one", vp_index, sint)
                return
            queue.append((message_type, payload))
            self._flush_locked(vp_index, sint)

    def _flush_locked(self, vp_index: int, sint: int) -> None:
        """Post what waits for (VP, SINT), in order, until its slot is busy.  The guest
        runs meanwhile on its own VP: it may free the slot and write EOM after our post
        failed but before the deliverability notification is armed, and that EOM then
        tells nobody.  So once armed, the post is tried again."""
        queue = self._outgoing.get((vp_index, sint))
        armed = False
        while queue:
            message_type, payload = queue[0]
            try:
                calls.post_message_direct(self.target, vp_index, sint, message_type, payload)
            except HvError as exc:
                if exc.status == lib.HV_STATUS_INSUFFICIENT_BUFFERS:
                    if armed:
                        return   # the EOM that frees the slot will be notified
                    self._want_deliverable(vp_index, sint)
                    armed = True
                    continue
                log.warning("dropping VMBus message for VP %d SINT %d: %s", vp_index, sint, exc)
            queue.popleft()

    def _want_deliverable(self, vp_index: int, sint: int) -> None:
        vp = self.vp_registers(vp_index)
        (current,) = vp.get_registers([HvRegister.DELIVERABILITY_NOTIFICATIONS])
        register = ffi.new("union hv_deliverability_notifications_register *", {"as_uint64": current})
        register.bits.sints |= 1 << sint
        vp.set_registers({HvRegister.DELIVERABILITY_NOTIFICATIONS: int(register.as_uint64)})

    def on_sint_deliverable(self, vp: VpRegisters, exit_: SintDeliverable) -> None:
        """Post what waited for the SINTs the hypervisor reports free (on ``vp``'s thread, no lock held)."""
        with self._lock:
            for sint in range(16):
                if exit_.deliverable_sints & (1 << sint):
                    self._flush_locked(vp.index, sint)

    def pending_messages(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._outgoing.values())

    # ---- snapshots
    def save(self) -> SynicHostState:
        with self._lock:
            return SynicHostState(tuple(QueuedMessage(vp, sint, message_type, payload)
                                        for (vp, sint), queue in self._outgoing.items() for message_type, payload in queue))

    def restore(self, state: SynicHostState, vp_count: int) -> None:
        """Queue the saved messages again (delivered by ``flush_all`` once the VPs are back);
        ValueError for one no guest could have been sent."""
        outgoing: dict[tuple[int, int], deque[tuple[int, bytes]]] = {}
        for message in state.queued:
            if message.vp >= vp_count or not 0 < message.sint < 16 or message.message_type & 0x80000000:
                raise ValueError(f"a queued message for VP {message.vp} SINT {message.sint} type {message.message_type:#x}")
            queue = outgoing.setdefault((message.vp, message.sint), deque())
            if len(queue) >= OUTGOING_LIMIT:
                raise ValueError(f"more than {OUTGOING_LIMIT} messages queued for VP {message.vp} SINT {message.sint}")
            queue.append((message.message_type, message.payload))
        with self._lock:
            self._outgoing = outgoing

    def flush_all(self) -> None:
        """Post whatever waits, arming deliverability where a slot is busy (after a restore)."""
        with self._lock:
            for vp_index, sint in list(self._outgoing):
                self._flush_locked(vp_index, sint)

    def signal_event(self, vp_index: int, sint: int, flag: int) -> None:
        key = (vp_index, sint, flag)
        try:
            signal = self._signals.get(key)
            if signal is None:
                signal = self._signals[key] = calls.EventSignal(self.target, vp_index, sint, flag)
            signal.signal()
        except HvError as exc:
            log.warning("cannot signal VP %d SINT %d flag %d: %s", vp_index, sint, flag, exc)
