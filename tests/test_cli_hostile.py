"""Hostile input at the command line: guest text, paths and peers never break the report.

Whatever a guest writes (its panic message), whatever path a user gives and
whatever a peer on the control socket answers, ``mshvstack`` ends with one
clear line and its exit code: never a traceback, never a hang, never text
read as rich markup.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mshvstack.cli import app
from mshvstack.vmm.control import MAX_EVENTS, ControlError, QmpClient, request

from guests import assemble_elf

runner = CliRunner()

MARKUP = "[/x] [red]red[/red] [bold]"


def _one_clear_line(output: str) -> str:
    assert "Traceback" not in output and "MarkupError" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


# ---- guest text and paths are printed as they are


def test_a_panic_message_with_markup_is_printed_as_is(tmp_path: Path) -> None:
    from test_vmm_qmp import CRASH_GUEST

    guest = CRASH_GUEST.replace("the test guest gave up", "the test guest gave up " + MARKUP)
    result = runner.invoke(app, ["run", str(assemble_elf(guest, tmp_path)), "--backend", "sim", "--memory", "32M"])
    assert result.exit_code == 4, result.output
    assert "MarkupError" not in result.output
    assert f"Kernel panic - not syncing: the test guest gave up {MARKUP}" in result.output


@pytest.mark.parametrize("args", [
    ["run", "--demo", "--disk", f"/no/{MARKUP}.img"],
    ["run", f"/no/{MARKUP}/vmlinux"],
    ["run", "--demo", "--console", f"/no/{MARKUP}/console.log"],
    ["ctl", f"/no/{MARKUP}.sock", "status"],
])
def test_a_path_with_markup_is_printed_as_is(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2)
    assert MARKUP in _one_clear_line(result.output)


# ---- ctl --timeout

@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf", "1e20", "86401"])
def test_ctl_refuses_a_timeout_that_is_no_timeout(tmp_path: Path, value: str) -> None:
    result = runner.invoke(app, ["ctl", str(tmp_path / "vm.sock"), "status", "--timeout", value])
    assert result.exit_code == 2
    assert "--timeout must be a number of seconds above 0 and at most 86400" in _one_clear_line(result.output)


def test_the_library_refuses_such_a_timeout_too(tmp_path: Path) -> None:
    for value in (-1.0, float("nan"), float("inf"), 1e20):
        with pytest.raises(ControlError, match="--timeout must be"):
            request(tmp_path / "vm.sock", "status", timeout=value)


# ---- ctl against a peer that speaks QMP but answers other shapes

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}
Script = Callable[[socket.socket, Callable[[], dict[str, Any]]], None]


@contextmanager
def fake_qmp(tmp_path: Path, answer: Script) -> Iterator[Path]:
    """A server that greets, accepts qmp_capabilities, then lets ``answer`` reply to the next command."""
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    stop = threading.Event()

    def serve() -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        with client:
            buffered = b""

            def receive() -> dict[str, Any]:
                nonlocal buffered
                while b"\n" not in buffered:
                    data = client.recv(65536)
                    if not data:
                        raise ConnectionError
                    buffered += data
                line, buffered = buffered.split(b"\n", 1)
                message: dict[str, Any] = json.loads(line)
                return message

            try:
                client.sendall(json.dumps(GREETING).encode() + b"\n")
                hello = receive()
                client.sendall(json.dumps({"return": {}, "id": hello["id"]}).encode() + b"\n")
                answer(client, receive)
                stop.wait(10)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=15)
        path.unlink(missing_ok=True)


def reply_with(value: Any) -> Script:
    def answer(client: socket.socket, receive: Callable[[], dict[str, Any]]) -> None:
        command = receive()
        client.sendall(json.dumps({"return": value, "id": command["id"]}).encode() + b"\n")
    return answer


def raw_reply(text: Callable[[str], bytes]) -> Script:
    def answer(client: socket.socket, receive: Callable[[], dict[str, Any]]) -> None:
        command = receive()
        client.sendall(text(command["id"]))
    return answer


STATUS = {"state": "running", "backend": "sim", "vcpus": 1, "memory": 1 << 28, "uptime": 1.0, "exits": 5,
          "reason": None, "exit_counts": {"Halt": 5},
          "vmbus": {"state": "connected", "version": "5.3", "heartbeat": {"sequence": 1, "guest_alive": True},
                    "channels": [{"device": "heartbeat", "state": "open", "packets_in": 1, "packets_out": 2}]}}


def test_ctl_prints_a_well_formed_status(tmp_path: Path) -> None:
    with fake_qmp(tmp_path, reply_with(STATUS)) as path:
        result = runner.invoke(app, ["ctl", str(path), "status", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert "connected (version 5.3)" in result.output and "open, 1 in / 2 out" in result.output


def _status(**changes: Any) -> dict[str, Any]:
    status = json.loads(json.dumps(STATUS))
    status.update(changes)
    return status


def _vmbus_without_state() -> dict[str, Any]:
    status = _status()
    del status["vmbus"]["state"]
    return status


@pytest.mark.parametrize("answer, message", [
    (reply_with([1, 2, 3]), "the status is [1, 2, 3], not an object"),
    (reply_with(42), "the status is 42, not an object"),
    (reply_with(_vmbus_without_state()), "vmbus.state is missing"),
    (reply_with(_status(vmbus=[])), "vmbus is [], not an object"),
    (reply_with(_status(exit_counts=[1])), "exit_counts is [1], not an object"),
    (reply_with(_status(state={"nested": MARKUP})), "state is"),
    (reply_with(_status(vmbus={**STATUS["vmbus"], "channels": {"a": 1}})), "vmbus.channels is"),
    (raw_reply(lambda _id: b"[" * 100_000 + b"]" * 100_000 + b"\n"), "JSON nesting deeper than 32"),
    (raw_reply(lambda i: b'{"id": "%s", "return": ' % i.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
     "JSON nesting deeper than 32"),
    (raw_reply(lambda i: b'{"id": "%s", "return": ' % i.encode() + b"[" * 100_000), "JSON nesting deeper than 32"),
    (raw_reply(lambda i: b"7\n"), "is not a QMP server"),
    (raw_reply(lambda i: json.dumps({"id": i, "error": "no"}).encode() + b"\n"), "sent a reply that is not QMP"),
])
def test_ctl_against_a_peer_of_another_shape_is_one_line(tmp_path: Path, answer: Script, message: str) -> None:
    with fake_qmp(tmp_path, answer) as path:
        started = time.monotonic()
        result = runner.invoke(app, ["ctl", str(path), "status", "--timeout", "5"])
    assert time.monotonic() - started < 5
    assert result.exit_code == 1, result.output
    assert message in _one_clear_line(result.output)


def test_kvp_replies_of_another_shape_are_one_line(tmp_path: Path) -> None:
    for value, message in ((7, "not a list of pairs"), ([{"key": 1}], "not a key/value pair"), (["x"], "not a key/value pair")):
        with fake_qmp(tmp_path, reply_with(value)) as path:
            result = runner.invoke(app, ["ctl", str(path), "kvp", "list", "--timeout", "5"])
        assert result.exit_code == 1 and message in _one_clear_line(result.output), result.output


def events_forever(client: socket.socket, receive: Callable[[], dict[str, Any]]) -> None:
    receive()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        event = {"event": "STOP", "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}}
        client.sendall(json.dumps(event).encode() + b"\n")
        time.sleep(0.01)


def test_events_forever_and_never_the_reply_end_at_the_timeout(tmp_path: Path) -> None:
    with fake_qmp(tmp_path, events_forever) as path:
        started = time.monotonic()
        result = runner.invoke(app, ["ctl", str(path), "status", "--timeout", "1"])
        elapsed = time.monotonic() - started
    assert result.exit_code == 1
    assert "did not answer within 1 s" in _one_clear_line(result.output)
    assert elapsed < 3


def test_events_are_kept_within_bounds(tmp_path: Path) -> None:
    with fake_qmp(tmp_path, events_forever) as path, QmpClient(path, timeout=1) as client:
        with pytest.raises(ControlError, match="did not answer"):
            client.execute("query-status")
        assert len(client.events) == MAX_EVENTS and client.events_dropped > 0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
STATUS_PARTS = st.fixed_dictionaries({}, optional={key: JSON for key in STATUS}) | JSON


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUS_PARTS, verb=st.sampled_from(["status", "kvp"]))
def test_ctl_never_breaks_on_any_reply(tmp_path_factory: pytest.TempPathFactory, status: Any, verb: str) -> None:
    args = ["kvp", "list"] if verb == "kvp" else ["status"]
    with fake_qmp(tmp_path_factory.mktemp("peer"), reply_with(status)) as path:
        result = runner.invoke(app, ["ctl", str(path), *args, "--timeout", "5"])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    if result.exit_code == 1:
        _one_clear_line(result.output)
