"""The client side of the control socket: a small synchronous QMP client and
the ``mshvstack ctl`` verbs on top of it.

Every verb is a QMP command (``pause`` is QEMU's ``stop``, ``poweroff`` is
``quit``, ...), so whatever ``ctl`` does, any QMP client can do too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

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
}
KVP_OPERATIONS = ("get", "set", "delete", "list")
MAX_REPLY = 1 << 20

__all__ = ["ControlError", "QmpClient", "QmpCommandError", "VERBS", "request"]


class QmpCommandError(ControlError):
    """The machine answered a command with a QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class, self.desc = error_class, desc


class QmpClient:
    """Connect, read the greeting, negotiate; then ``execute`` commands one at a time
    (events that arrive meanwhile are kept in ``events``)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = b""
        self._next_id = 0
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot reach {str(path)!r}: {exc.strerror or exc}") from None
        try:
            greeting = self._receive()
            if not isinstance(greeting.get("QMP"), dict):
                raise ControlError(f"{str(path)!r} is not a QMP server (its greeting is {_short(greeting)})")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's return value; a QMP error raises QmpCommandError."""
        self._next_id += 1
        request_id = f"ctl-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise ControlError(f"{str(self.path)!r} closed the connection ({exc.strerror or exc})") from None
        while True:
            reply = self._receive()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != request_id:
                raise ControlError(f"{str(self.path)!r} answered something else: {_short(reply)}")
            if "return" in reply:
                return reply["return"]
            error = reply.get("error")
            if isinstance(error, dict):
                raise QmpCommandError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            raise ControlError(f"{str(self.path)!r} sent a reply that is not QMP: {_short(reply)}")

    def _receive(self) -> dict[str, Any]:
        """One newline-terminated JSON object from the server."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY:
                raise ControlError(f"{str(self.path)!r} sent more than {MAX_REPLY} bytes without a line end")
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{str(self.path)!r} did not answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise ControlError(f"{str(self.path)!r} closed the connection ({exc.strerror or exc})") from None
            if not data:
                raise ControlError(f"{str(self.path)!r} closed the connection without a reply")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise ControlError(f"{str(self.path)!r} is not a QMP server (it sent {_short(line)})") from None
        if not isinstance(message, dict):
            raise ControlError(f"{str(self.path)!r} is not a QMP server (it sent {_short(message)})")
        return message


def _short(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def request(path: Path, verb: str, arguments: dict[str, str] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Run one ``ctl`` verb: {"ok": True, **the machine's status} (kvp: {"ok": True, "pairs": [...]}),
    or {"ok": False, "error": ...} when the machine refuses; ControlError when it cannot be asked."""
    if verb not in VERBS:
        raise ControlError(f"unknown command {verb!r}: one of {', '.join(VERBS)}")
    arguments = dict(arguments or {})
    with QmpClient(path, timeout) as client:
        try:
            if verb == "kvp":
                return {"ok": True, "pairs": _kvp(client, arguments)}
            command = VERBS[verb]
            assert command is not None
            if command != VENDOR + "query-machine":
                client.execute(command)
            status = client.execute(VENDOR + "query-machine")
        except QmpCommandError as exc:
            return {"ok": False, "error": exc.desc, "class": exc.error_class}
        return {"ok": True, **status}


def _kvp(client: QmpClient, arguments: dict[str, str]) -> list[dict[str, Any]]:
    operation = arguments.pop("operation", "")
    if operation not in KVP_OPERATIONS:
        raise QmpCommandError("GenericError", f"unknown KVP operation {operation!r}: {', '.join(KVP_OPERATIONS)}")
    wanted = {"get": ("key", "pool"), "set": ("key", "value", "pool"), "delete": ("key", "pool"), "list": ("pool",)}[operation]
    result = client.execute(f"{VENDOR}kvp-{operation}", {k: v for k, v in arguments.items() if k in wanted and v != ""})
    if operation == "get":
        return [result]
    if operation == "list":
        return list(result)
    return [{"key": arguments.get("key", ""), "value": arguments.get("value", "")}]
