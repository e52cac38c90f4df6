"""The host side of the guest's serial console: the user's terminal.

When standard input is a terminal, ``run`` hands it to the guest the way
QEMU's ``-nographic`` does: the terminal goes into raw mode (no local echo,
no line editing, no signals from keys), so every key, Ctrl-C included,
reaches the guest's UART as its byte, and the answers the terminal itself
sends (to a cursor-position query, say) reach the guest too instead of
being shown.  Output processing stays on, so a guest's bare ``\\n`` still
starts a new line.

One key is the VMM's: Ctrl-A, followed by

* ``x``: quit (power the machine off, restore the terminal);
* ``h`` or ``?``: print this help;
* ``Ctrl-A``: send one Ctrl-A to the guest.

Any other key after Ctrl-A is ignored, as in QEMU.  The terminal is
restored on every way out: the guest stopping, an error, an exception,
SIGTERM/SIGHUP (the caller installs those handlers) and the escape key.

When standard input is not a terminal (a pipe, CI, a file), input goes to
the guest as before: bytes as read, with ``\\n`` turned into ``\\r`` (what
Enter sends on a terminal).
"""

from __future__ import annotations

import enum
import os
import signal
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ESCAPE = 0x01          # Ctrl-A
ESCAPE_NAME = "Ctrl-A"


class EscapeCommand(enum.Enum):
    """What an escape sequence asks of the VMM."""

    QUIT = "x"
    HELP = "h"


_COMMANDS = {ord("x"): EscapeCommand.QUIT, ord("X"): EscapeCommand.QUIT,
             ord("h"): EscapeCommand.HELP, ord("H"): EscapeCommand.HELP, ord("?"): EscapeCommand.HELP}

HINT = f"console: the guest has this terminal; {ESCAPE_NAME} x quits, {ESCAPE_NAME} h shows the keys"
HELP = (f"{ESCAPE_NAME} x    quit (power the machine off)\r\n"
        f"{ESCAPE_NAME} h    this help\r\n"
        f"{ESCAPE_NAME} {ESCAPE_NAME} send {ESCAPE_NAME} to the guest\r\n")


@dataclass(frozen=True)
class Keys:
    """Bytes for the guest, then (maybe) a command for the VMM."""

    data: bytes
    command: EscapeCommand | None = None


class EscapeParser:
    """Split terminal input into guest bytes and escape commands.

    The state (an escape key seen, its command not yet) survives across
    reads, so the two keys may arrive in separate reads.
    """

    def __init__(self) -> None:
        self._escaped = False

    def feed(self, data: bytes) -> list[Keys]:
        """The input in order: runs of guest bytes, each ended by the command after it (if any)."""
        out: list[Keys] = []
        run = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == ESCAPE:
                    run.append(ESCAPE)
                elif byte in _COMMANDS:
                    out.append(Keys(bytes(run), _COMMANDS[byte]))
                    run = bytearray()
                # any other key after the escape is dropped
            elif byte == ESCAPE:
                self._escaped = True
            else:
                run.append(byte)
        if run:
            out.append(Keys(bytes(run)))
        return out


def raw_attributes(attrs: list[Any]) -> list[Any]:
    """``attrs`` (from termios.tcgetattr) changed for a guest console.

    Input: no CR/NL translation, no flow control, no break or parity
    processing, 8-bit bytes.  Local: no echo, no canonical mode, no signal
    keys, no extended processing.  Output processing is kept (ONLCR).
    Reads return as soon as one byte is there.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR | termios.IGNCR
               | termios.ICRNL | termios.IXON | termios.IXOFF)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class RawTerminal:
    """Raw mode on a terminal for as long as the context lasts; ``restore`` is idempotent
    and safe to call from a signal handler or another thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # The attributes to restore, taken by exactly one restore(): list.pop is one atomic step,
        # so no lock, which a signal handler could find held by the very thread it interrupted.
        self._saved: list[list[Any]] = []

    def __enter__(self) -> RawTerminal:
        saved = termios.tcgetattr(self.fd)
        termios.tcsetattr(self.fd, termios.TCSAFLUSH, raw_attributes(saved))
        self._saved = [saved]
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        try:
            saved = self._saved.pop()
        except IndexError:
            return   # restored already
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass   # the terminal is gone (hung up): nothing to restore


class ConsoleInput:
    """Forward standard input to the guest on a daemon thread, until EOF.

    ``interactive``: the input is a terminal in raw mode; escape keys are
    the VMM's (``on_command`` gets them).  Otherwise bytes pass as read,
    with ``\\n`` as ``\\r``.
    """

    def __init__(self, fd: int, feed: Callable[[bytes], None], interactive: bool,
                 on_command: Callable[[EscapeCommand], None] = lambda command: None) -> None:
        self.fd, self.feed, self.interactive, self.on_command = fd, feed, interactive, on_command
        self._parser = EscapeParser()
        self._thread = threading.Thread(target=self._pump, name="console-input", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return
            self.handle(data)

    def handle(self, data: bytes) -> None:
        """One read's worth of input."""
        if not self.interactive:
            self.feed(data.replace(b"\n", b"\r"))
            return
        for keys in self._parser.feed(data):
            if keys.data:
                self.feed(keys.data)
            if keys.command is not None:
                self.on_command(keys.command)


class StopSignals:
    """While the context lasts, SIGTERM, SIGHUP and SIGINT end the run cleanly.

    The handler first calls ``restore`` (put the terminal back: quick and
    idempotent), then runs ``on_signal(signum)`` on a new thread, never in
    the handler's frame, which may have interrupted the main thread anywhere.
    A second signal of the same kind gets the default action, so a VMM that
    does not stop can still be ended.  Only the main thread can install
    handlers; elsewhere (a test runner's worker thread) this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self, on_signal: Callable[[int], None], restore: Callable[[], None] = lambda: None) -> None:
        self.on_signal, self.restore = on_signal, restore
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        threading.Thread(target=self.on_signal, args=(signum,), name=f"stop-on-{signal.Signals(signum).name}",
                         daemon=True).start()
