"""ACPI tables written by our code: RSDP, XSDT, FADT (hardware-reduced), MADT (local
APICs and the I/O APIC), and a DSDT carrying the VMBus device that Linux's
hv_vmbus looks for (_HID "VMBUS" with a _CRS of MMIO windows for synthetic
devices) and COM1 with its interrupt.  A hardware-reduced platform has no
legacy PIC, so the guest learns IRQ 4 of the UART only from the DSDT (as on a
Hyper-V generation-2 VM)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mshvstack.partition.memory import GuestMemory
from mshvstack.vmm.devices.ioapic import BASE as IOAPIC_BASE

RSDP_GPA = 0xE0000          # in the BIOS area Linux scans without EFI
TABLES_GPA = 0xE0040
OEM_ID = b"MSHVST"
OEM_TABLE_ID = b"MSHVSTCK"
CREATOR_ID = b"MSVS"
LAPIC_BASE = 0xFEE00000
COM1_PORT, COM1_PORTS, COM1_IRQ = 0x3F8, 8, 4
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_LOW_POWER_S0_IDLE = 1 << 21
# Hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG/SLEEP_STATUS_REG):
# the guest enters S5 by writing SLP_TYP (from \_S5) and SLP_EN here.
SLEEP_CONTROL_PORT = 0x604
SLEEP_STATUS_PORT = 0x605
SLEEP_TYPE_S5 = 5
SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
_GAS_SYSTEM_IO = 1


@dataclass(frozen=True)
class MmioWindow:
    base: int
    size: int


# Where synthetic devices may map MMIO (below 4 GiB, below the LAPIC; and above 4 GiB).
DEFAULT_WINDOWS = (MmioWindow(0xF0000000, 0x8000000), MmioWindow(0x1000000000, 0x1000000000))


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = _checksum(bytes(table))
    return bytes(table)


def _pkg_length(content_length: int) -> bytes:
    """AML PkgLength for ``content_length`` bytes that follow it."""
    if content_length + 1 < 0x40:
        return bytes([content_length + 1])
    total = content_length + 2
    if total < 0x1000:
        return bytes([0x40 | (total & 0xF), total >> 4])
    total = content_length + 3
    return bytes([0x80 | (total & 0xF), (total >> 4) & 0xFF, total >> 12])


def _name(seg: str, value: bytes) -> bytes:
    return b"\x08" + seg.encode() + value


def _string(text: str) -> bytes:
    return b"\x0d" + text.encode() + b"\0"


def _qword_memory(window: MmioWindow) -> bytes:
    end = window.base + window.size - 1
    body = struct.pack("<BBBQQQQQ", 0, 0x0C, 0x01, 0, window.base, end, 0, window.size)
    return b"\x8a" + struct.pack("<H", len(body)) + body


def _buffer(data: bytes) -> bytes:
    size = b"\x0b" + struct.pack("<H", len(data)) if len(data) > 0xFF else b"\x0a" + bytes([len(data)])
    content = size + data
    return b"\x11" + _pkg_length(len(content)) + content


def _device(name: str, body: bytes) -> bytes:
    content = name.encode() + body
    return b"\x5b\x82" + _pkg_length(len(content)) + content


def _eisa_id(text: str) -> bytes:
    """EisaId("PNP0501"): three letters in 5 bits each, then four hex digits."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    high = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    return b"\x0c" + struct.pack(">HH", high, int(text[3:], 16))


def vmbus_aml(windows: tuple[MmioWindow, ...] = DEFAULT_WINDOWS) -> bytes:
    """Device(VMBS) { _HID "VMBUS", _UID 0, _CRS <windows> }"""
    crs = b"".join(_qword_memory(w) for w in windows) + b"\x79\x00"
    return _device("VMBS", _name("_HID", _string("VMBUS")) + _name("_UID", b"\x00") + _name("_CRS", _buffer(crs)))


