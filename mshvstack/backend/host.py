"""The real /dev/mshv: os.open, fcntl.ioctl on cffi buffers, mmap of VP pages."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.ioctls import FdKind, explain, request_name
from mshvstack.errors import DeviceUnavailable, ErrnoError

DEVICE_PATH = "/dev/mshv"
# The signal kick() sends to a thread blocked in MSHV_RUN_VP: a real-time
# signal with an empty handler, installed without SA_RESTART so the ioctl
# returns EINTR (the driver then leaves the VP suspended).
KICK_SIGNAL = signal.SIGRTMIN + 3


def _install_kick_handler() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # handlers can only be installed from the main thread
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)
        signal.siginterrupt(KICK_SIGNAL, True)

_OPEN_HINTS = {
    errno.ENOENT: "this kernel is not running as a Hyper-V root partition (CONFIG_MSHV_ROOT); use the simulator (--backend sim)",
    errno.EACCES: "permission denied (the device is mode 0600): run as root",
    errno.EPERM: "permission denied (the device is mode 0600): run as root",
    errno.ENODEV: "the mshv_root driver is loaded but no hypervisor answers; use the simulator (--backend sim)",
}


class HostBackend:
    """Talks to the kernel's /dev/mshv.

    Remembers which fds are partitions and VPs (from the ioctl that created
    them) so an error names the right ioctl: request numbers collide across
    fd kinds.
    """

    name = "host"

    def __init__(self, path: str = DEVICE_PATH) -> None:
        self.path = path
        self._kinds: dict[int, FdKind] = {}
        self._lock = threading.Lock()   # the fd kinds (any thread's ioctl): a leaf
        _install_kick_handler()

    def open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            err = exc.errno or errno.EIO
            hint = _OPEN_HINTS.get(err, os.strerror(err))
            raise DeviceUnavailable(err, f"open {self.path}", hint) from None
        with self._lock:
            self._kinds[fd] = FdKind.DEVICE
        return fd

    def _kind(self, fd: int) -> FdKind | None:
        with self._lock:
            return self._kinds.get(fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        address = int(ffi.cast("uintptr_t", arg)) if isinstance(arg, ffi.CData) else int(arg)
        kind = self._kind(fd)
        result = lib.mshvstack_ioctl(fd, request, address)
        if result < 0:
            err = ffi.errno or errno.EIO
            name = request_name(request, kind)
            raise ErrnoError(err, name, explain(name, err))
        if request == lib.MSHV_CREATE_PARTITION and kind is FdKind.DEVICE:
            self._remember(result, FdKind.PARTITION)
        elif request == lib.MSHV_CREATE_VP and kind is FdKind.PARTITION:
            self._remember(result, FdKind.VP)
        return int(result)

    def _remember(self, fd: int, kind: FdKind) -> None:
        with self._lock:
            self._kinds[fd] = kind

    def mmap(self, fd: int, length: int, offset: int) -> memoryview:
        try:
            mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as exc:
            err = exc.errno or errno.EIO
            hint = {
                errno.EINVAL: "offset is not a VP page (registers 0, intercept message 1, GHCB 2)",
                errno.ENODEV: "this VP has no such page (e.g. register page on an SNP partition)",
            }.get(err, os.strerror(err))
            raise ErrnoError(err, "mmap", hint) from None
        return memoryview(mapping)

    def kick(self, vp_fd: int, thread_id: int) -> None:
        signal.pthread_kill(thread_id, KICK_SIGNAL)

    def host_wrote(self, partition_fd: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Nothing to do: the hypervisor's CPUs see the host's stores to guest RAM."""

    def close(self, fd: int) -> None:
        with self._lock:
            self._kinds.pop(fd, None)
        os.close(fd)
