"""QMP's migrate for a machine: the state QEMU's clients poll with query-migrate,
the MIGRATION events, and the snapshot it writes (``file:PATH``).

A snapshot is a migration into a file, pre-copied while the guest runs (it
is paused only for the last pages and the devices, as QEMU's ``exec:``
migration does), written next to its destination and renamed over it once
complete and synced, so a failed or cancelled save never leaves a partial
file where a good one was.  The machine stays paused afterwards (QEMU's
``postmigrate``); ``cont`` resumes it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from mshvstack.errors import MshvError
from mshvstack.vmm.sentcopy import SentCopy

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mshvstack.vmm.machine import Machine

FILE_SCHEME = "file:"
LIVE_SCHEMES = ("tcp:", "unix:")
MAX_PASSES = 30              # pre-copy passes before the machine is paused regardless
MIN_FINAL_PAGES = 64         # always few enough to send while paused, whatever the measured bandwidth
PAGE = 4096
CONNECT_TIMEOUT = 30.0
MAX_DOWNTIME_LIMIT_MS = 2_000_000   # QEMU's bound on downtime-limit


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class MigrationParameters:
    """migrate-set-parameters: the pause the pre-copy aims at (ms), and the send rate
    while the guest runs (bytes/s, 0: unlimited; the paused last pass is never slowed)."""

    downtime_limit_ms: int = 300
    max_bandwidth: int = 0

    def as_qmp(self) -> dict[str, int]:
        return {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": self.max_bandwidth}


class _Throttled:
    """The stream to the destination, kept under ``max_bandwidth`` while ``limited``."""

    def __init__(self, out: BinaryIO, parameters: MigrationParameters) -> None:
        self._out, self._parameters = out, parameters
        self.limited = True
        self._started, self._sent = time.monotonic(), 0

    def write(self, data: bytes) -> int:
        written = self._out.write(data)
        self._sent += len(data)
        rate = self._parameters.max_bandwidth
        if self.limited and rate:
            ahead = self._sent / rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)
        return written

    def flush(self) -> None:
        self._out.flush()


class MigrationError(MshvError):
    """A migrate request that cannot be done (bad URI, one already running)."""


@dataclass
class MigrationInfo:
    status: MigrationStatus = MigrationStatus.NONE
    started: float = 0.0
    total_ms: int = 0
    downtime_ms: int = 0
    transferred: int = 0
    remaining: int = 0
    dirty_rate: int = 0        # pages per second, the last pass
    passes: int = 0
    error: str | None = None

    def as_qmp(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo (times in ms)."""
        if self.status is MigrationStatus.NONE:
            return {}
        info: dict[str, Any] = {"status": self.status.value}
        if self.status is MigrationStatus.COMPLETED:
            info.update({"total-time": self.total_ms, "downtime": self.downtime_ms,
                         "ram": {"transferred": self.transferred, "remaining": 0, "total": self.transferred}})
        elif self.status is MigrationStatus.ACTIVE:
            info["total-time"] = int((time.monotonic() - self.started) * 1000)
            info["ram"] = {"transferred": self.transferred, "remaining": self.remaining,
                           "dirty-pages-rate": self.dirty_rate, "dirty-sync-count": self.passes}
        if self.error is not None:
            info["error-desc"] = self.error
        return info


def snapshot_path(uri: str) -> Path:
    """The file a ``file:PATH`` URI names; a clear error for any other URI."""
    if uri.startswith(FILE_SCHEME) and len(uri) > len(FILE_SCHEME):
        return Path(uri[len(FILE_SCHEME):])
    raise MigrationError(f"{uri!r} is not a file:PATH URI")


def socket_address(uri: str) -> tuple[int, str | tuple[str, int]]:
    """(address family, address) of ``unix:PATH`` or ``tcp:HOST:PORT``."""
    if uri.startswith("unix:") and len(uri) > 5:
        return socket.AF_UNIX, uri[5:]
    if uri.startswith("tcp:"):
        host, _, port = uri[4:].rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return socket.AF_INET, (host.strip("[]"), int(port))
    raise MigrationError(f"unknown migration URI {uri!r}: use file:PATH, unix:PATH or tcp:HOST:PORT")