def com1_aml() -> bytes:
    """Device(COM1) { _HID EisaId("PNP0501"), _UID 1, _CRS { IO(Decode16, 0x3F8, 0x3F8, 1, 8), IRQNoFlags() {4} } }"""
    io = struct.pack("<BBHHBB", 0x47, 1, COM1_PORT, COM1_PORT, 1, COM1_PORTS)
    irq = struct.pack("<BH", 0x22, 1 << COM1_IRQ)
    crs = io + irq + b"\x79\x00"
    return _device("COM1", _name("_HID", _eisa_id("PNP0501")) + _name("_UID", b"\x01") + _name("_CRS", _buffer(crs)))


def system_bus_aml(windows: tuple[MmioWindow, ...] = DEFAULT_WINDOWS) -> bytes:
    """Scope(\\_SB) { VMBus, COM1 }"""
    scope_body = b"\\_SB_" + vmbus_aml(windows) + com1_aml()
    return b"\x10" + _pkg_length(len(scope_body)) + scope_body


def sleep_states_aml() -> bytes:
    """Name(\\_S5_, Package() {SLEEP_TYPE_S5, 0}): the guest may power off through ACPI."""
    package = bytes([2, 0x0A, SLEEP_TYPE_S5, 0x00])
    return _name("\\_S5_", b"\x12" + _pkg_length(len(package)) + package)


def _io_register(port: int) -> bytes:
    """A Generic Address Structure for one byte of port I/O."""
    return struct.pack("<BBBBQ", _GAS_SYSTEM_IO, 8, 0, 1, port)


def _fadt(dsdt: int) -> bytes:
    body = bytearray(276 - 36)
    struct.pack_into("<I", body, 40 - 36, dsdt)              # DSDT
    body[45 - 36] = 0                                         # preferred PM profile: unspecified
    struct.pack_into("<H", body, 109 - 36, 1 << 2)           # IAPC_BOOT_ARCH: VGA not present
    struct.pack_into("<I", body, 112 - 36, FADT_HW_REDUCED_ACPI | FADT_LOW_POWER_S0_IDLE)
    body[131 - 36] = 1                                        # FADT minor version (6.1)
    struct.pack_into("<Q", body, 140 - 36, dsdt)             # X_DSDT
    body[244 - 36 : 256 - 36] = _io_register(SLEEP_CONTROL_PORT)
    body[256 - 36 : 268 - 36] = _io_register(SLEEP_STATUS_PORT)
    struct.pack_into("<Q", body, 268 - 36, 0x4D5348565354434B)  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def _madt(vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, 0)
    for cpu in range(vcpus):
        if cpu < 255:
            body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)        # Processor Local APIC, enabled
        else:
            body += struct.pack("<BBHIII", 9, 16, 0, cpu, 1, cpu)   # Processor Local x2APIC
    body += struct.pack("<BBBBII", 1, 12, vcpus & 0xFF, 0, IOAPIC_BASE, 0)   # I/O APIC at GSI 0
    return _table(b"APIC", 5, body)


@dataclass(frozen=True)
class AcpiTables:
    rsdp: int
    xsdt: int
    fadt: int
    madt: int
    dsdt: int


def write_acpi_tables(memory: GuestMemory, vcpus: int, windows: tuple[MmioWindow, ...] = DEFAULT_WINDOWS) -> AcpiTables:
    """Write the tables into the BIOS area; returns where each one went."""
    cursor = TABLES_GPA

    def place(table: bytes) -> int:
        nonlocal cursor
        address = cursor
        memory.write(address, table)
        cursor = (cursor + len(table) + 15) & ~15
        return address

    dsdt = place(_table(b"DSDT", 2, sleep_states_aml() + system_bus_aml(windows)))
    fadt = place(_fadt(dsdt))
    madt = place(_madt(vcpus))
    xsdt = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt, madt)))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt, 0, bytes(3)))
    rsdp[8] = _checksum(bytes(rsdp[:20]))
    rsdp[32] = _checksum(bytes(rsdp))
    memory.write(RSDP_GPA, bytes(rsdp))
    return AcpiTables(RSDP_GPA, xsdt, fadt, madt, dsdt)
