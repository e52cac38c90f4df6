"""irqfd: eventfds that inject MSIs, as the driver's mshv_eventfd.c does.

A worker thread waits on every assigned eventfd; a signal reads the
counter, looks up the MSI route of the irqfd's GSI and asserts the decoded
interrupt.  Level-triggered routes with a resample fd get it signalled when
the guest EOIs that vector.

The driver identifies an eventfd by its context, not by the fd number: a
dup() of a bound eventfd is the same eventfd.  ``eventfd_context`` gives that
identity, and the worker holds its own duplicate of each fd, as the driver
holds a reference to the context.
"""

from __future__ import annotations

import errno
import os
import selectors
import threading
from dataclasses import dataclass

from mshvstack.backend.sim.hypervisor import SimPartition


@dataclass(frozen=True)
class MsiRoute:
    address_lo: int
    data: int

    @property
    def vector(self) -> int:
        return self.data & 0xFF

    @property
    def delivery_mode(self) -> int:
        return (self.data >> 8) & 7

    @property
    def level_triggered(self) -> bool:
        return bool((self.data >> 15) & 1)

    @property
    def destination(self) -> int:
        return (self.address_lo >> 12) & 0xFF

    @property
    def logical(self) -> bool:
        return bool((self.address_lo >> 2) & 1)


class NotAnEventfd(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


def eventfd_context(fd: int) -> int:
    """The eventfd's identity (its context, shared by dups); NotAnEventfd(EBADF) for a
    closed fd, NotAnEventfd(EINVAL) for an fd that is not an eventfd (a pipe, a socket)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            lines = info.read().splitlines()
    except OSError:
        raise NotAnEventfd(errno.EBADF) from None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if "eventfd-count" not in fields:
        raise NotAnEventfd(errno.EINVAL)
    if "eventfd-id" in fields:
        return int(fields["eventfd-id"])
    return os.stat(f"/proc/self/fd/{fd}").st_ino << 32 | fd   # kernels before eventfd-id: the fd itself


@dataclass(frozen=True)
class Irqfd:
    fd: int              # the worker's own duplicate
    context: int
    gsi: int
    resamplefd: int | None


class IrqfdWorker:
    """Per-partition thread turning eventfd signals into interrupts."""

    def __init__(self, partition: SimPartition) -> None:
        self.partition = partition
        self.routes: dict[int, MsiRoute] = {}
        self.irqfds: dict[int, Irqfd] = {}
        self._selector = selectors.DefaultSelector()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        # The irqfd table and the routes (the VMM's ioctls, this worker, the VPs' EOIs).  A leaf:
        # interrupts are routed and resample fds written after it is released.  ``routes`` is
        # replaced whole, so the driver reads it without the lock.
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        partition.eoi_listeners.append(self._on_eoi)

    def bound(self, context: int) -> bool:
        with self._lock:
            return any(i.context == context for i in self.irqfds.values())

    def assign(self, fd: int, context: int, gsi: int, resamplefd: int | None) -> None:
        irqfd = Irqfd(os.dup(fd), context, gsi, os.dup(resamplefd) if resamplefd is not None else None)
        with self._lock:
            self.irqfds[irqfd.fd] = irqfd
            self._selector.register(irqfd.fd, selectors.EVENT_READ)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mshv-irqfd", daemon=True)
                self._thread.start()
        os.eventfd_write(self._wakeup, 1)

    def deassign(self, context: int, gsi: int) -> None:
        """Every irqfd of this eventfd on this GSI (none is no error, as in the driver)."""
        with self._lock:
            gone = [i for i in self.irqfds.values() if i.context == context and i.gsi == gsi]
            for irqfd in gone:
                del self.irqfds[irqfd.fd]
                self._selector.unregister(irqfd.fd)
        os.eventfd_write(self._wakeup, 1)
        for irqfd in gone:
            _close(irqfd)

    def set_routes(self, routes: dict[int, MsiRoute]) -> None:
        with self._lock:
            self.routes = routes

    def _loop(self) -> None:
        while not self._closed:
            for key, _events in self._selector.select(timeout=0.5):
                fd = int(key.fd)
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                if fd != self._wakeup:
                    self._fire(fd)

    def _fire(self, fd: int) -> None:
        with self._lock:
            irqfd = self.irqfds.get(fd)
            route = self.routes.get(irqfd.gsi) if irqfd else None
        if route is None:
            return  # no valid route for this GSI: the driver ignores it
        self.partition.route_interrupt(route.destination, route.vector, route.delivery_mode, route.logical)

    def _on_eoi(self, vector: int) -> None:
        with self._lock:
            pending = [i for i in self.irqfds.values() if i.resamplefd is not None
                       and (r := self.routes.get(i.gsi)) is not None and r.vector == vector and r.level_triggered]
        for irqfd in pending:
            assert irqfd.resamplefd is not None
            os.eventfd_write(irqfd.resamplefd, 1)

    def close(self) -> None:
        self._closed = True
        os.eventfd_write(self._wakeup, 1)
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._selector.close()
        os.close(self._wakeup)
        for irqfd in self.irqfds.values():
            _close(irqfd)
        self.irqfds.clear()


def _close(irqfd: Irqfd) -> None:
    os.close(irqfd.fd)
    if irqfd.resamplefd is not None:
        os.close(irqfd.resamplefd)
