"""copy_from_user / copy_to_user for the simulated driver.

The driver never dereferences a caller's pointer: it copies through
copy_from_user/copy_to_user, which fail with EFAULT on NULL, unmapped,
read-only (for writes) or kernel addresses.  The simulator runs in the
caller's process, so it has the kernel copy on itself
(mshvstack_self_copy, in the binding's C glue): up to a page through a
pipe, so the kernel's own copy_from_user/copy_to_user check the caller's
side, larger copies with process_vm_readv/writev.  A bad pointer is an
errno, never a SIGSEGV.  Where process_vm_* is refused (some seccomp
profiles), the check falls back to /proc/self/maps.
"""

from __future__ import annotations

import errno
from typing import Any

from mshvstack.abi import ffi, lib

USER_TOP = 1 << 47   # x86-64 user addresses end here (4-level paging); access_ok refuses the rest


class UserFault(Exception):
    """The caller's buffer cannot be read or written (EFAULT)."""

    errno = errno.EFAULT


_vm_calls_work: bool | None = None   # None: not tried yet; False: refused here (seccomp)


def access_ok(address: int, size: int) -> bool:
    return 0 <= address and address + size <= USER_TOP


def address_of(arg: Any) -> int:
    """An ioctl argument as a user address: a cffi pointer, an int, or None (NULL)."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg
    return int(ffi.cast("uintptr_t", arg))


# cdata whose memory cffi owns or pins for as long as the object lives (ffi.new, ffi.from_buffer): the
# caller holds the object through the ioctl, so every byte of it is mapped and writable.  A cdata of any
# other kind (ffi.cast of a raw address) takes the checked copy.
_OWNING_TYPES = frozenset({type(ffi.new("char[]", 1)), type(ffi.new("int *")), type(ffi.from_buffer(bytearray(1)))})
_POINTEE_SIZES: dict[Any, int] = {}


def owned_size(arg: Any) -> int:
    """How many bytes at ``arg``'s address are provably the caller's live memory (0: unknown).

    copy_to_user's check costs two system calls, the largest part of an
    MSHV_RUN_VP round trip here; a struct the caller allocated with cffi
    cannot fault, so its copy needs none (what the kernel would accept anyway).
    """
    if type(arg) not in _OWNING_TYPES:
        return 0
    ctype = ffi.typeof(arg)
    size = _POINTEE_SIZES.get(ctype)
    if size is None:
        if ctype.kind == "array":
            return int(ffi.sizeof(arg))
        item = ctype.item
        size = _POINTEE_SIZES[ctype] = int(ffi.sizeof(item)) if item.kind in ("struct", "union", "primitive") else 0
    return size


def _transfer(address: int, buffer: Any, size: int, write: bool) -> None:
    """Copy between the caller's ``address`` and ``buffer`` (anything cffi can point at)."""
    global _vm_calls_work
    if size == 0:
        return
    if not address or not access_ok(address, size):
        raise UserFault()
    local = ffi.from_buffer(buffer)
    if _vm_calls_work is not False:
        done = lib.mshvstack_self_copy(address, local, size, int(write))
        if done == size:
            _vm_calls_work = True
            return
        if done >= 0 or -done == errno.EFAULT or _vm_calls_work:
            raise UserFault()
        _vm_calls_work = False   # ENOSYS/EPERM: not allowed here; check the mappings instead
    if not _mapped(address, size, write):
        raise UserFault()
    if write:
        ffi.memmove(ffi.cast("void *", address), local, size)
    else:
        ffi.memmove(local, ffi.cast("void *", address), size)


def _mapped(address: int, size: int, write: bool) -> bool:
    """[address, address+size) lies in mappings with the needed permission (no gaps)."""
    end, cursor = address + size, address
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, stop = (int(x, 16) for x in span.split("-"))
            if start <= cursor < stop and perms[0] == "r" and (not write or perms[1] == "w"):
                cursor = stop
                if cursor >= end:
                    return True
    return False


def copy_from_user(address: int, size: int) -> bytes:
    buffer = bytearray(size)
    _transfer(address, buffer, size, write=False)
    return bytes(buffer)


def copy_to_user(address: int, data: bytes | memoryview) -> None:
    _transfer(address, data, len(data), write=True)


def user_range_writable(address: int, size: int) -> bool:
    """Every page of the range is mapped writable (what pinning a guest-memory region needs)."""
    if not access_ok(address, size):
        return False
    return _mapped(address, size, write=True)
