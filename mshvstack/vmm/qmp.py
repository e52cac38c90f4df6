"""The machine's control socket: the QEMU Machine Protocol over a UNIX socket.

Existing QMP clients (qemu.qmp, virsh qemu-monitor-command, socat scripts)
drive a machine unchanged: the greeting, ``qmp_capabilities``, QEMU's
commands where the machine has the concept (query-version, query-status,
query-commands, query-cpus-fast, stop, cont, system_powerdown, system_reset,
quit) with QEMU's error classes, and the asynchronous events STOP, RESUME,
POWERDOWN, RESET, SHUTDOWN and GUEST_PANICKED.  What only this VMM has (KVP,
VMBus, disks, exit statistics, time sync) is under the downstream prefix
``__org.mshvstack_``, as the QMP specification asks of extensions.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mshvstack import __version__
from mshvstack.errors import MshvError
from mshvstack.vmm.jsonstream import JsonInputError, JsonSplitter
from mshvstack.vmm.machine import Machine, RunState, ShutdownCause, StopKind
from mshvstack.vmm.migration import MigrationError

log = logging.getLogger(__name__)
VENDOR = "__org.mshvstack_"
OUTGOING_LIMIT = 1024    # messages queued for a client that does not read; beyond it the client is dropped
ENVELOPE = frozenset({"execute", "arguments", "id"})


class ControlError(MshvError):
    """The control socket cannot be created or reached, or does not speak QMP."""


class ErrorClass(enum.Enum):
    """QMP's error classes."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"


class QmpError(Exception):
    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc, self.error_class = desc, error_class


@dataclass(frozen=True)
class Param:
    kind: type
    required: bool = True


@dataclass(frozen=True)
class Command:
    handler: Callable[[Session, dict[str, Any]], Any]
    params: dict[str, Param]


COMMANDS: dict[str, Command] = {}


def command(name: str, **params: Param) -> Callable[[Callable[[Session, dict[str, Any]], Any]], Callable[[Session, dict[str, Any]], Any]]:
    def register(handler: Callable[[Session, dict[str, Any]], Any]) -> Callable[[Session, dict[str, Any]], Any]:
        COMMANDS[name] = Command(handler, params)
        return handler
    return register


def _version() -> dict[str, Any]:
    major, minor, micro = (int(part) for part in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"mshvstack {__version__}"}


def _timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int(now * 1_000_000) % 1_000_000}


