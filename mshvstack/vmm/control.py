"""The client side of the control socket: a small synchronous QMP client and
the ``mshvstack ctl`` verbs on top of it.

Every verb is a QMP command (``pause`` is QEMU's ``stop``, ``poweroff`` is
``quit``, ...), so whatever ``ctl`` does, any QMP client can do too.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mshvstack.vmm.jsonstream import JsonInputError, JsonSplitter
from mshvstack.vmm.qmp import VENDOR, ControlError

# verb → the QMP command it sends
VERBS = {
    "status": VENDOR + "query-machine",
    "pause": "stop",
    "resume": "cont",
    "shutdown": "system_powerdown",
    "poweroff": "quit",
    "reset": "system_reset",
    "timesync": VENDOR + "timesync",
    "kvp": None,   # VENDOR + "kvp-<operation>"
    "snapshot": None,   # migrate to file:PATH, then query-migrate until it ends
    "migrate": None,    # migrate to a URI (unix:, tcp:, file:), then query-migrate until it ends
}
MIGRATION_POLL = 0.1         # seconds between query-migrate polls
KVP_OPERATIONS = ("get", "set", "delete", "list")
MAX_REPLY = 1 << 20          # bytes in one message from the server
MAX_DEPTH = 32               # nesting of one message (ours is at most 4 deep)
MAX_EVENTS = 64              # events kept while waiting for a reply (older ones are dropped)
MAX_TIMEOUT = 24 * 3600.0    # seconds: longer than any answer can take; larger values are a typo

__all__ = ["ControlError", "QmpClient", "QmpCommandError", "VERBS", "check_timeout", "request", "status_rows"]


class QmpCommandError(ControlError):
    """The machine answered a command with a QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class, self.desc = error_class, desc


