"""Where a machine is in its life, and why a run ended (the names QMP uses)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mshvstack.errors import MshvError


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    DEBUG_EXIT = "debug-exit"
    TRIPLE_FAULT = "triple-fault"
    RESET = "reset"
    POWEROFF = "poweroff"
    HALTED = "halted"
    PANIC = "guest-panic"
    ERROR = "error"


class ShutdownCause(enum.Enum):
    """Who ended the run, in QMP's ShutdownCause names (the SHUTDOWN event's reason)."""

    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_UI = "host-ui"
    HOST_SIGNAL = "host-signal"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"

    @property
    def by_guest(self) -> bool:
        return self.value.startswith("guest-")


_CAUSE_OF = {StopKind.DEBUG_EXIT: ShutdownCause.GUEST_SHUTDOWN, StopKind.TRIPLE_FAULT: ShutdownCause.GUEST_RESET,
             StopKind.RESET: ShutdownCause.GUEST_RESET, StopKind.POWEROFF: ShutdownCause.GUEST_SHUTDOWN,
             StopKind.HALTED: ShutdownCause.GUEST_SHUTDOWN, StopKind.PANIC: ShutdownCause.GUEST_PANIC,
             StopKind.ERROR: ShutdownCause.HOST_ERROR}
PANIC_EXIT_CODE = 4


@dataclass(frozen=True)
class StopReason:
    kind: StopKind
    exit_code: int
    detail: str = ""
    cause: ShutdownCause | None = None   # None: the kind's usual cause

    @property
    def shutdown_cause(self) -> ShutdownCause:
        return self.cause or _CAUSE_OF[self.kind]

    def __str__(self) -> str:
        return f"{self.kind.value} (exit code {self.exit_code}){': ' + self.detail if self.detail else ''}"


Listener = Callable[[str, dict[str, Any]], None]


class MachineError(MshvError):
    """The machine cannot be built or run."""
