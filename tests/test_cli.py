"""The CLI: the demo run, JSON output, and one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mshvstack.cli import app

runner = CliRunner()


def test_run_demo_prints_greeting_and_summary() -> None:
    result = runner.invoke(app, ["run", "--demo", "--backend", "sim", "--stats"])
    assert result.exit_code == 0, result.output
    assert "Hello from an mshvstack guest" in result.output
    assert "debug-exit (exit code 0)" in result.output and "IoPortIntercept" in result.output
    assert "in the engine running guest code" in result.output and "new blocks" in result.output


def test_run_json_summary() -> None:
    result = runner.invoke(app, ["run", "--demo", "--demo-guest", "iotest", "--backend", "sim", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["reason"] == "debug-exit" and summary["stats"]["UnmappedGpa"]["count"] >= 8


def test_console_to_file(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = runner.invoke(app, ["run", "--demo", "--backend", "sim", "--console", str(log)])
    assert result.exit_code == 0 and log.read_bytes().startswith(b"Hello")


@pytest.mark.parametrize("args, message", [
    (["run", "--demo", "--memory", "12Q"], "bad size '12Q'"),
    (["run", "--demo", "--vcpus", "0"], "--vcpus must be between 1 and 256"),
    (["run", "--demo", "--vcpus", "300"], "--vcpus must be between 1 and 256"),
    (["run", "/no/such/kernel"], "no such file"),
    (["run", "--demo", "--memory", "1M"], "--memory must be between"),
    (["run", "--demo", "--backend", "qemu"], "--backend must be auto, host or sim"),
    (["ctl", "/no/such.sock", "status"], "cannot reach"),
    (["ctl", "/no/such.sock", "explode"], "unknown command"),
])
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_kernel_that_does_not_fit(tmp_path: Path) -> None:
    from test_vmm_loaders import make_elf

    kernel = tmp_path / "big.elf"
    kernel.write_bytes(make_elf([(0x4000000, b"x", 1)], 0x4000000))
    result = runner.invoke(app, ["run", str(kernel), "--memory", "32M", "--backend", "sim"])
    assert result.exit_code == 1 and "outside guest RAM" in result.output and "Traceback" not in result.output
    notelf = tmp_path / "text"
    notelf.write_text("hello")
    result = runner.invoke(app, ["run", str(notelf), "--backend", "sim"])
    assert result.exit_code == 1 and "neither an ELF file nor a Linux bzImage" in result.output


def test_disk_and_kvp_arguments_are_checked(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--demo", "--disk", str(tmp_path / "missing.img")])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["ctl", "/no.sock", "kvp", "frobnicate"])
    assert result.exit_code == 2 and "kvp needs one of" in result.output
    result = runner.invoke(app, ["ctl", "/no.sock", "kvp", "set", "onlykey"])
    assert result.exit_code == 2 and "takes 2 argument" in result.output


def test_linux_demo_without_apt_is_one_clear_line(tmp_path: Path) -> None:
    """Where apt is absent, --demo linux says so in one line and names what to pass instead."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mshvstack.cli", "run", "--demo", "linux"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--demo linux" in lines[0] and "not installed" in lines[0] and "--initrd" in lines[0]


def test_version_verbose_and_log_file(tmp_path: Path) -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("mshvstack ")
    import logging

    log = tmp_path / "vmm.log"
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        result = runner.invoke(app, ["-v", "--log-file", str(log), "run", "--demo"])
    finally:   # the CLI configures the process's logging: give the rest of the session its own back
        for handler in root.handlers:
            handler.close()
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert result.exit_code == 0, result.output
    text = log.read_text()
    assert "partition created" in text and "I/O APIC" in text and "machine stopped: debug-exit" in text


def test_the_checkout_root_is_no_trap() -> None:
    """After the README's (development) install, the package, its compiled binding and the
    README's example work from the checkout's root, where the source tree is on sys.path."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    example = re.search(r"<!-- example:begin -->\s*```python\n(.*?)```\s*<!-- example:end -->", readme, re.S)
    assert example is not None
    for code in ("import mshvstack.abi._mshv, mshvstack.backend.sim.engines._fastpath", example.group(1)):
        result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]


def test_a_guest_panic_is_a_clear_failure(tmp_path: Path) -> None:
    from test_vmm_qmp import CRASH_GUEST

    from guests import assemble_elf

    result = runner.invoke(app, ["run", str(assemble_elf(CRASH_GUEST, tmp_path)), "--backend", "sim", "--memory", "32M"])
    assert result.exit_code == 4, result.output
    assert "guest-panic (exit code 4): guest panicked: Kernel panic - not syncing: the test guest gave up" in result.output


@pytest.mark.parametrize("behaviour, message", [
    ("close", "closed the connection"),
    ("silent", "did not answer within 0.5 s"),
    ("garbage", "is not a QMP server"),
    ("list", "is not a QMP server"),
    ("greet-then-close", "closed the connection"),
])
def test_ctl_against_a_misbehaving_server_is_one_line(tmp_path: Path, behaviour: str, message: str) -> None:
    import socket
    import threading

    path = tmp_path / "bad.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        client, _ = listener.accept()
        with client:
            if behaviour == "garbage":
                client.sendall(b"\x00\xffnot json at all\n")
            elif behaviour == "list":
                client.sendall(b"[1, 2, 3]\n")
            elif behaviour == "greet-then-close":
                client.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                client.recv(100)
            elif behaviour == "silent":
                client.recv(100)
                threading.Event().wait(1.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = runner.invoke(app, ["ctl", str(path), "status", "--timeout", "0.5"])
    finally:
        thread.join(timeout=5)
        listener.close()
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
