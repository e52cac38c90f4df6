"""QMP's migrate for a machine: the state QEMU's clients poll with query-migrate,
the MIGRATION events, and the snapshot it writes (``file:PATH``).

A snapshot is written next to its destination and renamed over it once
complete and synced, so a failed or cancelled save never leaves a partial
file where a good one was.  The machine is paused while it is saved and stays
paused afterwards (QEMU's ``postmigrate``); ``cont`` resumes it.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mshvstack.errors import MshvError

if TYPE_CHECKING:
    from mshvstack.vmm.machine import Machine

FILE_SCHEME = "file:"
LIVE_SCHEMES = ("tcp:", "unix:", "exec:", "fd:")


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


class MigrationError(MshvError):
    """A migrate request that cannot be done (bad URI, one already running)."""


@dataclass
class MigrationInfo:
    status: MigrationStatus = MigrationStatus.NONE
    started: float = 0.0
    total_ms: int = 0
    downtime_ms: int = 0
    transferred: int = 0
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
        if self.error is not None:
            info["error-desc"] = self.error
        return info


def snapshot_path(uri: str) -> Path:
    """The file a ``file:PATH`` URI names; a clear error for any other URI."""
    if uri.startswith(FILE_SCHEME) and len(uri) > len(FILE_SCHEME):
        return Path(uri[len(FILE_SCHEME):])
    if uri.startswith(LIVE_SCHEMES):
        raise MigrationError(f"migration to {uri.split(':', 1)[0]}: is not supported yet: save to file:PATH and "
                             "start the destination with run --incoming file:PATH")
    raise MigrationError(f"unknown migration URI {uri!r}: use file:PATH")


class Migration:
    """One machine's migrate requests, run on their own thread."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.info = MigrationInfo()
        self._lock = threading.Lock()

    @property
    def completed(self) -> bool:
        return self.info.status is MigrationStatus.COMPLETED

    def start(self, uri: str) -> None:
        path = snapshot_path(uri)
        with self._lock:
            if self.info.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
                raise MigrationError("a migration is already running")
            self.info = MigrationInfo(MigrationStatus.SETUP, time.monotonic())
        self._machine.emit_event("MIGRATION", status=MigrationStatus.SETUP.value)
        threading.Thread(target=self._save, args=(path,), name="migration", daemon=True).start()

    def _set(self, status: MigrationStatus, **changes: Any) -> None:
        with self._lock:
            self.info.status = status
            for name, value in changes.items():
                setattr(self.info, name, value)
        self._machine.emit_event("MIGRATION", status=status.value)

    def _save(self, path: Path) -> None:
        machine = self._machine
        was_running = False
        partial = path.with_name(f".{path.name}.partial")
        try:
            was_running = machine.pause_if_running()
            paused_at = time.monotonic()
            self._set(MigrationStatus.ACTIVE)
            with open(partial, "wb") as out:
                size = machine.snapshot(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
            now = time.monotonic()
            self._set(MigrationStatus.COMPLETED, total_ms=int((now - self.info.started) * 1000),
                      downtime_ms=int((now - paused_at) * 1000), transferred=size)
        except (MshvError, OSError) as exc:
            partial.unlink(missing_ok=True)
            self._set(MigrationStatus.FAILED, error=str(exc))
            if was_running:
                machine.resume()
