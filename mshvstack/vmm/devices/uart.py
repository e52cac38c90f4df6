"""A 16550A UART: enough of it for firmware, Linux's 8250 driver and our guests."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

# Register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NONE, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
IIR_FIFO = 0xC0
MCR_LOOP = 0x10


@dataclass(frozen=True)
class UartState:
    """The UART's registers and the input the guest has not read yet."""

    VERSION: ClassVar[int] = 1
    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    dll: int
    dlm: int
    rx: bytes
    thr_empty_pending: bool


class Uart16550:
    """Transmit goes to ``output`` (a callable taking bytes); input is fed by feed()."""

    def __init__(self, output: Callable[[bytes], None], interrupt: Callable[[], None] | None = None) -> None:
        self.output = output
        self.interrupt = interrupt
        # Guards the registers and the receive queue (a VP's port I/O, the console-input thread).
        # A leaf: the output and the interrupt line are called after it is released.
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0
        self.rx: deque[int] = deque(maxlen=4096)
        self.thr_empty_pending = False
        self.bytes_out = 0

    def feed(self, data: bytes) -> None:
        with self._lock:
            self.rx.extend(data)
            pending = self._pending()
        self._raise(pending)

    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & 1 else 0
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI | fifo
        if self.ier & IER_THRI and self.thr_empty_pending:
            return IIR_THRI | fifo
        return IIR_NONE | fifo

    def _pending(self) -> bool:
        """An interrupt is pending (with the lock held: the registers it reads change under it)."""
        return self._iir() & 1 == 0

    def _raise(self, pending: bool) -> None:
        """Signal the interrupt line, without the lock (the I/O APIC takes its own)."""
        if self.interrupt is not None and pending:
            self.interrupt()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    return self.dll
                return self.rx.popleft() if self.rx else 0
            if offset == IER_DLM:
                return self.dlm if dlab else self.ier
            if offset == IIR_FCR:
                iir = self._iir()
                if iir & 0x0F == IIR_THRI:
                    self.thr_empty_pending = False
                return iir
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
            if offset == MSR:
                # Loopback reflects MCR; otherwise report carrier/DSR/CTS present.
                return ((self.mcr & 0x0F) << 4) if self.mcr & MCR_LOOP else 0xB0
            return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out = None
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    self.dll = value
                elif self.mcr & MCR_LOOP:
                    self.rx.append(value)
                else:
                    out = bytes([value])
                    self.bytes_out += 1
                    self.thr_empty_pending = True
            elif offset == IER_DLM:
                if dlab:
                    self.dlm = value
                else:
                    self.ier = value & 0x0F
                    self.thr_empty_pending = bool(value & IER_THRI)
            elif offset == IIR_FCR:
                self.fcr = value
                if value & 0x02:
                    self.rx.clear()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
            pending = self._pending()
        if out is not None:
            self.output(out)
        self._raise(pending)

    def save(self) -> UartState:
        with self._lock:
            return UartState(self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.dll, self.dlm, bytes(self.rx),
                             self.thr_empty_pending)

    def restore(self, state: UartState) -> None:
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr, self.fcr = state.ier, state.lcr, state.mcr, state.scr, state.fcr
            self.dll, self.dlm, self.thr_empty_pending = state.dll, state.dlm, state.thr_empty_pending
            self.rx.clear()
            self.rx.extend(state.rx)
            pending = self._pending()
        self._raise(pending)
