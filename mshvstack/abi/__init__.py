"""The cffi binding of mshvstack's headers (include/).

``ffi`` knows every struct and union of the /dev/mshv UAPI and of the
hypervisor ABI; ``lib`` exposes every integer constant, ioctl numbers
included, with values computed by the C compiler.

    >>> from mshvstack.abi import ffi, lib
    >>> region = ffi.new("struct mshv_user_mem_region *")
    >>> hex(lib.MSHV_CREATE_PARTITION)
    '0x4010b800'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mshvstack.abi._mshv import ffi, lib

__all__ = ["ffi", "lib", "ioctl_names", "constant_names", "BindingSummary", "summary"]


def ioctl_names() -> tuple[str, ...]:
    """Names of every ioctl request macro in the headers, in header order."""
    return tuple(ffi.string(lib.MSHVSTACK_IOCTL_NAMES).decode().split())


def constant_names() -> tuple[str, ...]:
    """Names of every integer constant the binding exposes."""
    return tuple(n for n in dir(lib) if not n.startswith(("MSHVSTACK_", "mshvstack_")) and isinstance(getattr(lib, n), int))


@dataclass(frozen=True)
class BindingSummary:
    ioctls: int
    structs: int
    unions: int
    constants: int

    def as_dict(self) -> dict[str, Any]:
        return {"ioctls": self.ioctls, "structs": self.structs, "unions": self.unions, "constants": self.constants}


def summary() -> BindingSummary:
    """Counts of what the binding defines (for ``mshvstack info``)."""
    _typedefs, structs, unions = ffi.list_types()
    return BindingSummary(len(ioctl_names()), len(structs), len(unions), len(constant_names()))
