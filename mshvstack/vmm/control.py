"""Control API: JSON lines over a UNIX socket (`mshvstack ctl SOCKET ...`).

Request: {"command": "status" | "pause" | "resume" | "shutdown" | "poweroff" | "timesync" | "kvp", ...}
Reply:   {"ok": true, ...} or {"ok": false, "error": "one line"}
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from mshvstack.errors import MshvError
from mshvstack.vmm.machine import Machine

COMMANDS = ("status", "pause", "resume", "shutdown", "poweroff", "timesync", "kvp")
MAX_REQUEST = 64 * 1024


class ControlError(MshvError):
    """The control socket cannot be created or reached."""


class ControlServer:
    def __init__(self, machine: Machine, path: Path) -> None:
        self.machine = machine
        self.path = path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode) or _alive(path):
                raise ControlError(f"--api-socket {str(path)!r} is taken (a file or a live socket is there)")
            path.unlink()  # a stale socket left by a crashed run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"--api-socket {str(path)!r}: {exc.strerror}") from None
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(client,), daemon=True).start()

    def _client(self, client: socket.socket) -> None:
        try:
            with client, client.makefile("rwb") as stream:
                while True:
                    line = stream.readline(MAX_REQUEST + 1)
                    if not line:
                        return  # client went away (possibly mid-request)
                    stream.write(json.dumps(self.handle(line)).encode() + b"\n")
                    stream.flush()
        except OSError:
            pass  # the client disconnected; nothing to answer

    def handle(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": "request too long"}
        try:
            request = json.loads(line)
            command = request["command"] if isinstance(request, dict) else None
        except (ValueError, KeyError):
            return {"ok": False, "error": 'bad request: send one JSON object per line, e.g. {"command": "status"}'}
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command {command!r}: one of {', '.join(COMMANDS)}"}
        try:
            if command == "kvp":
                args = {k: str(request.get(k, "")) for k in ("operation", "pool", "key", "value")}
                pairs = self.machine.kvp_request(args["operation"], args["pool"] or "external", args["key"], args["value"])
                return {"ok": True, "pairs": pairs}
            actions = {"pause": self.machine.pause, "resume": self.machine.resume, "shutdown": self.machine.shutdown,
                       "poweroff": self.machine.poweroff, "timesync": self.machine.sync_time}
            if command in actions:
                actions[command]()
        except MshvError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, **self.machine.status()}

    def close(self) -> None:
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(path: Path, command: str, arguments: dict[str, str] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command (with arguments) to a running machine's control socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach {str(path)!r}: {exc.strerror or exc}") from None
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps({"command": command, **(arguments or {})}).encode() + b"\n")
        stream.flush()
        line = stream.readline()
    if not line:
        raise ControlError(f"{str(path)!r} closed the connection without a reply")
    reply: dict[str, Any] = json.loads(line)
    return reply