class QmpServer:
    """Listens on ``path``; one session (a thread that reads and one that writes) per client."""

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
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()   # the sessions and _closed (accept thread, close): a leaf
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="qmp-accept", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                session = Session(self, client)
                self._sessions.add(session)
            session.start()

    def forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def close(self) -> None:
        """Stop listening, end every session and join the threads (nothing is left behind)."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() below
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        for session in sessions:
            session.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Session:
    """One client: greeting, capabilities negotiation, then commands and events."""

    def __init__(self, server: QmpServer, sock: socket.socket) -> None:
        self.server, self.machine, self.sock = server, server.machine, sock
        self.negotiated = False
        self.after_reply: Callable[[], None] | None = None   # what a command does once its reply is queued
        self._outgoing: queue.Queue[bytes | None] = queue.Queue(OUTGOING_LIMIT)
        self._unsubscribe: Callable[[], None] | None = None
        self._reader = threading.Thread(target=self._read, name="qmp-session", daemon=True)
        self._writer = threading.Thread(target=self._write, name="qmp-writer", daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in (self._reader, self._writer):
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    # ---- transport
    def send(self, message: dict[str, Any]) -> None:
        try:
            self._outgoing.put_nowait(json.dumps(message).encode() + b"\r\n")
        except queue.Full:
            log.warning("QMP client is not reading; dropping it")
            self._hang_up()

    def _hang_up(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self) -> None:
        while True:
            data = self._outgoing.get()
            if data is None:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self._hang_up()
                return

    def _read(self) -> None:
        splitter = JsonSplitter()
        try:
            self.send({"QMP": {"version": _version(), "capabilities": []}})
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return  # the client left, perhaps in the middle of a command
                for item in splitter.feed(data):
                    self.send(self.handle(item))
                    action, self.after_reply = self.after_reply, None
                    if action is not None:
                        action()
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.server.forget(self)
            try:
                self._outgoing.put(None, timeout=1)
            except queue.Full:
                pass
            self._writer.join(timeout=5)
            self.sock.close()

    def negotiate(self) -> None:
        """Capabilities agreed: commands are taken and the machine's events come to this client."""
        self.negotiated = True
        self._unsubscribe = self.machine.subscribe(self._event)

    def _event(self, event: str, data: dict[str, Any]) -> None:
        message: dict[str, Any] = {"event": event, "timestamp": _timestamp()}
        if data:
            message["data"] = data
        self.send(message)

    # ---- requests
    def handle(self, request: Any) -> dict[str, Any]:
        """The reply to one request (a parsed JSON value or the splitter's error)."""
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            result = self._dispatch(request)
        except QmpError as exc:
            reply: dict[str, Any] = {"error": {"class": exc.error_class.value, "desc": exc.desc}}
        else:
            reply = {"return": result}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request_id
        return reply

    def _dispatch(self, request: Any) -> Any:
        if isinstance(request, JsonInputError):
            raise QmpError(request.message)
        if not isinstance(request, dict):
            raise QmpError("QMP input must be a JSON object")
        for member in request:
            if member not in ENVELOPE:
                raise QmpError(f"QMP input member '{member}' is unexpected")
        name = request.get("execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        found = COMMANDS.get(name)
        if not self.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", ErrorClass.COMMAND_NOT_FOUND)
        if found is None:
            raise QmpError(f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        _check_arguments(found.params, arguments)
        try:
            return found.handler(self, arguments)
        except QmpError:
            raise
        except (MshvError, ValueError) as exc:
            raise QmpError(str(exc)) from None
        except Exception as exc:
            log.exception("QMP command %s failed", name)
            raise QmpError(f"{name} failed: {exc}") from None


def _check_arguments(params: dict[str, Param], arguments: dict[str, Any]) -> None:
    for key, value in arguments.items():
        param = params.get(key)
        if param is None:
            raise QmpError(f"Parameter '{key}' is unexpected")
        if not isinstance(value, param.kind) or (param.kind is int and isinstance(value, bool)):
            expected = {str: "string", list: "array", int: "integer", bool: "boolean"}.get(param.kind, param.kind.__name__)
            raise QmpError(f"Invalid parameter type for '{key}', expected: {expected}")
    for key, param in params.items():
        if param.required and key not in arguments:
            raise QmpError(f"Parameter '{key}' is missing")


# ---- QEMU's commands
@command("qmp_capabilities", enable=Param(list, required=False))
def _qmp_capabilities(session: Session, args: dict[str, Any]) -> Any:
    if session.negotiated:
        raise QmpError("Capabilities negotiation is already complete, command ignored", ErrorClass.COMMAND_NOT_FOUND)
    for capability in args.get("enable", []):
        raise QmpError(f"Capability '{capability}' not available")
    session.negotiate()
    return {}


@command("query-version")
def _query_version(session: Session, args: dict[str, Any]) -> Any:
    return _version()


@command("query-commands")
def _query_commands(session: Session, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in COMMANDS]


def _run_status(machine: Machine) -> str:
    if machine.state is RunState.STOPPED:
        kind = machine.reason.kind if machine.reason else None
        return {StopKind.PANIC: "guest-panicked", StopKind.ERROR: "internal-error"}.get(kind, "shutdown")  # type: ignore[arg-type]
    if machine.state is RunState.PAUSED and machine.migration.completed:
        return "postmigrate"
    return {RunState.CREATED: "prelaunch", RunState.RUNNING: "running", RunState.PAUSED: "paused"}[machine.state]


@command("query-status")
def _query_status(session: Session, args: dict[str, Any]) -> Any:
    machine = session.machine
    return {"running": machine.state is RunState.RUNNING, "status": _run_status(machine), "singlestep": False}


@command("stop")
def _stop(session: Session, args: dict[str, Any]) -> Any:
    if session.machine.state is RunState.RUNNING:
        session.machine.pause()
    elif session.machine.state is not RunState.PAUSED:
        raise QmpError(f"the machine is {session.machine.state.value}")
    return {}


@command("cont")
def _cont(session: Session, args: dict[str, Any]) -> Any:
    if session.machine.state is RunState.PAUSED:
        session.machine.resume()
    elif session.machine.state is not RunState.RUNNING:
        raise QmpError("the machine has stopped: only a new run can start it again")
    return {}


def _live(session: Session) -> Machine:
    if session.machine.state not in (RunState.RUNNING, RunState.PAUSED):
        raise QmpError(f"the machine is {session.machine.state.value}")
    return session.machine


@command("migrate", uri=Param(str))
def _migrate(session: Session, args: dict[str, Any]) -> Any:
    _live(session)
    try:
        session.machine.migration.start(args["uri"])
    except MigrationError as exc:
        raise QmpError(str(exc)) from None
    return {}


@command("migrate_cancel")
def _migrate_cancel(session: Session, args: dict[str, Any]) -> Any:
    session.machine.migration.cancel()
    return {}


@command("migrate-set-parameters", **{"downtime-limit": Param(int, False), "max-bandwidth": Param(int, False)})
def _migrate_set_parameters(session: Session, args: dict[str, Any]) -> Any:
    try:
        session.machine.migration.set_parameters(args.get("downtime-limit"), args.get("max-bandwidth"))
    except MigrationError as exc:
        raise QmpError(str(exc)) from None
    return {}


@command("query-migrate-parameters")
def _query_migrate_parameters(session: Session, args: dict[str, Any]) -> Any:
    return session.machine.migration.parameters.as_qmp()


@command("query-migrate")
def _query_migrate(session: Session, args: dict[str, Any]) -> Any:
    return session.machine.migration.query()


@command("system_powerdown")
def _system_powerdown(session: Session, args: dict[str, Any]) -> Any:
    _live(session).shutdown()
    return {}


@command("system_reset")
def _system_reset(session: Session, args: dict[str, Any]) -> Any:
    _live(session).reset()
    return {}


@command("quit")
def _quit(session: Session, args: dict[str, Any]) -> Any:
    # The reply goes out before the SHUTDOWN event, as QEMU orders them.
    session.after_reply = lambda: session.machine.poweroff(ShutdownCause.HOST_QMP_QUIT)
    return {}


@command("query-cpus-fast")
def _query_cpus_fast(session: Session, args: dict[str, Any]) -> Any:
    machine = session.machine
    threads = machine.vp_thread_ids
    cpus = []
    for index in range(machine.config.vcpus):
        cpu = {"cpu-index": index, "qom-path": f"/machine/unattached/device[{index}]", "target": "x86_64",
               "props": {"core-id": 0, "socket-id": index, "thread-id": 0}}
        if index < len(threads) and threads[index] is not None:
            cpu["thread-id"] = threads[index]
        cpus.append(cpu)
    return cpus


# ---- this VMM's own commands
@command(VENDOR + "query-machine")
def _query_machine(session: Session, args: dict[str, Any]) -> Any:
    return session.machine.status()


@command(VENDOR + "query-vmbus")
def _query_vmbus(session: Session, args: dict[str, Any]) -> Any:
    vmbus = session.machine.status()["vmbus"]
    if vmbus is None:
        raise QmpError("this machine offers no VMBus devices", ErrorClass.DEVICE_NOT_ACTIVE)
    return vmbus


@command(VENDOR + "query-disks")
def _query_disks(session: Session, args: dict[str, Any]) -> Any:
    vmbus = session.machine.status()["vmbus"]
    return vmbus["disks"] if vmbus else []


@command(VENDOR + "query-exit-stats")
def _query_exit_stats(session: Session, args: dict[str, Any]) -> Any:
    return session.machine.stats.as_dict()


def _guest_channel(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except MshvError as exc:
        if "has not opened" in str(exc):
            raise QmpError(str(exc), ErrorClass.DEVICE_NOT_ACTIVE) from None
        raise


@command(VENDOR + "timesync")
def _timesync(session: Session, args: dict[str, Any]) -> Any:
    _guest_channel(session.machine.sync_time)
    return {}


KVP_POOL = Param(str, required=False)


def _kvp(session: Session, operation: str, args: dict[str, Any]) -> Any:
    pool = args.get("pool", "external")
    return _guest_channel(lambda: session.machine.kvp_request(operation, pool, args.get("key", ""), args.get("value", "")))


@command(VENDOR + "kvp-get", key=Param(str), pool=KVP_POOL)
def _kvp_get(session: Session, args: dict[str, Any]) -> Any:
    return _kvp(session, "get", args)[0]


@command(VENDOR + "kvp-set", key=Param(str), value=Param(str), pool=KVP_POOL)
def _kvp_set(session: Session, args: dict[str, Any]) -> Any:
    _kvp(session, "set", args)
    return {}


@command(VENDOR + "kvp-delete", key=Param(str), pool=KVP_POOL)
def _kvp_delete(session: Session, args: dict[str, Any]) -> Any:
    _kvp(session, "delete", args)
    return {}


@command(VENDOR + "kvp-list", pool=KVP_POOL)
def _kvp_list(session: Session, args: dict[str, Any]) -> Any:
    return _kvp(session, "list", args)


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
