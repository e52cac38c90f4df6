"""Which ioctl requests each kind of /dev/mshv fd accepts, and their names.

Request numbers come from the binding (never written here); this module only
says which *names* belong to which fd kind, because numbers collide across
fds (nr 0 means three different requests on the three fd types).
"""

from __future__ import annotations

import enum
import errno

from mshvstack.abi import lib


class FdKind(enum.Enum):
    DEVICE = "/dev/mshv"
    PARTITION = "partition fd"
    VP = "vp fd"


_NAMES_BY_KIND: dict[FdKind, tuple[str, ...]] = {
    FdKind.DEVICE: ("MSHV_CREATE_PARTITION", "MSHV_ROOT_HVCALL"),
    FdKind.PARTITION: (
        "MSHV_INITIALIZE_PARTITION",
        "MSHV_CREATE_VP",
        "MSHV_SET_GUEST_MEMORY",
        "MSHV_IRQFD",
        "MSHV_IOEVENTFD",
        "MSHV_SET_MSI_ROUTING",
        "MSHV_GET_GPAP_ACCESS_BITMAP",
        "MSHV_ROOT_HVCALL",
    ),
    FdKind.VP: ("MSHV_RUN_VP", "MSHV_GET_VP_STATE", "MSHV_SET_VP_STATE", "MSHV_ROOT_HVCALL"),
}


_REQUESTS_BY_KIND = {kind: {int(getattr(lib, name)): name for name in names} for kind, names in _NAMES_BY_KIND.items()}


def requests_for(kind: FdKind) -> dict[int, str]:
    """Request number → ioctl name for one fd kind."""
    return dict(_REQUESTS_BY_KIND[kind])


def request_name(request: int, kind: FdKind | None = None) -> str:
    """The ioctl's name, given which fd it was issued on (if known)."""
    for k in (kind,) if kind is not None else FdKind:
        name = _REQUESTS_BY_KIND[k].get(request)
        if name is not None:
            return name
    return f"ioctl {request:#x}"


# One-line explanations of what an errno means for a given request, from the
# driver's documented checks (mshv_abi.md sections 1-3).
_HINTS: dict[tuple[str, int], str] = {
    ("MSHV_CREATE_PARTITION", errno.EINVAL): "unknown pt_flags bit, bad isolation, or v2 fields (fbanks != 2, reserved bytes) invalid",
    ("MSHV_CREATE_VP", errno.EINVAL): "vp_index must be below 256",
    ("MSHV_CREATE_VP", errno.EEXIST): "a VP with this index already exists in the partition",
    ("MSHV_SET_GUEST_MEMORY", errno.EINVAL): ("size zero or not page aligned, unaligned userspace address, unknown flags, "
                                              "reserved bytes set, or unmap arguments not matching the region"),
    ("MSHV_SET_GUEST_MEMORY", errno.EEXIST): "the guest frames overlap a region already mapped",
    ("MSHV_SET_GUEST_MEMORY", errno.ENOENT): "no region holds this guest frame (unmap)",
    ("MSHV_SET_GUEST_MEMORY", errno.EFAULT): "the argument, or the userspace range of the region, cannot be read or pinned for writing",
    ("MSHV_SET_GUEST_MEMORY", errno.EIO): "the hypervisor refused to map the pages (is the partition initialized?)",
    ("MSHV_CREATE_VP", errno.EIO): "the hypervisor refused the VP (is the partition initialized?)",
    ("MSHV_IRQFD", errno.EBUSY): "this eventfd (or a dup of it) is already bound to an irqfd in the partition",
    ("MSHV_IRQFD", errno.EBADF): "the fd (or resamplefd) is not an open file descriptor",
    ("MSHV_IRQFD", errno.EINVAL): "unknown flags, an fd that is not an eventfd, or RESAMPLE on a GSI without a level-triggered route",
    ("MSHV_IOEVENTFD", errno.EOPNOTSUPP): "port-I/O ioeventfds are not supported by the driver; use MMIO",
    ("MSHV_IOEVENTFD", errno.EEXIST): "an ioeventfd with this address, length and datamatch already exists",
    ("MSHV_IOEVENTFD", errno.ENOENT): "no matching ioeventfd to deassign",
    ("MSHV_SET_MSI_ROUTING", errno.EINVAL): "more than 4096 entries, gsi >= 4096, duplicate gsi, address_hi set or reserved field set",
    ("MSHV_ROOT_HVCALL", errno.EINVAL): "hypercall not on this fd's allowlist, bad in_sz/out_sz, status or reserved fields set, or async call on a VP fd",
    ("MSHV_ROOT_HVCALL", errno.EPERM): "another asynchronous hypercall is outstanding on this partition",
    ("MSHV_ROOT_HVCALL", errno.EBADFD): "a non-async hypercall returned HV_STATUS_CALL_PENDING",
    ("MSHV_ROOT_HVCALL", errno.EAGAIN): "the hypervisor needed memory; the driver deposited a page: issue the call again",
    ("MSHV_RUN_VP", errno.EINTR): "interrupted by a signal before an intercept arrived; run again to continue",
    ("MSHV_GET_VP_STATE", errno.EINVAL): "bad state type, reserved bytes set, or buffer not page aligned / too small (buf_sz now holds the size required)",
    ("MSHV_SET_VP_STATE", errno.EINVAL): "bad state type, reserved bytes set, or buffer not page aligned / too small (buf_sz now holds the size required)",
}

_GENERIC_HINTS: dict[int, str] = {
    errno.ENOTTY: "this fd does not accept that request (not an mshv fd, wrong fd kind, or a kernel without it)",
    errno.EFAULT: "the kernel could not read or write the argument buffer",
    errno.ENOMEM: "the kernel or hypervisor is out of memory",
    errno.EIO: "the hypervisor failed the call (see the hypercall status)",
    errno.EBADF: "bad file descriptor",
}


def explain(name: str, err: int) -> str:
    """The one-line explanation for errno ``err`` from request ``name``."""
    import os

    return _HINTS.get((name, err)) or _GENERIC_HINTS.get(err) or os.strerror(err)
