"""Hypercall errors: which call, which status, and what it usually means."""

from __future__ import annotations

from mshvstack.errors import MshvError
from mshvstack.hvcall.codes import HvStatus, hvcall_name, status_name

_HINTS: dict[int, str] = {
    HvStatus.INVALID_HYPERCALL_CODE: "the hypervisor does not implement this call",
    HvStatus.INVALID_HYPERCALL_INPUT: "the input block is malformed (size, reserved fields or rep count)",
    HvStatus.INVALID_ALIGNMENT: "an address in the input is not aligned as required",
    HvStatus.INVALID_PARAMETER: "a field of the input is out of range",
    HvStatus.ACCESS_DENIED: "the caller may not do this to the partition",
    HvStatus.INVALID_PARTITION_STATE: "the partition is not in a state that allows this (initialized? frozen?)",
    HvStatus.OPERATION_DENIED: "the operation is refused in the current configuration",
    HvStatus.UNKNOWN_PROPERTY: "no such partition property",
    HvStatus.PROPERTY_VALUE_OUT_OF_RANGE: "the property does not accept this value",
    HvStatus.INSUFFICIENT_MEMORY: "the hypervisor needs more memory deposited for the partition",
    HvStatus.INVALID_VP_INDEX: "no VP with this index in the partition",
    HvStatus.INVALID_CONNECTION_ID: "no port is connected with this id",
    HvStatus.INSUFFICIENT_BUFFERS: "the target SINT's message slot is busy; retry after the guest's EOM",
    HvStatus.INVALID_VP_STATE: "the VP is not in a state for this (SynIC disabled, SINT masked?)",
    HvStatus.INVALID_REGISTER_VALUE: "a register value is not valid for that register",
    HvStatus.TIME_OUT: "the call stopped before completing every rep",
}


class HvError(MshvError):
    """A hypercall returned a failure status."""

    def __init__(self, code: int, status: int, reps_done: int = 0) -> None:
        self.code = code
        self.status = status
        self.reps_done = reps_done
        self.hint = _HINTS.get(status, "see the hypervisor's status code documentation")
        super().__init__(f"{hvcall_name(code)} failed: {status_name(status)}: {self.hint}")


class HvCallNotAllowed(MshvError):
    """The kernel's MSHV_ROOT_HVCALL does not pass this hypercall through."""

    def __init__(self, code: int, profile: str, where: str, since: str | None) -> None:
        self.code = code
        later = f"; kernels with the '{since}' driver pass it" if since else "; no known driver passes it"
        super().__init__(f"{hvcall_name(code)} is not on the {profile} driver's passthrough allowlist for {where}{later}")
