"""The devices every machine has, on their buses: the I/O APIC, COM1, the i8042's
reset line, the CMOS/RTC, ACPI sleep control and the debug-exit port (and the
test devices' scratch page when asked for)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from mshvstack.partition import Partition
from mshvstack.vmm.bus import Bus
from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.devices.ioapic import BASE as IOAPIC_BASE
from mshvstack.vmm.devices.ioapic import SIZE as IOAPIC_SIZE
from mshvstack.vmm.devices.ioapic import IoApic
from mshvstack.vmm.devices.simple import I8042, AcpiSleepControl, CmosRtc, DebugExit, Scratch
from mshvstack.vmm.devices.uart import Uart16550
from mshvstack.vmm.loader import acpi
from mshvstack.vmm.runstate import StopKind, StopReason

log = logging.getLogger(__name__)

I8042_BASE, I8042_SIZE = 0x60, 5
CMOS_BASE, CMOS_SIZE = 0x70, 2
DEBUG_EXIT_PORT = 0xF4
SCRATCH_MMIO = 0xD0000000


class Platform:
    """``console``: where COM1's output goes; ``stop``: ends the run (reset, power-off,
    debug exit)."""

    def __init__(self, partition: Partition, config: MachineConfig, console: Callable[[bytes], None],
                 stop: Callable[[StopReason], None]) -> None:
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.ioapic = IoApic(partition)
        self.mmio.register(IOAPIC_BASE, IOAPIC_SIZE, self.ioapic, "I/O APIC")
        self.uart = Uart16550(console, functools.partial(self.ioapic.pulse, acpi.COM1_IRQ))
        self.pio.register(acpi.COM1_PORT, acpi.COM1_PORTS, self.uart, "16550 UART (COM1)")
        self.pio.register(I8042_BASE, I8042_SIZE, I8042(lambda: stop(StopReason(StopKind.RESET, 0, "guest requested reset"))),
                          "i8042")
        self.cmos = CmosRtc(memory_mb=config.memory >> 20)
        self.pio.register(CMOS_BASE, CMOS_SIZE, self.cmos, "CMOS/RTC")
        self.pio.register(DEBUG_EXIT_PORT, 1, DebugExit(
            lambda value: stop(StopReason(StopKind.DEBUG_EXIT, value & 0xFF, "guest wrote to the debug-exit port"))), "debug exit")
        sleep = AcpiSleepControl(lambda: stop(StopReason(StopKind.POWEROFF, 0, "guest powered off (ACPI S5)")),
                                 acpi.SLEEP_TYPE_S5, acpi.SLP_EN, acpi.SLP_TYP_SHIFT)
        self.pio.register(acpi.SLEEP_CONTROL_PORT, 2, sleep, "ACPI sleep control")
        self.scratch: Scratch | None = None
        if config.test_devices or config.demo == "iotest":
            self.scratch = Scratch()
            self.mmio.register(SCRATCH_MMIO, 0x1000, self.scratch, "scratch")
        for bus in (self.pio, self.mmio):
            for base, length, name in bus.devices():
                log.info("%s device %s at %#x (%d bytes)", bus.name, name, base, length)

    def components(self) -> dict[str, Any]:
        """The devices with state a snapshot carries, by record name."""
        return {"uart": self.uart, "ioapic": self.ioapic, "cmos": self.cmos}

    def close(self) -> None:
        self.ioapic.close()
