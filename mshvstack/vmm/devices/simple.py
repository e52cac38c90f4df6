"""Small platform devices: debug exit, i8042 reset line, CMOS/RTC, MMIO scratch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


class DebugExit:
    """The guest writes its exit code here to end the run (QEMU's isa-debug-exit idea)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value)


class AcpiSleepControl:
    """The hardware-reduced ACPI sleep control/status registers (two I/O bytes).

    Writing SLP_EN with the \\_S5 sleep type powers the machine off, which is
    how Linux's poweroff ends (acpi_power_off)."""

    def __init__(self, on_power_off: Callable[[], None], s5_type: int, enable_bit: int, type_shift: int) -> None:
        self.on_power_off = on_power_off
        self._s5_type, self._enable, self._shift = s5_type, enable_bit, type_shift

    def read(self, offset: int, size: int) -> int:
        return 0   # status: wake not signalled

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and value & self._enable and (value >> self._shift) & 7 == self._s5_type:
            self.on_power_off()


class I8042:
    """Keyboard controller, as far as a VMM needs it: status reads and the
    pulse-reset command (0xFE to port 0x64) that Linux uses to reboot."""

    STATUS_OFFSET = 4

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0x1C if offset == self.STATUS_OFFSET else 0  # system flag, input buffer empty

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == self.STATUS_OFFSET and value & 0xFF == 0xFE:
            self.on_reset()


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


@dataclass(frozen=True)
class CmosState:
    VERSION: ClassVar[int] = 1
    index: int
    nvram: bytes


class CmosRtc:
    """CMOS index/data ports with an RTC that reads host time (UTC, BCD, 24h),
    enough for Linux's mc146818 driver to read the date."""

    def __init__(self, clock: Callable[[], float] = time.time, memory_mb: int = 0) -> None:
        self.clock = clock
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[0x0A] = 0x26   # 32.768 kHz base, 1024 Hz rate
        self.nvram[0x0B] = 0x02   # 24h, BCD
        self.nvram[0x0D] = 0x80   # valid RAM and time
        if memory_mb > 16:
            extended = min((memory_mb - 16) * 1024 // 64, 0xFFFF)  # above 16 MiB in 64 KiB units
            self.nvram[0x34], self.nvram[0x35] = extended & 0xFF, extended >> 8

    def _time_register(self, index: int) -> int | None:
        t = time.gmtime(self.clock())
        fields = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: t.tm_wday + 1,
                  0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, 0x32: t.tm_year // 100}
        value = fields.get(index)
        if value is None:
            return None
        return value if self.nvram[0x0B] & 0x04 else _bcd(value)

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.index
        index = self.index & 0x7F
        value = self._time_register(index)
        if value is not None:
            return value
        if index == 0x0A:
            return self.nvram[0x0A] & 0x7F  # update-in-progress never set
        if index == 0x0C:
            return 0
        return self.nvram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0xFF
        elif self._time_register(self.index & 0x7F) is None:
            self.nvram[self.index & 0x7F] = value & 0xFF

    def save(self) -> CmosState:
        return CmosState(self.index, bytes(self.nvram))

    def restore(self, state: CmosState) -> None:
        if len(state.nvram) != len(self.nvram):
            raise ValueError(f"CMOS NVRAM is {len(self.nvram)} bytes, not {len(state.nvram)}")
        self.index, self.nvram[:] = state.index & 0xFF, state.nvram


class Scratch:
    """An MMIO register file: reads return what was written (for tests and demos)."""

    def __init__(self, size: int = 32) -> None:
        self.data = bytearray(size)
        self.accesses = 0

    def read(self, offset: int, size: int) -> int:
        self.accesses += 1
        return int.from_bytes(self.data[offset : offset + size].ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        chunk = value.to_bytes(size, "little")[: max(len(self.data) - offset, 0)]
        self.data[offset : offset + len(chunk)] = chunk


