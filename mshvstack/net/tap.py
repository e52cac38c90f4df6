"""A TAP device as a NIC's backend (root, or a TAP owned by the user).

The device must exist or be creatable (``ip tuntap add dev tap0 mode tap``);
bridging or NAT is the user's, as with Cloud Hypervisor.  No vnet header and
no offloads: frames pass whole both ways, as the NIC advertises none.
Reads happen on a thread of our own; writes (from the VMBus side) never
block: a frame the device cannot take now is dropped.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import threading
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.net.backend import Deliver, NetBackendError

log = logging.getLogger(__name__)
DEVICE = "/dev/net/tun"
BATCH = 64
MAX_FRAME = 65536


class TapBackend:
    name = "tap"

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        try:
            self.fd = os.open(DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise NetBackendError(f"--net tap={ifname}: {DEVICE}: {exc.strerror}") from None
        request = ffi.new("struct tun_ifreq *")
        name = ifname.encode()
        if len(name) >= lib.TUN_IFNAMSIZ:
            os.close(self.fd)
            raise NetBackendError(f"--net tap={ifname}: the name is longer than {lib.TUN_IFNAMSIZ - 1} bytes")
        ffi.memmove(request.ifr_name, name, len(name))
        request.ifr_flags = lib.TUN_IFF_TAP | lib.TUN_IFF_NO_PI
        try:
            fcntl.ioctl(self.fd, lib.TUNSETIFF, bytes(ffi.buffer(request)))
        except OSError as exc:
            os.close(self.fd)
            hint = " (it needs CAP_NET_ADMIN, or a TAP the user owns: ip tuntap add dev NAME mode tap user USER)" \
                if exc.errno in (errno.EPERM, errno.EACCES) else " (is it a TUN device, or used by another program?)" \
                if exc.errno in (errno.EINVAL, errno.EBUSY) else ""
            raise NetBackendError(f"--net tap={ifname}: cannot attach: {exc.strerror}{hint}") from None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._deliver: Deliver | None = None
        self.tx_dropped = 0

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name=f"tap-{self.ifname}", daemon=True)
        self._thread.start()

    def send(self, frame: bytes) -> bool:
        try:
            os.write(self.fd, frame)
            return True
        except OSError:   # EAGAIN: the device's queue is full; EIO: it is down
            self.tx_dropped += 1
            return False

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            try:
                events = dict(poller.poll(1000))
            except InterruptedError:
                continue
            if self._closed or self.fd not in events:
                continue
            frames = []
            for _ in range(BATCH):
                try:
                    frames.append(os.read(self.fd, MAX_FRAME))
                except BlockingIOError:
                    break
                except OSError as exc:
                    log.warning("tap %s: %s", self.ifname, exc.strerror)
                    break
            if frames and self._deliver is not None:
                try:
                    self._deliver(frames)
                except Exception:
                    log.exception("tap %s: delivering %d frames to the NIC failed", self.ifname, len(frames))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)
        self._deliver = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "ifname": self.ifname, "backend_tx_dropped": self.tx_dropped}
