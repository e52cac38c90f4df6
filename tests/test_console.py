"""The interactive console: raw terminal for the guest, escape keys for the VMM.

End to end under a pseudo-terminal (the test is the user's terminal): a
small guest polls COM1 and echoes what it receives, naming the bytes a
terminal would act on (<ETX> for Ctrl-C, <ESC> for escape).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mshvstack.vmm.console import ESCAPE, ConsoleInput, EscapeCommand, EscapeParser, Keys, RawTerminal, raw_attributes

from guests import assemble_elf

# ---- the escape parser


@given(st.binary().filter(lambda b: ESCAPE not in b))
def test_input_without_the_escape_key_passes_unchanged(data: bytes) -> None:
    assert EscapeParser().feed(data) == ([Keys(data)] if data else [])


@given(st.binary(), st.lists(st.integers(min_value=0, max_value=64), max_size=8))
def test_a_doubled_escape_key_is_one_for_the_guest_however_the_reads_split(data: bytes, cuts: list[int]) -> None:
    typed = data.replace(bytes([ESCAPE]), bytes([ESCAPE, ESCAPE]))
    parser = EscapeParser()
    received, start = b"", 0
    for cut in sorted(min(c, len(typed)) for c in cuts) + [len(typed)]:
        for keys in parser.feed(typed[start:cut]):
            assert keys.command is None
            received += keys.data
        start = cut
    assert received == data


def test_escape_commands() -> None:
    parser = EscapeParser()
    assert parser.feed(b"ls\x01x") == [Keys(b"ls", EscapeCommand.QUIT)]
    assert parser.feed(b"\x01h\x01?a") == [Keys(b"", EscapeCommand.HELP), Keys(b"", EscapeCommand.HELP), Keys(b"a")]
    assert parser.feed(b"a\x01") == [Keys(b"a")]           # the command comes in the next read
    assert parser.feed(b"X") == [Keys(b"", EscapeCommand.QUIT)]
    assert parser.feed(b"\x01zq") == [Keys(b"q")]          # an unknown command key is dropped
    assert parser.feed(b"\x03\x1a\x1c") == [Keys(b"\x03\x1a\x1c")]   # Ctrl-C, Ctrl-Z, Ctrl-\ are the guest's


def test_non_terminal_input_is_as_before() -> None:
    fed: list[bytes] = []
    commands: list[EscapeCommand] = []
    ConsoleInput(0, fed.append, interactive=False, on_command=commands.append).handle(b"echo hi\n\x01x")
    assert fed == [b"echo hi\r\x01x"] and commands == []


def test_raw_attributes() -> None:
    master, slave = os.openpty()
    try:
        cooked = termios.tcgetattr(slave)
        iflag, oflag, cflag, lflag, _i, _o, cc = raw_attributes(cooked)
        assert lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN) == 0
        assert iflag & (termios.ICRNL | termios.IXON) == 0
        assert oflag == cooked[1]                          # output processing kept: \n still starts a line
        assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0
        with RawTerminal(slave) as terminal:
            assert termios.tcgetattr(slave)[3] & termios.ECHO == 0
            terminal.restore()
            terminal.restore()                             # idempotent
            assert termios.tcgetattr(slave) == cooked
        assert termios.tcgetattr(slave) == cooked
    finally:
        os.close(master)
        os.close(slave)


# ---- end to end under a pty

ECHO_GUEST = r"""
    lea banner(%rip), %rsi
    call puts
next:
    mov $0x3fd, %dx              # LSR
    in (%dx), %al
    test $1, %al                 # data ready
    jz idle
    mov $0x3f8, %dx
    in (%dx), %al
    lea etx(%rip), %rsi
    cmp $0x03, %al
    je named
    lea esc(%rip), %rsi
    cmp $0x1b, %al
    je named
    lea crlf(%rip), %rsi
    cmp $0x0d, %al
    je named
    out %al, (%dx)               # echo, as a guest's tty does
    jmp next
named:
    call puts
    jmp next
idle:
    mov $20000, %ecx
1:  pause
    loop 1b
    jmp next
