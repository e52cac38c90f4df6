"""The root partition's side of one VP's SynIC: messages posted into its SIMP
slots, event flags set in its SIEF page, and the deliverability notifications
the VMM asks for (HvPostMessageDirect, HvSignalEventDirect,
HV_REGISTER_DELIVERABILITY_NOTIFICATIONS).

Any thread posts and signals (the VMM answers on whichever VP's thread took
the guest's hypercall; timers post on their own VP's): host writers take the
port's lock, and the guest, which runs meanwhile, frees slots and clears
flags with its own atomics and barriers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim.memory import GpaMap, GpaUnmapped
from mshvstack.backend.sim.synic import SLOT, SynIc

MESSAGE_FLAGS_OFFSET = ffi.offsetof("struct hv_message_header", "message_flags")


def _message_pending_bit() -> int:
    flags = ffi.new("union hv_message_flags *")
    flags.bits.msg_pending = 1
    return int(flags.asu8)


MESSAGE_PENDING = _message_pending_bit()
_BARRIER = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier for this thread's guest-memory stores and later loads
    (x86 lets a load pass an earlier store): acquiring a lock is a locked instruction."""
    with _BARRIER:
        pass


class SynicPort:
    """``interrupt``: queue a vector on the VP's LAPIC; ``deliverable``: the SINTs (a
    bitmask) whose slots the guest freed and the VMM asked to hear of."""

    def __init__(self, synic: SynIc, memory: GpaMap, interrupt: Callable[[int], None],
                 deliverable: Callable[[int], None]) -> None:
        self.synic = synic
        self.memory = memory
        self._interrupt = interrupt
        self._deliverable = deliverable
        self._lock = threading.Lock()   # host writers of the SIMP slots and deliverability (then the GPA map's)

    def post_message(self, sint: int, message: bytes) -> int:
        """HvPostMessageDirect: write into the SIMP slot or report it busy.

        A busy slot gets MessagePending, then is looked at again after a full
        barrier: a guest that freed it meanwhile may have read the flags before
        we set them and will write no EOM, so it gets the message now."""
        slot = self.synic.message_slot(sint)
        vector = self.synic.vector(sint)
        if slot is None or vector is None or not self.synic.enabled:
            return int(lib.HV_STATUS_INVALID_VP_STATE)
        memory = self.memory
        with self._lock:
            try:
                if not self._slot_free(slot):
                    flags = memory.read(slot + MESSAGE_FLAGS_OFFSET, 1)[0] | MESSAGE_PENDING
                    memory.write(slot + MESSAGE_FLAGS_OFFSET, bytes([flags]))
                    full_barrier()
                    if not self._slot_free(slot):
                        return int(lib.HV_STATUS_INSUFFICIENT_BUFFERS)
                memory.write(slot + 4, message[4:SLOT])
                memory.write(slot, message[:4])  # type last: the guest polls it
            except GpaUnmapped:
                return int(lib.HV_STATUS_INVALID_VP_STATE)   # a SIMP outside RAM (overlays there are not modelled)
        self._interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS)

    def signal_event(self, sint: int, flag: int) -> tuple[int, bool]:
        base = self.synic.flags_base(sint)
        vector = self.synic.vector(sint)
        if base is None or vector is None or flag >= lib.HV_EVENT_FLAGS_COUNT:
            return int(lib.HV_STATUS_INVALID_VP_STATE if flag < lib.HV_EVENT_FLAGS_COUNT else lib.HV_STATUS_INVALID_PARAMETER), False
        bit = 1 << (flag % 8)
        try:   # a locked OR: the guest clears flags with locked instructions at the same time
            newly = not self.memory.fetch_or(base + flag // 8, bit) & bit
        except GpaUnmapped:
            return int(lib.HV_STATUS_INVALID_VP_STATE), False   # a SIEFP outside RAM
        if newly:
            self._interrupt(vector)
        return int(lib.HV_STATUS_SUCCESS), newly

    def set_deliverability(self, value: int) -> int:
        """HV_REGISTER_DELIVERABILITY_NOTIFICATIONS from the VMM (any thread); an HV_STATUS.

        The hypervisor takes the SINT bits and the interrupt notification with
        its priority; an NMI notification or a reserved bit is
        HV_STATUS_INVALID_PARAMETER (rust-vmm's test sees EINVAL for 1 on
        hardware) and leaves the register as it was.  Interrupt notifications
        are kept but never raised here (no HVMSG_X64_INTERRUPTION_DELIVERABLE:
        docs/simulator.md)."""
        register = ffi.new("union hv_deliverability_notifications_register *", {"as_uint64": value})
        if register.bits.nmi_notification or register.bits.reserved:
            return int(lib.HV_STATUS_INVALID_PARAMETER)
        with self._lock:
            self.synic.deliverability = value
        return int(lib.HV_STATUS_SUCCESS)

    def end_of_message(self) -> None:
        """Guest wrote EOM: tell the VMM which SINT slots are free if it asked."""
        with self._lock:
            register = ffi.new("union hv_deliverability_notifications_register *", {"as_uint64": self.synic.deliverability})
            wanted = int(register.bits.sints)
            if not wanted:
                return
            free = 0
            for sint in range(16):
                slot = self.synic.message_slot(sint)
                if wanted & (1 << sint) and slot is not None and self._slot_free(slot):
                    free |= 1 << sint
            register.bits.sints = wanted & ~free
            self.synic.deliverability = int(register.as_uint64)
        if free:
            self._deliverable(free)

    def _slot_free(self, slot: int) -> bool:
        try:
            return int.from_bytes(self.memory.read(slot, 4), "little") == int(lib.HVMSG_NONE)
        except GpaUnmapped:
            return False
