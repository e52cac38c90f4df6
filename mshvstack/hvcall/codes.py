"""Hypercall codes, status codes and register names as enums.

Generated from the binding's constants (never retyped): HvCall.GET_VP_REGISTERS
is lib.HVCALL_GET_VP_REGISTERS, HvStatus.ACCESS_DENIED is lib.HV_STATUS_ACCESS_DENIED,
HvRegister.RAX is lib.HV_X64_REGISTER_RAX and HvRegister.SINT0 is lib.HV_REGISTER_SINT0.
"""

from __future__ import annotations

import enum
from typing import Any

from mshvstack.abi import constant_names, lib


def _members(prefix: str, *, skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {n.removeprefix(prefix): int(getattr(lib, n)) for n in constant_names()
            if n.startswith(prefix) and not n.startswith(skip)}


def _register_members() -> dict[str, int]:
    # x64 architectural names win; hypervisor-defined names keep their own.
    members = _members("HV_X64_REGISTER_", skip=("HV_X64_REGISTER_CLASS_",))
    for name, value in _members("HV_REGISTER_").items():
        members.setdefault(name if name not in members else f"HV_{name}", value)
    return members


def _enum(name: str, members: dict[str, int]) -> Any:
    return enum.IntEnum(name, members)


# Built at import from the headers' constants, so mypy cannot see the
# members: the names are typed Any (values are plain IntEnum members).
HvCall: Any = _enum("HvCall", _members("HVCALL_"))
HvStatus: Any = _enum("HvStatus", _members("HV_STATUS_"))
HvRegister: Any = _enum("HvRegister", _register_members())
HvMessageType: Any = _enum("HvMessageType", _members("HVMSG_"))
PartitionProperty: Any = _enum("PartitionProperty", _members("HV_PARTITION_PROPERTY_"))
InterceptType: Any = _enum("InterceptType", _members("HV_INTERCEPT_TYPE_"))
InterruptType: Any = _enum("InterruptType", _members("HV_X64_INTERRUPT_TYPE_"))


class InterceptAccess(enum.IntFlag):
    """Access mask of HVCALL_INSTALL_INTERCEPT."""

    READ = lib.HV_INTERCEPT_ACCESS_MASK_READ
    WRITE = lib.HV_INTERCEPT_ACCESS_MASK_WRITE
    EXECUTE = lib.HV_INTERCEPT_ACCESS_MASK_EXECUTE


def hvcall_name(code: int) -> str:
    try:
        return f"HVCALL_{HvCall(code).name}"
    except ValueError:
        return f"hypercall {code:#x}"


def status_name(status: int) -> str:
    try:
        return f"HV_STATUS_{HvStatus(status).name}"
    except ValueError:
        return f"status {status:#x}"
