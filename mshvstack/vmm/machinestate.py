"""A machine saved into a snapshot stream, and a machine built again from one.

What a snapshot holds (docs/snapshot.md): the configuration, the partition's
reference time, every VP (through the public partition API), guest RAM
(zero pages left out) and each component's typed record: the devices, the
VMBus host (connection, GPADLs, channels, SynIC messages waiting) and each
channel's provider.  The stream is read as hostile input: the configuration
is validated like the command line's, every VP must be one of the machine's
and come once, every page must lie in its RAM, every record must have the
fields and types its class declares and fit the machine it is restored into.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mshvstack.abi import lib
from mshvstack.errors import MshvError
from mshvstack.snapshot import MemoryChunk, SectionKind, SnapshotError, StreamReader, StreamWriter, VpRecord, typed
from mshvstack.snapshot.records import MAX_CHUNK_PAGES, PAGE
from mshvstack.snapshot.vp import restore_vp, save_vp
from mshvstack.vmbus.server import VmbusRecords, VmbusState
from mshvstack.vmbus.synic import SynicHostState
from mshvstack.vmm.config import ConfigError, DiskSpec, MachineConfig
from mshvstack.vmm.devices.ioapic import IoApicState
from mshvstack.vmm.devices.simple import CmosState
from mshvstack.vmm.devices.uart import UartState
from mshvstack.vmm.sentcopy import SentCopy

if TYPE_CHECKING:
    from mshvstack.vmm.machine import Machine

CHUNK = MAX_CHUNK_PAGES * PAGE
# Device name -> its record class (each device's save() and restore()).
DEVICE_RECORDS: dict[str, type] = {"uart": UartState, "ioapic": IoApicState, "cmos": CmosState}
VMBUS, SYNIC, CHANNEL = "vmbus", "synic", "vmbus-channel-"
MAX_COMPONENT_BYTES = 32 << 20   # the largest record: the VMBus host with every GPADL page (1M pages) listed


def _devices(machine: Machine) -> dict[str, Any]:
    return machine.platform.components()


def _config_record(config: MachineConfig) -> bytes:
    return json.dumps({
        "kernel": str(config.kernel) if config.kernel else None, "demo": config.demo, "memory": config.memory,
        "vcpus": config.vcpus, "cmdline": config.cmdline, "initrd": str(config.initrd) if config.initrd else None,
        "profile": config.profile, "test_devices": config.test_devices, "extract_vmlinux": config.extract_vmlinux,
        "vmbus": config.vmbus, "disks": [{"path": str(d.path.resolve()), "read_only": d.read_only, "size": d.path.stat().st_size}
                                         for d in config.disks],
        "saved_at": time.time(),
    }).encode()


def _disks_from(saved: Any, given: tuple[DiskSpec, ...] | None) -> tuple[DiskSpec, ...]:
    """The disks to reopen: the recorded paths, or ``given`` in their place (as many, each
    of the recorded size: the guest knows its disks' sizes)."""
    if not isinstance(saved, list) or len(saved) > 64 or not all(
            isinstance(d, dict) and isinstance(d.get("path"), str) and isinstance(d.get("read_only"), bool)
            and type(d.get("size")) is int for d in saved):
        raise SnapshotError("the snapshot's configuration has no valid 'disks'")
    if given and len(given) != len(saved):
        raise SnapshotError(f"the snapshot's machine has {len(saved)} disks, {len(given)} given with --disk")
    disks = given or tuple(DiskSpec(Path(d["path"]), d["read_only"]) for d in saved)
    for spec, record in zip(disks, saved):
        try:
            size = spec.path.stat().st_size
        except OSError as exc:
            raise SnapshotError(f"disk {str(spec.path)!r}: {exc.strerror} (give the image with --disk)") from None
        if size != record["size"]:
            raise SnapshotError(f"disk {str(spec.path)!r} is {size} bytes; the snapshot's disk was {record['size']}")
    return disks


def _config_from(payload: bytes, backend: str, disks: tuple[DiskSpec, ...] | None) -> MachineConfig:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError("the snapshot's configuration is not JSON") from None
    if not isinstance(data, dict):
        raise SnapshotError("the snapshot's configuration is not an object")
    expected: dict[str, Any] = {"kernel": (str, type(None)), "demo": (str, type(None)), "memory": int, "vcpus": int, "cmdline": str,
                "initrd": (str, type(None)), "profile": str, "test_devices": bool, "extract_vmlinux": bool,
                "vmbus": bool, "disks": list, "saved_at": (int, float)}
    for key, kind in expected.items():
        if key not in data or not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise SnapshotError(f"the snapshot's configuration has no valid {key!r}")
    config = MachineConfig(kernel=Path(data["kernel"]) if data["kernel"] else None, demo=data["demo"],
                           memory=data["memory"], vcpus=data["vcpus"], cmdline=data["cmdline"],
                           initrd=Path(data["initrd"]) if data["initrd"] else None, backend=backend,
                           profile=data["profile"], test_devices=data["test_devices"],
                           extract_vmlinux=data["extract_vmlinux"], vmbus=data["vmbus"],
                           disks=_disks_from(data["disks"], disks))
    try:
        config.validate(boot_files=False)
    except ConfigError as exc:
        raise SnapshotError(f"the snapshot's configuration: {exc}") from None
    return config


# ---- saving
def write_config(machine: Machine, writer: StreamWriter) -> None:
    writer.section(SectionKind.CONFIG, _config_record(machine.config))


def write_memory(machine: Machine, writer: StreamWriter, pages: set[int] | None = None, copy: SentCopy | None = None,
                 compress: bool = False) -> int:
    """All of guest RAM (zero pages left out: a destination starts with zeroed RAM), or
    only the pages at the GPAs given (zero ones too); ``copy`` records what went;
    ``compress``: as MEMORY_ZLIB sections (files; a fast link gains nothing).  Bytes sent."""
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
            payload = chunk.compressed() if compress else chunk.encode()
            writer.section(SectionKind.MEMORY_ZLIB if compress else SectionKind.MEMORY, payload)
            if copy is not None:
                for page, data in chunk.data.items():
                    copy.record(start + page * PAGE, data)
            sent += len(payload)
    return sent


@contextlib.contextmanager
def _vmbus_still(machine: Machine) -> Iterator[VmbusRecords | None]:
    if machine.vmbus is None:
        yield None
    else:
        with machine.vmbus.quiesced() as records:
            yield records


def _record_section(writer: StreamWriter, name: str, record: Any) -> None:
    writer.section(SectionKind.DEVICE, json.dumps({"name": name, "state": typed.encode(record)}, separators=(",", ":")).encode())


def write_stopped(machine: Machine, writer: StreamWriter, pages: set[int] | None = None, compress: bool = False) -> int:
    """What is taken with the machine paused (every VP out of its run): guest RAM (all
    of it, or the pages given, with the VMBus host's GPADL pages, which it writes
    without the dirty log), the VPs, every component's record and the clock; then
    the end.  The VMBus host is held still throughout.  Bytes of memory sent."""
    with _vmbus_still(machine) as vmbus:
        if pages is not None and vmbus is not None:
            pages = pages | {pfn * PAGE for gpadl in vmbus.server.gpadls for pfn in gpadl.pfns}
        sent = write_memory(machine, writer, pages, compress=compress)
        for vp in machine.vps:
            writer.section(SectionKind.VP, save_vp(vp).encode())
        for name, device in _devices(machine).items():
            _record_section(writer, name, device.save())
        if vmbus is not None:
            _record_section(writer, VMBUS, vmbus.server)
            _record_section(writer, SYNIC, vmbus.synic)
            for relid, state in vmbus.providers.items():
                _record_section(writer, f"{CHANNEL}{relid}", state)
    clock = machine.partition.get_property(lib.HV_PARTITION_PROPERTY_REFERENCE_TIME)
    writer.section(SectionKind.CLOCK, clock.to_bytes(8, "little"))
    writer.end()
    return sent


def save(machine: Machine, out: BinaryIO) -> int:
    """Write the machine (paused, every VP out of its run) into ``out``; bytes written."""
    writer = StreamWriter(out)
    write_config(machine, writer)
    write_stopped(machine, writer, compress=True)
    return writer.bytes_written


# ---- restoring
def read_config(source: BinaryIO, name: str, backend: str, disks: tuple[DiskSpec, ...] | None = None) -> tuple[StreamReader, MachineConfig]:
    """Open a stream and read its configuration (its first section); ``disks`` replace the
    recorded images."""
    reader = StreamReader(source, name)
    first = next(reader, None)
    if first is None or first.kind is not SectionKind.CONFIG:
        raise SnapshotError(f"{name} does not start with the machine's configuration")
    return reader, _config_from(first.payload, backend, disks)


def _record_types(machine: Machine) -> dict[str, type]:
    """Every record the machine expects, by section name."""
    types = dict(DEVICE_RECORDS)
    if machine.vmbus is not None:
        types[VMBUS], types[SYNIC] = VmbusState, SynicHostState
        for relid, channel in machine.vmbus.channels.items():
            types[f"{CHANNEL}{relid}"] = channel.provider.state_type
    return types


def _decode_component(section: bytes, types: dict[str, type], seen: dict[str, Any]) -> None:
    if len(section) > MAX_COMPONENT_BYTES:
        raise SnapshotError(f"a component section of {len(section)} bytes is over the {MAX_COMPONENT_BYTES}-byte limit")
    try:
        data = json.loads(section)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SnapshotError("a component section is not JSON") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in types or name in seen:
        raise SnapshotError(f"the snapshot has an unknown or repeated component {name!r}")
    seen[name] = typed.decode(types[name], data.get("state"), f"component {name}")


def _apply_components(machine: Machine, records: dict[str, Any]) -> None:
    for name, device in _devices(machine).items():
        try:
            device.restore(records[name])
        except ValueError as exc:
            raise SnapshotError(f"device {name}: {exc}") from None
    if machine.vmbus is not None:
        providers = {int(name[len(CHANNEL):]): record for name, record in records.items() if name.startswith(CHANNEL)}
        try:
            machine.vmbus.restore(VmbusRecords(records[VMBUS], records[SYNIC], providers))
        except MshvError as exc:
            raise SnapshotError(f"VMBus: {exc}") from None


def restore_into(machine: Machine, reader: StreamReader) -> None:
    """Fill a machine built from the stream's configuration (VPs created, nothing run).
    Memory may come more than once (a live migration's passes): the last copy counts."""
    memory, size = machine.partition.memory, machine.config.memory
    restored: set[int] = set()
    types = _record_types(machine)
    records: dict[str, Any] = {}
    clock: int | None = None
    for section in reader:
        if section.kind is SectionKind.VP:
            record = VpRecord.decode(section.payload)
            if record.index >= len(machine.vps) or record.index in restored:
                raise SnapshotError(f"the snapshot has VP {record.index} twice or beyond the machine's {len(machine.vps)}")
            restore_vp(machine.vps[record.index], record)
            restored.add(record.index)
        elif section.kind in (SectionKind.MEMORY, SectionKind.MEMORY_ZLIB):
            chunk = (MemoryChunk.decode if section.kind is SectionKind.MEMORY else MemoryChunk.decompress)(section.payload)
            if chunk.gpa + chunk.pages * PAGE > size:
                raise SnapshotError(f"the snapshot has memory at GPA {chunk.gpa:#x} beyond the machine's {size >> 20} MiB")
            for page, data in chunk.data.items():
                memory.write(chunk.gpa + page * PAGE, data)
        elif section.kind is SectionKind.DEVICE:
            _decode_component(section.payload, types, records)
        elif section.kind is SectionKind.CLOCK and len(section.payload) == 8 and clock is None:
            clock = int.from_bytes(section.payload, "little")
        else:
            raise SnapshotError(f"a {section.kind.name} section where VPs, memory, devices or the clock were expected")
    if restored != set(range(len(machine.vps))):
        raise SnapshotError(f"the snapshot lacks VPs {sorted(set(range(len(machine.vps))) - restored)}")
    missing = {name for name in types if not name.startswith(CHANNEL)} - set(records)
    if missing:
        raise SnapshotError(f"the snapshot lacks the records of {sorted(missing)}")
    if clock is None or clock >= 1 << 63:
        raise SnapshotError("the snapshot lacks the partition's clock")
    _apply_components(machine, records)
    machine.partition.set_property(lib.HV_PARTITION_PROPERTY_REFERENCE_TIME, clock)
