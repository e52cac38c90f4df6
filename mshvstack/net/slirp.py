"""User-mode networking on libslirp (QEMU's ``-nic user``), bound with cffi in ABI mode.

The guest's network is 10.0.2.0/24: the gateway 10.0.2.2 reaches the host's
own loopback, DNS at 10.0.2.3 forwards to the host's resolver, DHCP hands out
10.0.2.15.  Outbound TCP and UDP become the host's sockets; ``hostfwd``
listens on a host port and connects into the guest.  No privileges needed.

libslirp is not thread-safe, so one thread owns it: it polls libslirp's
sockets, feeds it the guest's frames (queued by ``send`` on the VMBus side
and announced through an eventfd), runs its timers, and hands the frames
libslirp produced to the NIC in one batch per pass, holding no lock of ours.

The library: the system's ``libslirp.so.0`` (Debian's libslirp0), or, where
it is not installed, the same package fetched with ``apt-get download``
into the cache the Linux guest uses (vmm/linuxguest.py) and loaded from there.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import cffi

from mshvstack.net.backend import Deliver, NetBackendError

log = logging.getLogger(__name__)
HEADER = Path(__file__).with_name("slirp.h")
LIBRARY = "libslirp.so.0"
PACKAGE = "libslirp0"
CONFIG_VERSION = 4
NETWORK, NETMASK, GATEWAY = "10.0.2.0", "255.255.255.0", "10.0.2.2"
DHCP_START, NAMESERVER = "10.0.2.15", "10.0.2.3"
TX_QUEUE_LIMIT = 4096        # guest frames waiting for libslirp's thread; more are dropped
POLL_LIMIT_MS = 1000

_ffi = cffi.FFI()
_ffi.cdef(HEADER.read_text())
_lib: Any = None
_lib_lock = threading.Lock()   # the one-time load (a leaf)


def _packaged_library() -> Path:
    """libslirp.so.0 out of Debian's libslirp0, fetched into the guest package cache."""
    from mshvstack.vmm.linuxguest import GuestUnavailable, cache_dir, deb_data, extract, fetch

    try:
        deb = fetch(PACKAGE)
    except GuestUnavailable as exc:
        raise NetBackendError(f"libslirp is not installed and cannot be fetched ({exc}); "
                              "install it with: apt-get install libslirp0") from None
    target = cache_dir() / deb.stem / LIBRARY
    if not target.exists():
        with deb_data(deb) as archive:
            found = extract(archive, r"/libslirp\.so\.0[.0-9]*$")
        if not found:
            raise NetBackendError(f"{deb.name} holds no {LIBRARY}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(max(found.values(), key=len))
        partial.rename(target)
    return target


def load_library() -> Any:
    """The libslirp binding (loaded once)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen(LIBRARY)
            except OSError:
                path = _packaged_library()
                try:
                    _lib = _ffi.dlopen(str(path))
                except OSError as exc:
                    raise NetBackendError(f"{path}: cannot be loaded ({exc}); install libslirp0") from None
        return _lib


def _in_addr(text: str) -> Any:
    address = _ffi.new("struct in_addr *")
    address.s_addr = int.from_bytes(socket.inet_aton(text), sys.byteorder)   # network order in memory
    return address[0]


_POLL_TO_SLIRP = ((select.POLLIN, "SLIRP_POLL_IN"), (select.POLLOUT, "SLIRP_POLL_OUT"), (select.POLLPRI, "SLIRP_POLL_PRI"),
                  (select.POLLERR, "SLIRP_POLL_ERR"), (select.POLLHUP, "SLIRP_POLL_HUP"))


class SlirpBackend:
    """One libslirp instance and the thread that owns it."""

    name = "user"
    checksummed = True   # every frame libslirp hands us it built itself, with correct checksums

    def __init__(self, forwards: tuple[Any, ...] = ()) -> None:
        self.lib = load_library()
        self.forwards = forwards
        self._closed = False
        self._tx: deque[bytes] = deque()
        self._rx: list[bytes] = []
        self._deliver: Deliver | None = None
        self._timers: dict[int, list[Any]] = {}   # id -> [callback, its opaque, expiry in ns or None]
        self._next_timer = 1
        self._poll_fds: list[tuple[int, int]] = []
        self._revents: dict[int, int] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.tx_dropped = 0
        self._keep = self._callbacks()
        self._config = _ffi.new("SlirpConfig *")
        config = self._config
        config.version = CONFIG_VERSION
        config.in_enabled = True
        config.vnetwork, config.vnetmask, config.vhost = _in_addr(NETWORK), _in_addr(NETMASK), _in_addr(GATEWAY)
        config.vdhcp_start, config.vnameserver = _in_addr(DHCP_START), _in_addr(NAMESERVER)
        self._slirp = self.lib.slirp_new(config, self._cb, _ffi.NULL)
        if self._slirp == _ffi.NULL:
            os.close(self._wake)
            raise NetBackendError("libslirp refused its configuration")
        try:
            for forward in forwards:
                if self.lib.slirp_add_hostfwd(self._slirp, int(forward.udp), _in_addr(forward.host_addr), forward.host_port,
                                              _in_addr(forward.guest_addr or "0.0.0.0"), forward.guest_port) < 0:
                    proto = "udp" if forward.udp else "tcp"
                    raise NetBackendError(f"hostfwd {proto}:{forward.host_addr}:{forward.host_port}: cannot listen there "
                                          "(the port is in use or the address is not this host's)")
        except BaseException:
            self.close()
            raise

    def _callbacks(self) -> list[Any]:
        """The C callbacks libslirp calls (all on the owning thread, or in slirp_new)."""
        cb = self._cb = _ffi.new("SlirpCb *")
        keep = [
            _ffi.callback("SlirpWriteCb", self._send_packet),
            _ffi.callback("void(const char *, void *)", self._guest_error),
            _ffi.callback("int64_t(void *)", lambda opaque: time.monotonic_ns()),
            _ffi.callback("void *(SlirpTimerCb, void *, void *)", self._timer_new),
            _ffi.callback("void(void *, void *)", self._timer_free),
            _ffi.callback("void(void *, int64_t, void *)", self._timer_mod),
            _ffi.callback("void(int, void *)", lambda fd, opaque: None),
            _ffi.callback("void(int, void *)", lambda fd, opaque: None),
            _ffi.callback("void(void *)", lambda opaque: self._kick()),
            _ffi.callback("SlirpAddPollCb", self._add_poll),
            _ffi.callback("SlirpGetREventsCb", self._get_revents),
        ]
        (cb.send_packet, cb.guest_error, cb.clock_get_ns, cb.timer_new, cb.timer_free, cb.timer_mod,
         cb.register_poll_fd, cb.unregister_poll_fd, cb.notify) = keep[:9]
        self._add_poll_cb, self._get_revents_cb = keep[9:]
        return keep

    # ---- libslirp's callbacks
    def _send_packet(self, buffer: Any, length: int, opaque: Any) -> int:
        self._rx.append(bytes(_ffi.buffer(buffer, length)))
        return int(length)

    def _guest_error(self, message: Any, opaque: Any) -> None:
        log.warning("libslirp: %s", _ffi.string(message).decode(errors="replace"))

    def _timer_new(self, callback: Any, callback_opaque: Any, opaque: Any) -> Any:
        handle = self._next_timer
        self._next_timer += 1
        self._timers[handle] = [callback, callback_opaque, None]
        return _ffi.cast("void *", handle)

    def _timer_free(self, timer: Any, opaque: Any) -> None:
        self._timers.pop(int(_ffi.cast("uintptr_t", timer)), None)

    def _timer_mod(self, timer: Any, expire_ms: int, opaque: Any) -> None:
        entry = self._timers.get(int(_ffi.cast("uintptr_t", timer)))
        if entry is not None:
            entry[2] = expire_ms * 1_000_000

    def _add_poll(self, fd: int, events: int, opaque: Any) -> int:
        mask = 0
        for poll_bit, name in _POLL_TO_SLIRP:
            if events & int(getattr(self.lib, name)):
                mask |= poll_bit
        self._poll_fds.append((fd, mask))
        return len(self._poll_fds) - 1

    def _get_revents(self, index: int, opaque: Any) -> int:
        if not 0 <= index < len(self._poll_fds):
            return 0
        happened = self._revents.get(self._poll_fds[index][0], 0)
        result = 0
        for poll_bit, name in _POLL_TO_SLIRP:
            if happened & poll_bit:
                result |= int(getattr(self.lib, name))
        return result

    # ---- the NIC's side
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="slirp", daemon=True)
        self._thread.start()

    def send(self, frame: bytes) -> bool:
        """A guest frame (any thread, never blocks): queued for libslirp's thread."""
        if len(self._tx) >= TX_QUEUE_LIMIT or self._closed:
            self.tx_dropped += 1
            return False
        was_empty = not self._tx
        self._tx.append(frame)
        if was_empty:
            self._kick()
        return True

    def _kick(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except (BlockingIOError, OSError):
            pass   # already signalled, or closing

    # ---- the owning thread
    def _run(self) -> None:
        lib, slirp = self.lib, self._slirp
        timeout = _ffi.new("uint32_t *")
        while not self._closed:
            self._poll_fds = []
            timeout[0] = POLL_LIMIT_MS
            lib.slirp_pollfds_fill(slirp, timeout, self._add_poll_cb, _ffi.NULL)
            wait = min(int(timeout[0]), self._next_expiry_ms())
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            merged: dict[int, int] = {}
            for fd, mask in self._poll_fds:
                merged[fd] = merged.get(fd, 0) | mask
            for fd, mask in merged.items():
                poller.register(fd, mask)
            try:
                self._revents = dict(poller.poll(wait if not self._tx else 0))
                error = 0
            except InterruptedError:
                self._revents, error = {}, 1
            if self._closed:
                break
            lib.slirp_pollfds_poll(slirp, error, self._get_revents_cb, _ffi.NULL)
            if self._wake in self._revents:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            while self._tx:
                frame = self._tx.popleft()
                lib.slirp_input(slirp, frame, len(frame))
            self._fire_timers()
            if self._rx and self._deliver is not None:
                frames, self._rx = self._rx, []
                try:
                    self._deliver(frames)
                except Exception:
                    log.exception("libslirp: delivering %d frames to the NIC failed", len(frames))

    def _next_expiry_ms(self) -> int:
        expiries = [int(entry[2]) for entry in self._timers.values() if entry[2] is not None]
        if not expiries:
            return POLL_LIMIT_MS
        return max(0, (min(expiries) - time.monotonic_ns()) // 1_000_000 + 1)

    def _fire_timers(self) -> None:
        now = time.monotonic_ns()
        for entry in list(self._timers.values()):
            if entry[2] is not None and entry[2] <= now:
                entry[2] = None
                entry[0](entry[1])

    def close(self) -> None:
        """Stop the thread, then free libslirp (its sockets, forwarded ports included)."""
        if self._closed and self._slirp is None:
            return
        self._closed = True
        self._kick()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._slirp is not None:
            self.lib.slirp_cleanup(self._slirp)
            self._slirp = None
        os.close(self._wake)
        self._deliver = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "network": f"{NETWORK}/24", "gateway": GATEWAY, "dhcp_start": DHCP_START,
                "backend_tx_dropped": self.tx_dropped,
                "hostfwd": [f"{'udp' if f.udp else 'tcp'}:{f.host_addr}:{f.host_port}-{f.guest_addr}:{f.guest_port}"
                            for f in self.forwards]}