def listen_incoming(uri: str) -> socket.socket:
    """The destination's side of ``run --incoming unix:|tcp:``: the one connection it accepts."""
    family, address = socket_address(uri)
    with socket.socket(family, socket.SOCK_STREAM) as server:
        if family == socket.AF_INET:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif os.path.exists(str(address)):
            raise MigrationError(f"{address} exists: remove it or choose another socket path")
        try:
            server.bind(address)
            server.listen(1)
            connection, _peer = server.accept()
        except OSError as exc:
            raise MigrationError(f"cannot listen on {uri}: {exc.strerror}") from None
        finally:
            if family == socket.AF_UNIX:
                Path(str(address)).unlink(missing_ok=True)
    return connection


class Migration:
    """One machine's migrate requests, run on their own thread."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.info = MigrationInfo()
        self.parameters = MigrationParameters()
        # ``info``: written by the migration thread alone; the lock makes a change of several fields
        # (_set, start) and QMP's read of them (query) one step each.  A leaf: events after it.
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._connection: socket.socket | None = None

    @property
    def completed(self) -> bool:
        return self.info.status is MigrationStatus.COMPLETED

    def query(self) -> dict[str, Any]:
        """query-migrate's answer, read as one (never a status beside the last one's figures)."""
        with self._lock:
            return self.info.as_qmp()

    def start(self, uri: str) -> None:
        target: Any = snapshot_path(uri) if uri.startswith(FILE_SCHEME) else socket_address(uri)
        if getattr(self._machine, "nics", None):
            raise MigrationError("a machine with a NIC (--net) cannot be saved or migrated yet: the NIC's state is not a record")
        with self._lock:
            if self.info.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
                raise MigrationError("a migration is already running")
            self.info = MigrationInfo(MigrationStatus.SETUP, time.monotonic())
        self._cancel = threading.Event()
        self._machine.emit_event("MIGRATION", status=MigrationStatus.SETUP.value)
        work = self._save if isinstance(target, Path) else self._send
        threading.Thread(target=work, args=(target,), name="migration", daemon=True).start()

    def set_parameters(self, downtime_limit_ms: int | None = None, max_bandwidth: int | None = None) -> None:
        """migrate-set-parameters (a running migration takes them at its next pass or write)."""
        if downtime_limit_ms is not None and not 0 <= downtime_limit_ms <= MAX_DOWNTIME_LIMIT_MS:
            raise MigrationError(f"downtime-limit must be between 0 and {MAX_DOWNTIME_LIMIT_MS} ms")
        if max_bandwidth is not None and not 0 <= max_bandwidth < 1 << 63:
            raise MigrationError("max-bandwidth must be a number of bytes per second (0: unlimited)")
        if downtime_limit_ms is not None:
            self.parameters.downtime_limit_ms = downtime_limit_ms
        if max_bandwidth is not None:
            self.parameters.max_bandwidth = max_bandwidth

    def cancel(self) -> None:
        """migrate_cancel: a live migration stops (a send blocked on a slow destination
        too); the source runs on."""
        if self.info.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            self._cancel.set()
            connection = self._connection
            if connection is not None:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _set(self, status: MigrationStatus, **changes: Any) -> None:
        with self._lock:
            self.info.status = status
            for name, value in changes.items():
                setattr(self.info, name, value)
        self._machine.emit_event("MIGRATION", status=status.value)

    def _save(self, path: Path) -> None:
        """A snapshot is a migration into a file: written beside ``path``, synced, then
        renamed over it (a failed or cancelled save leaves no partial file there)."""
        partial = path.with_name(f".{path.name}.partial")

        @contextlib.contextmanager
        def into_file() -> Iterator[BinaryIO]:
            with open(partial, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)

        if not self._transfer(into_file(), compress=True):
            partial.unlink(missing_ok=True)

    def _send(self, target: tuple[int, Any]) -> None:
        family, address = target

        @contextlib.contextmanager
        def over_socket() -> Iterator[BinaryIO]:
            with socket.socket(family, socket.SOCK_STREAM) as connection:
                self._connection = connection
                connection.settimeout(CONNECT_TIMEOUT)
                connection.connect(address)
                connection.settimeout(None)
                out = cast(BinaryIO, connection.makefile("wb", buffering=1 << 20))
                yield out
                out.flush()

        try:
            self._transfer(over_socket())
        finally:
            self._connection = None

    def _transfer(self, stream: contextlib.AbstractContextManager[BinaryIO], compress: bool = False) -> bool:
        """Pre-copy into ``stream``: all of RAM while the guest runs, then the pages changed
        since, pass after pass, until what is left fits the downtime limit (or MAX_PASSES);
        then paused: the last pages, the VPs, the components and the clock.  Changed pages
        come from the hypervisor's dirty bitmap (the guest's writes) with the memory's log
        (the VMM's own), or, where the partition cannot track them, from comparing RAM with
        what was sent (sentcopy.py).  ``compress``: memory as MEMORY_ZLIB sections.  True
        once complete; the source then stays paused."""
        from mshvstack.snapshot import StreamWriter
        from mshvstack.vmm import machinestate

        machine = self._machine
        paused = tracking = False
        try:
            with stream as raw:
                out = _Throttled(raw, self.parameters)
                writer = StreamWriter(cast(BinaryIO, out))
                machinestate.write_config(machine, writer)
                self._set(MigrationStatus.ACTIVE)
                tracking = self._start_tracking()
                sent = None if tracking else SentCopy(machine.partition.memory)

                def changed() -> set[int]:
                    return self._take_dirty() if sent is None else sent.changed()

                first_pass = time.monotonic()
                self.info.transferred += machinestate.write_memory(machine, writer, copy=sent, compress=compress)
                bandwidth = self.info.transferred / max(time.monotonic() - first_pass, 1e-3)   # bytes/s
                for _ in range(MAX_PASSES):
                    if self._cancel.is_set():
                        raise _Cancelled
                    started = time.monotonic()
                    dirty = changed()
                    self.info.passes += 1
                    self.info.remaining = len(dirty) * PAGE
                    # Few enough to send within the downtime limit at the bandwidth the first pass had.
                    if len(dirty) <= max(MIN_FINAL_PAGES, bandwidth * self.parameters.downtime_limit_ms / 1000 / PAGE):
                        break
                    self.info.transferred += machinestate.write_memory(machine, writer, dirty, sent, compress)
                    self.info.dirty_rate = int(len(dirty) / max(time.monotonic() - started, 1e-3))
                else:
                    dirty = set()
                paused = machine.pause_if_running()
                paused_at = time.monotonic()
                out.limited = False
                machine.wait_parked()
                self.info.transferred += machinestate.write_stopped(machine, writer, dirty | changed(), compress)
            now = time.monotonic()
            self._stop_tracking(tracking)
            self._set(MigrationStatus.COMPLETED, total_ms=int((now - self.info.started) * 1000),
                      downtime_ms=int((now - paused_at) * 1000), remaining=0)
            return True
        except _Cancelled:
            outcome: dict[str, Any] = {"status": MigrationStatus.CANCELLED}
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the migration fails and the source runs on
            outcome = ({"status": MigrationStatus.CANCELLED} if self._cancel.is_set() else
                       {"status": MigrationStatus.FAILED, "error": str(exc) or type(exc).__name__})
        self._stop_tracking(tracking)
        if paused:
            machine.resume()   # before the event: a client that acts on it finds the guest running
        self._set(**outcome)
        return False

    def _start_tracking(self) -> bool:
        """Dirty-page tracking for pre-copy; False where the partition refuses it (the
        simulator beyond its limit): pages are then compared with what was sent."""
        partition = self._machine.partition
        try:
            partition.enable_dirty_tracking(True)
        except MshvError as exc:
            log.warning("no dirty-page tracking (%s): stop-and-copy", exc)
            return False
        partition.memory.log_writes(True)
        self._take_dirty()   # from now on
        return True

    def _take_dirty(self) -> set[int]:
        memory = self._machine.partition.memory
        dirty = memory.take_logged()
        for region in memory.regions:
            dirty.update(self._machine.partition.dirty_pages(region.gpa, region.size))
        return dirty

    def _stop_tracking(self, tracking: bool) -> None:
        """Tracking is turned off with every dirty bit set first (the hypervisor requires it)."""
        partition = self._machine.partition
        partition.memory.log_writes(False)
        if not tracking:
            return
        try:
            for region in partition.memory.regions:
                partition.dirty_pages(region.gpa, region.size, clear=False)
            partition.enable_dirty_tracking(False)
        except MshvError as exc:
            log.warning("dirty-page tracking stays on: %s", exc)


class _Cancelled(Exception):
    """migrate_cancel was asked for."""
