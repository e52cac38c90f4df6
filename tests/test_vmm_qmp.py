"""The control socket speaks QMP: driven by qemu.qmp (a client no one here wrote),
by raw sockets as a hostile client would, and the guest crash MSRs it reports."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.control import QmpClient, request
from mshvstack.vmm.jsonstream import JsonInputError, JsonSplitter
from mshvstack.vmm.machine import PANIC_EXIT_CODE, Machine, RunState, StopKind
from mshvstack.vmm.qmp import COMMANDS, VENDOR, QmpServer

from guests import assemble_elf

qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")

COM1 = 0x3F8
# Prints BOOT on COM1 once per boot, then spins on port 0x80 (a stream of exits).
BOOT_THEN_SPIN = f"""
mov ${COM1}, %dx
lea banner(%rip), %rsi
mov $5, %ecx
rep outsb
1: mov $0x41, %al
out %al, $0x80
jmp 1b
banner: .ascii "BOOT\\n"
"""


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[Machine, Path, bytearray]]:
    console = bytearray()
    machine = Machine(MachineConfig(kernel=assemble_elf(BOOT_THEN_SPIN, tmp_path), backend="sim", memory=32 << 20),
                      console=console.extend)
    path = tmp_path / "qmp.sock"
    server = QmpServer(machine, path)
    machine.start()
    try:
        yield machine, path, console
    finally:
        machine.poweroff()
        server.close()
        machine.close()


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def _next_event(listener: Any, name: str, timeout: float = 10.0) -> Any:
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        if event["event"] == name:
            return event


def test_qemu_qmp_client_drives_the_lifecycle(vm: tuple[Machine, Path, bytearray]) -> None:
    machine, path, console = vm

    async def session() -> None:
        client = qmp.QMPClient("mshvstack-test")
        await client.connect(str(path))
        assert client.greeting.QMP.version["package"].startswith("mshvstack ")
        version = await client.execute("query-version")
        assert set(version["qemu"]) == {"major", "minor", "micro"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"stop", "cont", "system_reset", "quit", "query-cpus-fast", VENDOR + "kvp-get"} <= names
        assert await client.execute("query-status") == {"running": True, "status": "running", "singlestep": False}
        cpus = await client.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0] and cpus[0]["thread-id"] == machine.vp_thread_ids[0]
        with client.listener() as events:
            await client.execute("stop")
            stop = await _next_event(events, "STOP")
            assert "seconds" in stop["timestamp"] and "microseconds" in stop["timestamp"]
            assert (await client.execute("query-status"))["status"] == "paused"
            exits = machine.stats.total
            await asyncio.sleep(0.1)
            assert machine.stats.total <= exits + 2, "the guest ran while paused"
            await client.execute("stop")   # already paused: QEMU's answer is success, no second event
            await client.execute("cont")
            await _next_event(events, "RESUME")
            _wait(lambda: machine.stats.total > exits + 10)

            await client.execute("system_reset")
            reset = await _next_event(events, "RESET")
            assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
            _wait(lambda: console.count(b"BOOT") == 2)   # the guest booted again from the start
            assert (await client.execute("query-status"))["status"] == "running"

            stats = await client.execute(VENDOR + "query-exit-stats")
            assert stats["IoPortIntercept"]["count"] > 0
            with pytest.raises(qmp.ExecuteError) as refused:
                await client.execute(VENDOR + "kvp-get", {"key": "x"})
            assert refused.value.error_class == "DeviceNotActive"   # the spinning guest never opened KVP
            await client.execute("quit")
            shutdown = await _next_event(events, "SHUTDOWN")
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await client.disconnect()

    asyncio.run(session())
    reason = machine.wait(timeout=10)
    assert reason is not None and reason.kind is StopKind.POWEROFF


def test_qmp_errors_use_qemus_classes(vm: tuple[Machine, Path, bytearray]) -> None:
    _machine, path, _console = vm

    async def session() -> None:
        client = qmp.QMPClient("errors")
        await client.connect(str(path))
        cases = [
            ("no-such-command", None, "CommandNotFound", "has not been found"),
            ("query-status", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
            (VENDOR + "kvp-set", {"key": "k"}, "GenericError", "Parameter 'value' is missing"),
            (VENDOR + "kvp-get", {"key": 7}, "GenericError", "expected: string"),
            ("qmp_capabilities", None, "CommandNotFound", "already complete"),
            (VENDOR + "kvp-set", {"key": "k" * 256, "value": "v"}, "GenericError", "at most 255 characters"),
            (VENDOR + "kvp-set", {"key": "k", "value": "v" * 1024}, "GenericError", "at most 1023 characters"),
        ]
        for name, arguments, error_class, text in cases:
            with pytest.raises(qmp.ExecuteError) as refused:
                await client.execute(name, arguments)
            assert refused.value.error_class == error_class and text in refused.value.error.error.desc, name
        assert (await client.execute("query-status"))["running"] is True   # the session survived every error
        await client.disconnect()

    asyncio.run(session())


class RawClient:
    """A socket speaking QMP by hand (as scripts and hostile clients do)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rb")

    def read(self) -> dict[str, Any]:
        line = self.stream.readline()
        assert line.endswith(b"\r\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    def reply(self) -> dict[str, Any]:
        while "event" in (message := self.read()):
            pass
        return message

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def test_raw_clients_two_at_once_and_one_leaving_mid_command(vm: tuple[Machine, Path, bytearray]) -> None:
    machine, path, _console = vm
    a, b = RawClient(path), RawClient(path)
    assert "QMP" in a.read() and "QMP" in b.read()
    a.sock.sendall(b'{"execute": "query-status"}')
    assert a.reply()["error"]["class"] == "CommandNotFound"   # capabilities negotiation comes first
    a.sock.sendall(b'{"execute":"qmp_capabilities","id":1}{"execute":"query-status","id":[2]}')  # back to back, no newline
    assert a.reply() == {"return": {}, "id": 1}
    assert a.reply()["id"] == [2]
    b.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert b.reply() == {"return": {}}

    leaver = RawClient(path)
    leaver.read()
    leaver.sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "stop"}{"execute": "query-sta')
    leaver.close()   # gone before reading any reply, with a command half sent
    _wait(lambda: machine.state is RunState.PAUSED)
    assert a.read()["event"] == "STOP" and b.read()["event"] == "STOP"   # every negotiated client hears it

    hostile = [b"not json\n", b"[1, 2]", b"42\n", b'{"execute": 5}', b'{"arguments": {}}', b'{"execute": "stop", "x": 1}',
               b'{"execute": "stop", "arguments": []}', b"[" * 60000 + b"]" * 60000, b'{"a": "\xff"}']
    for data in hostile:
        b.sock.sendall(data)
        assert b.reply()["error"]["class"] == "GenericError", data[:40]
    b.sock.sendall(b'{"execute": "cont", "id": "after"}')
    assert b.reply() == {"return": {}, "id": "after"}
    assert a.read()["event"] == "RESUME"
    a.close()
    b.close()
    assert request(path, "status")["state"] == "running"


def test_every_ctl_verb_is_a_qmp_command() -> None:
    from mshvstack.vmm.control import VERBS

    assert set(VERBS) >= {"status", "pause", "resume", "shutdown", "poweroff", "reset", "timesync", "kvp"}
    for command in filter(None, VERBS.values()):
        assert command in COMMANDS
    for operation in ("get", "set", "delete", "list"):
        assert f"{VENDOR}kvp-{operation}" in COMMANDS


def test_server_close_leaves_no_threads(tmp_path: Path) -> None:
    import threading

    machine = Machine(MachineConfig(demo="hello", backend="sim", memory=32 << 20))
    try:
        before = threading.active_count()
        for i in range(20):
            server = QmpServer(machine, tmp_path / f"s{i}.sock")
            with QmpClient(tmp_path / f"s{i}.sock") as client:
                assert client.execute("query-status")["status"] == "prelaunch"
            server.close()
        _wait(lambda: threading.active_count() <= before)
    finally:
        machine.close()


# ---- the stream splitter under hypothesis
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=4), max_size=6), st.data())
def test_splitter_returns_what_was_sent_however_it_is_chunked(objects: list[dict[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(json.dumps(o).encode() + data.draw(st.sampled_from([b"", b"\n", b" \r\n"])) for o in objects)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    splitter, out = JsonSplitter(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        out += splitter.feed(stream[start:end])
    assert out == objects


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_splitter_survives_any_bytes(garbage: bytes) -> None:
    items = JsonSplitter(max_value=64, max_depth=4).feed(garbage)
    assert all(isinstance(i, (dict, list, JsonInputError)) for i in items)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b'"', b"").replace(b"\\", b"")))
def test_splitter_recovers_once_the_brackets_close(garbage: bytes) -> None:
    """Without strings left open, closing every bracket brings the next request through."""
    splitter = JsonSplitter(max_value=64, max_depth=4)
    splitter.feed(garbage)
    tail = splitter.feed(b"]" * 300 + b'\n{"execute": "query-status"}')
    assert tail and tail[-1] == {"execute": "query-status"}


def test_splitter_bounds_depth_and_size() -> None:
    splitter = JsonSplitter(max_value=100, max_depth=8)
    [deep] = splitter.feed(b"[" * 1000 + b"]" * 1000)
    assert isinstance(deep, JsonInputError) and "nesting" in deep.message
    [long] = splitter.feed(b'{"k": "' + b"x" * 1000 + b'"}')
    assert isinstance(long, JsonInputError) and "longer" in long.message
    assert splitter.feed(b'{"ok": 1}') == [{"ok": 1}]


# ---- guest crash MSRs
CRASH_GUEST = """
mov $0x40000003, %eax
cpuid
bt $10, %edx                 # HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE
jnc no_crash_msrs
mov $0x40000105, %ecx        # CRASH_CTL: which notifications the hypervisor takes
rdmsr
bt $30, %edx                 # CRASH_NOTIFY_MSG (bit 62)
jnc no_crash_msrs
mov $0x40000100, %ecx
mov $0xdead, %eax
xor %edx, %edx
wrmsr                        # P0
inc %ecx
mov $0x1234, %eax
mov $0x5678, %edx
wrmsr                        # P1
inc %ecx
xor %eax, %eax
xor %edx, %edx
wrmsr                        # P2
inc %ecx
lea message(%rip), %rax
wrmsr                        # P3: the message's address (identity mapped)
inc %ecx
mov $message_end - message, %eax
wrmsr                        # P4: its length
inc %ecx
xor %eax, %eax
mov $0xC0000000, %edx        # CRASH_NOTIFY | CRASH_NOTIFY_MSG
wrmsr
1: jmp 1b
no_crash_msrs:
mov $1, %al
out %al, $0xf4
message: .ascii "early boot\\nKernel panic - not syncing: the test guest gave up\\nCPU: 0 PID: 1\\n"
message_end:
"""


def test_guest_crash_msrs_stop_the_machine_and_reach_qmp(tmp_path: Path) -> None:
    machine = Machine(MachineConfig(kernel=assemble_elf(CRASH_GUEST, tmp_path), backend="sim", memory=32 << 20))
    path = tmp_path / "qmp.sock"
    server = QmpServer(machine, path)
    client = QmpClient(path)
    try:
        machine.start()
        reason = machine.wait(timeout=30)
        assert reason is not None and reason.kind is StopKind.PANIC and reason.exit_code == PANIC_EXIT_CODE
        assert "Kernel panic - not syncing: the test guest gave up" in reason.detail
        assert "P0=0xdead" in reason.detail and "P1=0x567800001234" in reason.detail
        assert machine.crash is not None and machine.crash.message.startswith("early boot\n")
        assert client.execute("query-status")["status"] == "guest-panicked"
        panicked = [e for e in client.events if e["event"] == "GUEST_PANICKED"]
        assert panicked and panicked[0]["data"]["action"] == "poweroff"
        info = panicked[0]["data"]["info"]
        assert info["type"] == "hyper-v" and (info["arg1"], info["arg2"]) == (0xDEAD, 0x5678_0000_1234)
        shutdown = [e for e in client.events if e["event"] == "SHUTDOWN"]
        assert shutdown[0]["data"] == {"guest": True, "reason": "guest-panic"}
    finally:
        client.close()
        server.close()
        machine.close()


def test_a_crash_message_outside_ram_is_refused_not_read(tmp_path: Path) -> None:
    source = CRASH_GUEST.replace("lea message(%rip), %rax", "mov $0xfff00000, %eax\nmov $0xff, %edx")
    machine = Machine(MachineConfig(kernel=assemble_elf(source, tmp_path), backend="sim", memory=32 << 20))
    reason = machine.run()
    assert reason.kind is StopKind.PANIC and machine.crash is not None
    assert machine.crash.message == "" and "P3=0xfffff00000" in reason.detail


def test_embedders_running_machines_with_a_socket_leak_nothing(tmp_path: Path) -> None:
    """Machine + QMP server, run and closed, many times over: threads and fds come back."""
    import os
    import threading

    def one_run(i: int) -> None:
        machine = Machine(MachineConfig(demo="hello", backend="sim", memory=32 << 20))
        server = QmpServer(machine, tmp_path / f"run{i}.sock")
        with QmpClient(tmp_path / f"run{i}.sock") as client:
            client.execute("query-status")
            machine.run()
        server.close()

    one_run(0)   # warm up what is created once per process
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for i in range(1, 21):
        one_run(i)
    _wait(lambda: threading.active_count() <= threads)
    assert len(os.listdir("/proc/self/fd")) <= fds