def check_timeout(timeout: float) -> float:
    """``timeout`` if it is a usable number of seconds; ControlError otherwise."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise ControlError(f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} (got {timeout!r})")
    return float(timeout)


class QmpClient:
    """Connect, read the greeting, negotiate; then ``execute`` commands one at a time.

    ``timeout`` bounds each operation (the connection with its negotiation,
    each ``execute``) as a whole, however many events the server sends
    meanwhile; ``deadline`` (a ``time.monotonic()`` value) instead bounds
    everything this client does.  Events that arrive while a reply is awaited
    are kept in ``events``, the latest MAX_EVENTS of them (``events_dropped``
    counts the rest).  Whatever the server sends is checked: a message that
    is not a JSON object, too long or nested too deep, or a reply of the
    wrong shape, is a ControlError.
    """

    def __init__(self, path: Path, timeout: float = 30.0, deadline: float | None = None) -> None:
        self.path, self.timeout = path, check_timeout(timeout)
        self._deadline = deadline
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.events_dropped = 0
        self._splitter = JsonSplitter(max_value=MAX_REPLY, max_depth=MAX_DEPTH)
        self._messages: deque[Any | JsonInputError] = deque()
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        until = self._operation_deadline()
        try:
            self._sock.settimeout(self._remaining(until))
            self._sock.connect(str(path))
        except ControlError:
            self._sock.close()
            raise
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot reach {self.peer}: {exc.strerror or exc}") from None
        try:
            greeting = self._receive(until)
            if not isinstance(greeting.get("QMP"), dict):
                raise ControlError(f"{self.peer} is not a QMP server (its greeting is {_short(greeting)})")
            self.greeting = greeting["QMP"]
            self._execute("qmp_capabilities", None, until)
        except BaseException:
            self.close()
            raise

    @property
    def peer(self) -> str:
        """How errors name the server: its socket path."""
        return repr(str(self.path))

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _operation_deadline(self) -> float:
        own = time.monotonic() + self.timeout
        return own if self._deadline is None else min(own, self._deadline)

    def _remaining(self, until: float) -> float:
        left = until - time.monotonic()
        if left <= 0:
            raise ControlError(f"{self.peer} did not answer within {self.timeout:g} s")
        return left

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's return value; a QMP error raises QmpCommandError."""
        return self._execute(command, arguments, self._operation_deadline())

    def _execute(self, command: str, arguments: dict[str, Any] | None, until: float) -> Any:
        self._next_id += 1
        request_id = f"ctl-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.settimeout(self._remaining(until))
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except TimeoutError:
            raise ControlError(f"{self.peer} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"{self.peer} closed the connection ({exc.strerror or exc})") from None
        while True:
            reply = self._receive(until)
            if "event" in reply:
                if len(self.events) == self.events.maxlen:
                    self.events_dropped += 1
                self.events.append(reply)
                continue
            if reply.get("id") != request_id:
                raise ControlError(f"{self.peer} answered something else: {_short(reply)}")
            if "return" in reply:
                return reply["return"]
            error = reply.get("error")
            if isinstance(error, dict):
                raise QmpCommandError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            raise ControlError(f"{self.peer} sent a reply that is not QMP: {_short(reply)}")

    def _receive(self, until: float) -> dict[str, Any]:
        """The server's next message, a JSON object, by ``until`` (monotonic seconds)."""
        while not self._messages:
            self._sock.settimeout(self._remaining(until))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{self.peer} did not answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise ControlError(f"{self.peer} closed the connection ({exc.strerror or exc})") from None
            if not data:
                raise ControlError(f"{self.peer} closed the connection without a reply")
            self._messages.extend(self._splitter.feed(data))
            if not self._messages and self._splitter.problem is not None:
                raise ControlError(f"{self.peer} is not a QMP server (it sent a {self._splitter.problem})")
        message = self._messages.popleft()
        if isinstance(message, JsonInputError):
            raise ControlError(f"{self.peer} is not a QMP server (it sent something that is not JSON: {message.message})")
        if not isinstance(message, dict):
            raise ControlError(f"{self.peer} is not a QMP server (it sent {_short(message)})")
        return message


def _short(value: object) -> str:
    try:
        text = value.decode(errors="replace") if isinstance(value, bytes) else json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def request(path: Path, verb: str, arguments: dict[str, str] | None = None, timeout: float = 30.0,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one ``ctl`` verb: {"ok": True, **the machine's status} (kvp: {"ok": True, "pairs": [...]}),
    or {"ok": False, "error": ...} when the machine refuses; ControlError when it cannot be asked
    or answers something else.  ``timeout`` bounds the whole exchange; ``progress`` hears each
    query-migrate answer of a snapshot or migration while it runs."""
    if verb not in VERBS:
        raise ControlError(f"unknown command {verb!r}: one of {', '.join(VERBS)}")
    timeout = check_timeout(timeout)
    arguments = dict(arguments or {})
    with QmpClient(path, timeout, deadline=time.monotonic() + timeout) as client:
        try:
            if verb == "kvp":
                return {"ok": True, "pairs": _kvp(client, arguments)}
            if verb == "snapshot":
                target = arguments.get("path", "")
                if not target:
                    raise QmpCommandError("GenericError", "snapshot needs the file to write: ctl SOCKET snapshot PATH")
                return {"ok": True, "snapshot": target, **_migrate(client, f"file:{Path(target).resolve()}", progress)}
            if verb == "migrate":
                return {"ok": True, **_migrate(client, arguments.get("uri", ""), progress)}
            command = VERBS[verb]
            assert command is not None
            if command != VENDOR + "query-machine":
                client.execute(command)
            status = client.execute(VENDOR + "query-machine")
        except QmpCommandError as exc:
            return {"ok": False, "error": exc.desc, "class": exc.error_class}
        status_rows(status, client.peer)   # refuses a status of another shape
        return {"ok": True, **status}


def _migrate(client: QmpClient, uri: str, progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """QMP migrate to ``uri``, then query-migrate until it ends: bytes sent, downtime, total time."""
    client.execute("migrate", {"uri": uri})
    while True:
        info = client.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            ram = info.get("ram")
            if not isinstance(ram, dict) or not isinstance(ram.get("transferred"), int):
                raise ControlError(f"{client.peer} answered query-migrate with {_short(info)}")
            return {"bytes": ram["transferred"], "downtime_ms": info.get("downtime"), "total_ms": info.get("total-time")}
        if status in ("failed", "cancelled"):
            raise QmpCommandError("GenericError", f"the migration {status}: {info.get('error-desc', 'migrate_cancel')}")
        if status not in ("setup", "active"):
            raise ControlError(f"{client.peer} answered query-migrate with {_short(info)}")
        if progress is not None:
            progress(info)
        time.sleep(MIGRATION_POLL)


def _kvp(client: QmpClient, arguments: dict[str, str]) -> list[dict[str, Any]]:
    operation = arguments.pop("operation", "")
    if operation not in KVP_OPERATIONS:
        raise QmpCommandError("GenericError", f"unknown KVP operation {operation!r}: {', '.join(KVP_OPERATIONS)}")
    wanted = {"get": ("key", "pool"), "set": ("key", "value", "pool"), "delete": ("key", "pool"), "list": ("pool",)}[operation]
    command = f"{VENDOR}kvp-{operation}"
    result = client.execute(command, {k: v for k, v in arguments.items() if k in wanted and v != ""})
    if operation == "get":
        return [_pair(result, f"{client.peer} answered {command} with")]
    if operation == "list":
        if not isinstance(result, list):
            raise ControlError(f"{client.peer} answered {command} with {_short(result)}, not a list of pairs")
        return [_pair(item, f"{client.peer} answered {command} with") for item in result]
    return [{"key": arguments.get("key", ""), "value": arguments.get("value", "")}]


def _pair(value: Any, context: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("key"), str) or not isinstance(value.get("value"), str):
        raise ControlError(f"{context} {_short(value)}, not a key/value pair")
    return value


_SCALAR = (str, int, float, bool, type(None))


class _Shape:
    """Reads a reply's fields, with one clear error for the first one of the wrong shape."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def fail(self, where: str, value: Any, wanted: str) -> ControlError:
        return ControlError(f"{self.peer} sent a machine status of another shape: {where} is {_short(value)}, not {wanted}")

    def object(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, value, "an object")
        return value

    def field(self, obj: dict[str, Any], key: str, where: str, required: bool = True) -> Any:
        if key not in obj:
            if required:
                raise ControlError(f"{self.peer} sent a machine status of another shape: {where}{key} is missing")
            return None
        value = obj[key]
        if not isinstance(value, _SCALAR):
            raise self.fail(where + key, value, "a number or a string")
        return value


def status_rows(status: Any, peer: str = "the machine") -> list[tuple[str, str]]:
    """The lines ``ctl`` prints for a machine status (``__org.mshvstack_query-machine``),
    as (label, text); ControlError when the status has another shape."""
    shape = _Shape(peer)
    status = shape.object(status, "the status")
    rows = [(key, str(shape.field(status, key, "", required=False)))
            for key in ("state", "backend", "vcpus", "memory", "uptime", "exits", "reason")]
    vmbus = status.get("vmbus")
    if vmbus is not None:
        vmbus = shape.object(vmbus, "vmbus")
        rows.append(("vmbus", f"{shape.field(vmbus, 'state', 'vmbus.')} (version {shape.field(vmbus, 'version', 'vmbus.')})"))
        channels = vmbus.get("channels", [])
        if not isinstance(channels, list):
            raise shape.fail("vmbus.channels", channels, "a list")
        for i, channel in enumerate(channels):
            where = f"vmbus.channels[{i}]."
            channel = shape.object(channel, where[:-1])
            rows.append((f"  {shape.field(channel, 'device', where)}",
                         f"{shape.field(channel, 'state', where)}, {shape.field(channel, 'packets_in', where)} in / "
                         f"{shape.field(channel, 'packets_out', where)} out"))
        heartbeat = shape.object(vmbus.get("heartbeat"), "vmbus.heartbeat")
        rows.append(("  heartbeat", f"sequence {shape.field(heartbeat, 'sequence', 'vmbus.heartbeat.')}, "
                                    f"guest alive: {shape.field(heartbeat, 'guest_alive', 'vmbus.heartbeat.')}"))
    counts = shape.object(status.get("exit_counts", {}), "exit_counts")
    rows.extend((f"  {kind}", str(shape.field(counts, kind, "exit_counts."))) for kind in counts)
    return rows
