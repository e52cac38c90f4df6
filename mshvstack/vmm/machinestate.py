"""A machine saved into a snapshot stream, and a machine built again from one.

What a snapshot holds (docs/snapshot.md): the configuration, the partition's
reference time, every VP (through the public partition API), guest RAM
(zero pages left out) and each device's typed record.  The stream is read
as hostile input: the configuration is validated like the command line's,
every VP must be one of the machine's and come once, every page must lie in
its RAM, every device record must have the fields and types its class
declares.  A machine with VMBus devices is refused: the VMBus server's and
its providers' state are not records yet.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mshvstack.abi import lib
from mshvstack.snapshot import MemoryChunk, SectionKind, SnapshotError, StreamReader, StreamWriter, VpRecord
from mshvstack.snapshot.records import MAX_CHUNK_PAGES, PAGE
from mshvstack.snapshot.vp import restore_vp, save_vp
from mshvstack.vmm.config import ConfigError, MachineConfig
from mshvstack.vmm.devices.ioapic import IoApicState
from mshvstack.vmm.devices.simple import CmosState
from mshvstack.vmm.devices.uart import UartState

if TYPE_CHECKING:
    from mshvstack.vmm.machine import Machine

CHUNK = MAX_CHUNK_PAGES * PAGE
MAX_RECORD_BYTES = 64 << 10
# Device name -> its record class (each device's save() and restore()).
DEVICE_RECORDS: dict[str, type] = {"uart": UartState, "ioapic": IoApicState, "cmos": CmosState}


def _devices(machine: Machine) -> dict[str, Any]:
    return {"uart": machine.uart, "ioapic": machine.ioapic, "cmos": machine.cmos}


def refuse_unsupported(machine: Machine) -> None:
    if machine.vmbus is not None:
        raise SnapshotError("a machine with VMBus devices cannot be saved yet (the VMBus state is not a record): "
                            "run it with --no-vmbus")


# ---- records as JSON, checked against their classes
def _encode_record(record: Any) -> dict[str, Any]:
    fields = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        fields[f.name] = value.hex() if isinstance(value, bytes) else list(value) if isinstance(value, tuple) else value
    return {"version": type(record).VERSION, "fields": fields}


def _decode_record(cls: type, data: Any, what: str) -> Any:
    if not isinstance(data, dict) or data.get("version") != cls.VERSION or not isinstance(data.get("fields"), dict):  # type: ignore[attr-defined]
        raise SnapshotError(f"{what}: not a version {cls.VERSION} record")  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = data["fields"]
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if set(given) != names:
        raise SnapshotError(f"{what}: fields {sorted(set(given) ^ names)} missing or unknown")
    for name in names:
        expected, value = hints[name], given[name]
        if expected is bytes and isinstance(value, str) and len(value) <= 2 * MAX_RECORD_BYTES:
            try:
                values[name] = bytes.fromhex(value)
                continue
            except ValueError:
                pass
        elif expected is bool and isinstance(value, bool):
            values[name] = value
            continue
        elif expected is int and type(value) is int and 0 <= value < 1 << 64:
            values[name] = value
            continue
        elif typing.get_origin(expected) is tuple and isinstance(value, list) and len(value) <= 1024:
            item = typing.get_args(expected)[0]
            if all(type(v) is item and (item is bool or 0 <= v < 1 << 64) for v in value):
                values[name] = tuple(value)
                continue
        raise SnapshotError(f"{what}: field {name} is not a valid {getattr(expected, '__name__', expected)}")
    return cls(**values)


def _config_record(config: MachineConfig) -> bytes:
    return json.dumps({
        "kernel": str(config.kernel) if config.kernel else None, "demo": config.demo, "memory": config.memory,
        "vcpus": config.vcpus, "cmdline": config.cmdline, "initrd": str(config.initrd) if config.initrd else None,
        "profile": config.profile, "test_devices": config.test_devices, "extract_vmlinux": config.extract_vmlinux,
        "saved_at": time.time(),
    }).encode()


def _config_from(payload: bytes, backend: str) -> MachineConfig:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError("the snapshot's configuration is not JSON") from None
    if not isinstance(data, dict):
        raise SnapshotError("the snapshot's configuration is not an object")
    expected: dict[str, Any] = {"kernel": (str, type(None)), "demo": (str, type(None)), "memory": int, "vcpus": int, "cmdline": str,
                "initrd": (str, type(None)), "profile": str, "test_devices": bool, "extract_vmlinux": bool,
                "saved_at": (int, float)}
    for key, kind in expected.items():
        if key not in data or not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise SnapshotError(f"the snapshot's configuration has no valid {key!r}")
    config = MachineConfig(kernel=Path(data["kernel"]) if data["kernel"] else None, demo=data["demo"],
                           memory=data["memory"], vcpus=data["vcpus"], cmdline=data["cmdline"],
                           initrd=Path(data["initrd"]) if data["initrd"] else None, backend=backend,
                           profile=data["profile"], test_devices=data["test_devices"],
                           extract_vmlinux=data["extract_vmlinux"], vmbus=False)
    try:
        config.validate(boot_files=False)
    except ConfigError as exc:
        raise SnapshotError(f"the snapshot's configuration: {exc}") from None
    return config


# ---- saving
def write_config(machine: Machine, writer: StreamWriter) -> None:
    refuse_unsupported(machine)
    writer.section(SectionKind.CONFIG, _config_record(machine.config))


def write_memory(machine: Machine, writer: StreamWriter, pages: set[int] | None = None) -> int:
    """All of guest RAM (zero pages left out), or only the pages at the GPAs given; bytes sent."""
    memory, sent = machine.partition.memory, 0
    for region in memory.regions:
        for start in range(region.gpa, region.end, CHUNK):
            length = min(CHUNK, region.end - start)
            if pages is None:
                chunk = MemoryChunk.from_memory(start, memory.view(start, length))
            else:
                wanted = [gpa for gpa in range(start, start + length, PAGE) if gpa in pages]
                if not wanted:
                    continue
                chunk = MemoryChunk(start, length // PAGE, {(gpa - start) // PAGE: memory.read(gpa, PAGE) for gpa in wanted})
            payload = chunk.encode()
            writer.section(SectionKind.MEMORY, payload)
            sent += len(payload)
    return sent


def write_final(machine: Machine, writer: StreamWriter) -> None:
    """What is taken once the machine is paused: VPs, devices, the clock; then the end."""
    for vp in machine.vps:
        writer.section(SectionKind.VP, save_vp(vp).encode())
    for name, device in _devices(machine).items():
        writer.section(SectionKind.DEVICE, json.dumps({"name": name, "state": _encode_record(device.save())}).encode())
    clock = machine.partition.get_property(lib.HV_PARTITION_PROPERTY_REFERENCE_TIME)
    writer.section(SectionKind.CLOCK, clock.to_bytes(8, "little"))
    writer.end()


def save(machine: Machine, out: BinaryIO) -> int:
    """Write the machine (paused, every VP out of its run) into ``out``; bytes written."""
    writer = StreamWriter(out)
    write_config(machine, writer)
    write_memory(machine, writer)
    write_final(machine, writer)
    return writer.bytes_written


# ---- restoring
def read_config(source: BinaryIO, name: str, backend: str) -> tuple[StreamReader, MachineConfig]:
    """Open a stream and read its configuration (its first section)."""
    reader = StreamReader(source, name)
    first = next(reader, None)
    if first is None or first.kind is not SectionKind.CONFIG:
        raise SnapshotError(f"{name} does not start with the machine's configuration")
    return reader, _config_from(first.payload, backend)


def restore_into(machine: Machine, reader: StreamReader) -> None:
    """Fill a machine built from the stream's configuration (VPs created, nothing run).
    Memory may come more than once (a live migration's passes): the last copy counts."""
    memory, size = machine.partition.memory, machine.config.memory
    restored: set[int] = set()
    devices = _devices(machine)
    seen_devices: set[str] = set()
    clock: int | None = None
    for section in reader:
        if section.kind is SectionKind.VP:
            record = VpRecord.decode(section.payload)
            if record.index >= len(machine.vps) or record.index in restored:
                raise SnapshotError(f"the snapshot has VP {record.index} twice or beyond the machine's {len(machine.vps)}")
            restore_vp(machine.vps[record.index], record)
            restored.add(record.index)
        elif section.kind is SectionKind.MEMORY:
            chunk = MemoryChunk.decode(section.payload)
            if chunk.gpa + chunk.pages * PAGE > size:
                raise SnapshotError(f"the snapshot has memory at GPA {chunk.gpa:#x} beyond the machine's {size >> 20} MiB")
            for page, data in chunk.data.items():
                memory.write(chunk.gpa + page * PAGE, data)
        elif section.kind is SectionKind.DEVICE:
            try:
                data = json.loads(section.payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise SnapshotError("a device section is not JSON") from None
            name = data.get("name") if isinstance(data, dict) else None
            if name not in DEVICE_RECORDS or name in seen_devices:
                raise SnapshotError(f"the snapshot has an unknown or repeated device {name!r}")
            try:
                devices[name].restore(_decode_record(DEVICE_RECORDS[name], data.get("state"), f"device {name}"))
            except ValueError as exc:
                raise SnapshotError(f"device {name}: {exc}") from None
            seen_devices.add(name)
        elif section.kind is SectionKind.CLOCK and len(section.payload) == 8 and clock is None:
            clock = int.from_bytes(section.payload, "little")
        else:
            raise SnapshotError(f"a {section.kind.name} section where VPs, memory, devices or the clock were expected")
    if restored != set(range(len(machine.vps))):
        raise SnapshotError(f"the snapshot lacks VPs {sorted(set(range(len(machine.vps))) - restored)}")
    if seen_devices != set(DEVICE_RECORDS):
        raise SnapshotError(f"the snapshot lacks devices {sorted(set(DEVICE_RECORDS) - seen_devices)}")
    if clock is None or clock >= 1 << 63:
        raise SnapshotError("the snapshot lacks the partition's clock")
    machine.partition.set_property(lib.HV_PARTITION_PROPERTY_REFERENCE_TIME, clock)
