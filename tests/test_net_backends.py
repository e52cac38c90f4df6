"""``--net`` from the command line to the backends: bad input is one clear line,
libslirp answers ARP and DHCP, a TAP device passes frames both ways."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mshvstack.cli import app
from mshvstack.net.backend import NetBackendError
from mshvstack.vmm.config import ConfigError
from mshvstack.vmm.netconfig import HostForward, NetSpec

runner = CliRunner()
MAC = bytes.fromhex("00155d000001")
GUEST_IP = bytes([10, 0, 2, 15])


def _one_clear_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_net_specs_parse() -> None:
    spec = NetSpec.parse("user,hostfwd=tcp::8080-:80,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53,mac=00:15:5d:01:02:03,id=lan")
    assert spec.kind == "user" and spec.id == "lan" and spec.mac == bytes.fromhex("00155d010203")
    assert spec.hostfwd == (HostForward(False, "127.0.0.1", 8080, "", 80), HostForward(True, "127.0.0.1", 5353, "10.0.2.15", 53))
    assert NetSpec.parse("tap=tap0").ifname == "tap0"
    assert NetSpec.parse("user").mac_address()[:3] == bytes.fromhex("00155d")


@pytest.mark.parametrize("text", ["bogus", "user,hostfwd=tcp:8080:80", "user,hostfwd=tcp::99999-:80", "user,mac=01:00:00:00:00:01",
                                  "user,mac=zz", "tap=", "tap=a-name-far-too-long", "tap=tap0,hostfwd=tcp::1-:2",
                                  "user,speed=10", "user,hostfwd=tcp:host:1-:2", "user,flag"])
def test_bad_net_specs_are_one_clear_line(text: str) -> None:
    with pytest.raises(ConfigError):
        NetSpec.parse(text)
    result = runner.invoke(app, ["run", "--demo", "--net", text])
    assert result.exit_code == 2, result.output
    assert _one_clear_line(result.output).startswith("error: --net")


def test_a_forwarded_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["run", "--demo", "--backend", "sim", "--net", f"user,hostfwd=tcp::{port}-:80"])
    assert result.exit_code == 1, result.output
    assert "cannot listen there" in _one_clear_line(result.output)


def test_a_tap_that_cannot_be_opened_is_one_clear_line(tmp_path: Path) -> None:
    if os.path.exists("/dev/net/tun") and os.geteuid() == 0:
        pytest.skip("as root with /dev/net/tun, any name makes a new TAP: nothing to refuse")
    result = runner.invoke(app, ["run", "--demo", "--backend", "sim", "--net", "tap=mshvnone0"])
    assert result.exit_code == 1, result.output
    assert "--net tap=mshvnone0" in _one_clear_line(result.output)


def test_net_needs_vmbus() -> None:
    result = runner.invoke(app, ["run", "--demo", "--no-vmbus", "--net", "user"])
    assert result.exit_code == 2 and "needs VMBus" in _one_clear_line(result.output)


# ---- libslirp without a guest: the frames a guest would send, the answers it would get
def _arp_request(target: bytes) -> bytes:
    return (b"\xff" * 6 + MAC + b"\x08\x06" + bytes.fromhex("0001080006040001") + MAC + GUEST_IP + bytes(6) + target)


def _collect(backend: object) -> tuple[list[bytes], threading.Event]:
    got: list[bytes] = []
    event = threading.Event()

    def deliver(frames: list[bytes]) -> None:
        got.extend(frames)
        event.set()

    backend.start(deliver)   # type: ignore[attr-defined]
    return got, event


def test_libslirp_answers_arp_for_the_gateway() -> None:
    from mshvstack.net.slirp import SlirpBackend

    try:
        backend = SlirpBackend()
    except NetBackendError as exc:
        pytest.skip(str(exc))
    try:
        got, event = _collect(backend)
        assert backend.send(_arp_request(bytes([10, 0, 2, 2])))
        assert event.wait(5)
        reply = got[0]
        assert reply[:6] == MAC and reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"   # an ARP reply
        assert reply[28:32] == bytes([10, 0, 2, 2]) and reply[38:42] == GUEST_IP
        assert backend.describe()["gateway"] == "10.0.2.2"
    finally:
        backend.close()


def test_libslirp_forwards_a_host_port_and_closes_it() -> None:
    from mshvstack.net.slirp import SlirpBackend

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        backend = SlirpBackend((HostForward(False, "127.0.0.1", port, "", 80),))
    except NetBackendError as exc:
        pytest.skip(str(exc))
    got, _event = _collect(backend)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)   # libslirp accepts, then ARPs for the guest
    deadline = time.monotonic() + 5
    while not any(frame[12:14] == b"\x08\x06" for frame in got):
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    client.close()
    backend.close()
    with socket.socket() as again:   # the port is free once the backend is closed
        again.bind(("127.0.0.1", port))


# ---- a TAP in a network namespace of its own (root, /dev/net/tun, unshare)
def _tap_possible() -> str | None:
    if os.geteuid() != 0:
        return "creating a TAP device needs root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "ip", "tuntap", "add", "dev", "tap0", "mode", "tap"], capture_output=True)
    if probe.returncode:
        return f"cannot create a TAP in a new network namespace: {probe.stderr.decode().strip()}"
    return None


def test_a_tap_device_passes_frames_both_ways(tmp_path: Path) -> None:
    """The backend in a private namespace: an ARP request from the "guest" reaches the
    host's stack on the TAP, whose ARP reply comes back through the backend."""
    reason = _tap_possible()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "tap_probe.py"
    script.write_text(TAP_PROBE)
    result = subprocess.run(["unshare", "--net", "sh", "-c",
                             "ip tuntap add dev tap0 mode tap && ip addr add 10.0.2.2/24 dev tap0 && ip link set tap0 up && "
                             f"exec {sys.executable} {script}"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent)])})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ARP reply from 10.0.2.2" in result.stdout


TAP_PROBE = """
import threading, sys
from mshvstack.net.tap import TapBackend
from test_net_backends import _arp_request, _collect, MAC
backend = TapBackend("tap0")
got, event = _collect(backend)
for _ in range(20):
    backend.send(_arp_request(bytes([10, 0, 2, 2])))
    if event.wait(0.5) and any(f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x02" for f in got):
        print("ARP reply from 10.0.2.2")
        break
backend.close()
"""