puts:                            # the NUL-terminated string at RSI
    mov $0x3f8, %dx
2:  lodsb
    test %al, %al
    jz 3f
    out %al, (%dx)
    jmp 2b
3:  ret
banner: .asciz "echo guest ready\r\n\x1b[6n"
etx:    .asciz "<ETX>"
esc:    .asciz "<ESC>"
crlf:   .asciz "\r\n"
"""
CURSOR_QUERY = b"\x1b[6n"
CURSOR_ANSWER = b"\x1b[50;5R"


@dataclass
class Session:
    process: subprocess.Popen[bytes]
    master: int
    slave: int
    cooked: list[object]
    output: bytearray = field(default_factory=bytearray)

    def read_until(self, wanted: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while wanted not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{wanted!r} not seen; the terminal shows {bytes(self.output)!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                self.output += os.read(self.master, 4096)
        return bytes(self.output)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def settle(self, seconds: float = 0.5) -> None:
        """Read what arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.output += os.read(self.master, 4096)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.settle(0.1)
        return self.process.wait(timeout=1)


@contextmanager
def console_session(tmp_path: Path) -> Iterator[Session]:
    kernel = assemble_elf(ECHO_GUEST, tmp_path)
    master, slave = os.openpty()
    cooked = termios.tcgetattr(slave)
    process = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--backend", "sim",
                                "--memory", "32M", "--no-vmbus"],
                               stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    session = Session(process, master, slave, cooked)
    try:
        session.read_until(b"echo guest ready")
        yield session
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)


def test_the_guest_owns_the_terminal(tmp_path: Path) -> None:
    with console_session(tmp_path) as s:
        assert b"Ctrl-A x quits" in s.output                     # the escape key, said once at the start
        # The terminal answers the guest's cursor-position query; the answer is the guest's input.
        s.read_until(CURSOR_QUERY)
        s.type(CURSOR_ANSWER)
        s.read_until(b"<ESC>[50;5R")
        assert b"^[[50;5R" not in s.output                       # not echoed by the host
        assert termios.tcgetattr(s.slave)[3] & (termios.ECHO | termios.ICANON | termios.ISIG) == 0
        # A line typed once is echoed once (by the guest).
        mark = len(s.output)
        s.type(b"hello world\r")
        s.read_until(b"hello world\r")
        s.settle(0.3)
        assert bytes(s.output[mark:]).count(b"hello world") == 1
        # Ctrl-C is the guest's: the VM stays up.
        s.type(b"\x03")
        s.read_until(b"<ETX>")
        s.type(b"after")
        s.read_until(b"after")
        assert s.process.poll() is None
        # Ctrl-A h: the keys; Ctrl-A Ctrl-A: one Ctrl-A for the guest (echoed as is).
        s.type(b"\x01h")
        s.read_until(b"quit (power the machine off)")
        s.type(b"\x01\x01")
        s.read_until(b"\x01")
        # Ctrl-A x: the run ends, cleanly, and the terminal is as it was.
        s.type(b"\x01x")
        assert s.wait() == 0
        assert b"quit from the console (Ctrl-A x)" in s.output
        assert termios.tcgetattr(s.slave) == s.cooked


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_terminal_is_restored_after_a_signal(tmp_path: Path, signum: int) -> None:
    with console_session(tmp_path) as s:
        assert termios.tcgetattr(s.slave)[3] & termios.ECHO == 0
        s.process.send_signal(signum)
        assert s.wait() == 128 + signum
        assert termios.tcgetattr(s.slave) == s.cooked
        assert f"stopped by {signal.Signals(signum).name}".encode() in s.output


def test_piped_input_reaches_the_guest_as_before(tmp_path: Path) -> None:
    kernel = assemble_elf(ECHO_GUEST, tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--backend", "sim",
                                "--memory", "32M", "--no-vmbus"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"piped\n")
        process.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 30
        while b"piped\r\n" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if ready:
                seen += os.read(process.stdout.fileno(), 4096)
        assert b"piped\r\n" in seen                               # \n arrived as \r, as Enter sends it
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGTERM
        assert b"Ctrl-A" not in err                               # no terminal, no escape key
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
