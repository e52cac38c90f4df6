"""Machine: a partition, its memory and VPs (one thread each), devices, and a lifecycle.

    created → running ⇄ paused → stopped      (reset: rebuilt, same state)

Exits are dispatched here to the buses and policies; a guest triple fault,
reset request, power-off, panic report or debug-exit write ends the run with
a reason and exit code.  Lifecycle changes are announced to listeners as
events named as QMP names them (STOP, RESUME, POWERDOWN, RESET, SHUTDOWN,
GUEST_PANICKED).

Threads and locks (docs/concurrency.md): one thread per VP, the VMBus
housekeeping thread, and callers of the public methods (the CLI, QMP
sessions, the console).  ``_lifecycle`` comes first: pause, resume,
snapshot, reset, close, status and housekeeping take it, then the VMBus
server's lock (through ``VmbusServer.call``) or ``_state_changed``.
``_state_changed`` guards ``state``, ``reason`` and ``_parked`` and wakes the
threads that wait for them; nothing is taken while holding it.  Listeners
are called with no lock held.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from mshvstack.abi import lib
from mshvstack.errors import MshvError
from mshvstack.hvcall import HvRegister, calls
from mshvstack.partition import (
    CpuidIntercept,
    ExceptionVector,
    Halt,
    HypercallIntercept,
    Interrupted,
    IoPortIntercept,
    MemoryIntercept,
    Mshv,
    MsrIntercept,
    PartitionConfig,
    UnknownExit,
    UnrecoverableException,
    Vp,
    VpExit,
)
from mshvstack.partition.exits import ExceptionIntercept, SintDeliverable
from mshvstack.snapshot import StreamReader
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.providers.heartbeat import Heartbeat
from mshvstack.vmbus.providers.kvp import POOLS as KVP_POOLS
from mshvstack.vmbus.providers.kvp import Kvp
from mshvstack.vmbus.providers.netvsc import Netvsc
from mshvstack.vmbus.providers.scsi import DiskImage
from mshvstack.vmbus.providers.shutdown import Shutdown
from mshvstack.vmbus.providers.storage import Storage
from mshvstack.vmbus.providers.timesync import TimeSync
from mshvstack.vmbus.server import VmbusServer
from mshvstack.vmbus.synic import SynicHost
from mshvstack.vmm import machinestate
from mshvstack.vmm.bus import Bus
from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.crash import MSR_CRASH_CTL, GuestCrash, read_report
from mshvstack.vmm.devices.ioapic import BASE as IOAPIC_BASE
from mshvstack.vmm.devices.ioapic import SIZE as IOAPIC_SIZE
from mshvstack.vmm.devices.ioapic import IoApic
from mshvstack.vmm.devices.simple import I8042, AcpiSleepControl, CmosRtc, DebugExit, Scratch
from mshvstack.vmm.devices.uart import Uart16550
from mshvstack.vmm.loader import LoaderError, acpi
from mshvstack.vmm.loader.acpi import write_acpi_tables
from mshvstack.vmm.loader.bzimage import extract_vmlinux, is_bzimage, load_bzimage
from mshvstack.vmm.loader.elf import load_elf
from mshvstack.vmm.loader.pvh import write_start_info
from mshvstack.vmm.loader.x86boot import BootState, long_mode, protected_mode
from mshvstack.vmm.migration import Migration
from mshvstack.vmm.mmio import MmioAccess, MmioEmulator, MmioError, MmioUnsupported
from mshvstack.vmm.netconfig import open_backend
from mshvstack.vmm.stats import ExitStats

log = logging.getLogger(__name__)
HOUSEKEEPING_PERIOD = 5.0

I8042_BASE, I8042_SIZE = 0x60, 5
CMOS_BASE, CMOS_SIZE = 0x70, 2
DEBUG_EXIT_PORT = 0xF4
SCRATCH_MMIO = 0xD0000000
RFLAGS_IF = 1 << 9
DEMO_STACK = 0x80000
STRING_BATCH = 4096
KVP_KEY_CHARS = int(lib.KVP_MAX_KEY_SIZE) // 2 - 1       # UTF-16, with its terminator
KVP_VALUE_CHARS = int(lib.KVP_MAX_VALUE_SIZE) // 2 - 1


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    DEBUG_EXIT = "debug-exit"
    TRIPLE_FAULT = "triple-fault"
    RESET = "reset"
    POWEROFF = "poweroff"
    HALTED = "halted"
    PANIC = "guest-panic"
    ERROR = "error"


class ShutdownCause(enum.Enum):
    """Who ended the run, in QMP's ShutdownCause names (the SHUTDOWN event's reason)."""

    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_UI = "host-ui"
    HOST_SIGNAL = "host-signal"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"

    @property
    def by_guest(self) -> bool:
        return self.value.startswith("guest-")


_CAUSE_OF = {StopKind.DEBUG_EXIT: ShutdownCause.GUEST_SHUTDOWN, StopKind.TRIPLE_FAULT: ShutdownCause.GUEST_RESET,
             StopKind.RESET: ShutdownCause.GUEST_RESET, StopKind.POWEROFF: ShutdownCause.GUEST_SHUTDOWN,
             StopKind.HALTED: ShutdownCause.GUEST_SHUTDOWN, StopKind.PANIC: ShutdownCause.GUEST_PANIC,
             StopKind.ERROR: ShutdownCause.HOST_ERROR}
PANIC_EXIT_CODE = 4


@dataclass(frozen=True)
class StopReason:
    kind: StopKind
    exit_code: int
    detail: str = ""
    cause: ShutdownCause | None = None   # None: the kind's usual cause

    @property
    def shutdown_cause(self) -> ShutdownCause:
        return self.cause or _CAUSE_OF[self.kind]

    def __str__(self) -> str:
        return f"{self.kind.value} (exit code {self.exit_code}){': ' + self.detail if self.detail else ''}"


Listener = Callable[[str, dict[str, Any]], None]


class MachineError(MshvError):
    """The machine cannot be built or run."""


class Machine:
    def __init__(self, config: MachineConfig, console: Callable[[bytes], None] = lambda b: None,
                 incoming: StreamReader | None = None) -> None:
        """``incoming``: a snapshot stream after its configuration (machinestate.read_config):
        the machine is restored from it instead of booted."""
        self.config = config.validate(boot_files=incoming is None)
        self._incoming = incoming
        self._parked: set[int] = set()   # VPs whose threads wait out a pause (out of their runs)
        self.migration = Migration(self)
        self.console = console
        self.state = RunState.CREATED
        self.stats = ExitStats()
        self.started_at: float | None = None
        self.reason: StopReason | None = None
        self._state_changed = threading.Condition(threading.Lock())   # state changes (a leaf: nothing is taken under it)
        self._threads: list[threading.Thread] = []
        self._vp_threads: list[threading.Thread] = []
        self._halted: set[int] = set()
        self._listeners: list[Listener] = []
        # Pause/resume/reset/close/status/housekeeping never see a half-built machine.  First in the order
        # (then the VMBus server's lock); not reentrant: only the public entry points take it.
        self._lifecycle = threading.Lock()
        self._resetting = False
        self.crash: GuestCrash | None = None
        self.engine_time: dict[str, float] = {}   # the simulator's engine: where its time went (sim backend only)
        self._nic_macs = [spec.mac_address() for spec in config.nets]   # chosen once: a reset keeps them
        self.mshv = Mshv.open(config.backend, config.profile)
        try:
            self._build()
        except BaseException:
            self._teardown()   # whatever was built: threads, fds, disk images
            self.mshv.close()
            raise

    # ---- construction
    def _build(self) -> None:
        config = self.config
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.partition = self.mshv.create_partition(PartitionConfig(lapic=True))
        self.partition.initialize()
        # Guest crash reports (HV_X64_MSR_CRASH_CTL writes) come to the VMM; the parameters stay in the hypervisor.
        self.partition.install_intercept(lib.HV_INTERCEPT_TYPE_X64_MSR_INDEX, lib.HV_INTERCEPT_ACCESS_MASK_WRITE, MSR_CRASH_CTL)
        self.partition.map_memory(0, config.memory)
        log.info("partition created on the %s backend; %d MiB of RAM mapped at GPA 0", self.mshv.backend_name, config.memory >> 20)
        self.ioapic = IoApic(self.partition)
        self.mmio.register(IOAPIC_BASE, IOAPIC_SIZE, self.ioapic, "I/O APIC")
        self.uart = Uart16550(self.console, functools.partial(self.ioapic.pulse, acpi.COM1_IRQ))
        self.pio.register(acpi.COM1_PORT, acpi.COM1_PORTS, self.uart, "16550 UART (COM1)")
        self.pio.register(I8042_BASE, I8042_SIZE, I8042(lambda: self.stop(StopReason(StopKind.RESET, 0, "guest requested reset"))), "i8042")
        self.cmos = CmosRtc(memory_mb=config.memory >> 20)
        self.pio.register(CMOS_BASE, CMOS_SIZE, self.cmos, "CMOS/RTC")
        self.pio.register(DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit), "debug exit")
        sleep = AcpiSleepControl(lambda: self.stop(StopReason(StopKind.POWEROFF, 0, "guest powered off (ACPI S5)")),
                                 acpi.SLEEP_TYPE_S5, acpi.SLP_EN, acpi.SLP_TYP_SHIFT)
        self.pio.register(acpi.SLEEP_CONTROL_PORT, 2, sleep, "ACPI sleep control")
        if config.test_devices or config.demo == "iotest":
            self.scratch = Scratch()
            self.mmio.register(SCRATCH_MMIO, 0x1000, self.scratch, "scratch")
        self.vmbus: VmbusServer | None = None
        self.synic: SynicHost | None = None
        if config.vmbus:
            self._build_vmbus()
        boot = self._load() if self._incoming is None else None
        for bus in (self.pio, self.mmio):
            for base, length, name in bus.devices():
                log.info("%s device %s at %#x (%d bytes)", bus.name, name, base, length)
        self.vps: list[Vp] = []
        for index in range(config.vcpus):
            vp = self.partition.create_vp(index)
            self.vps.append(vp)
        if self._incoming is not None:
            machinestate.restore_into(self, self._incoming)
        else:
            assert boot is not None
            # Keep the hypervisor's reset APIC base: the loaders leave it 0, which disables the LAPIC.
            boot.sregs.apic_base = self.vps[0].sregs.apic_base
            self.vps[0].sregs = boot.sregs
            self.vps[0].regs = boot.regs
            for ap in self.vps[1:]:
                # APs wait for INIT/SIPI from the BSP (startup-suspend).
                ap.set_registers({HvRegister.INTERNAL_ACTIVITY_STATE: 1})
        memory = self.partition.memory
        self.mmio_emulator = MmioEmulator(self.mmio.read, self.mmio.write, None,
                                          lambda gpa, size: int.from_bytes(memory.read(gpa, size), "little"),
                                          lambda gpa, size, value: memory.write(gpa, value.to_bytes(size, "little")))

    def _build_vmbus(self) -> None:
        """The VMBus host: guest hypercalls come to us as intercepts."""
        self.partition.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
        self.synic = SynicHost(self.partition.hv, self.partition.memory, lambda index: self.vps[index])
        self.heartbeat, self.shutdown_ic, self.timesync, self.kvp = Heartbeat(), Shutdown(), TimeSync(), Kvp()
        self.disks: list[DiskImage] = []
        for i, spec in enumerate(self.config.disks):
            self.disks.append(DiskImage(spec.path, spec.read_only, serial=f"MSHVSTACK{i:04d}"))
        providers: list[Provider] = [self.heartbeat, self.shutdown_ic, self.timesync, self.kvp]
        providers += [Storage(disk) for disk in self.disks]
        self.nics: list[Netvsc] = []
        for index, (net, mac) in enumerate(zip(self.config.nets, self._nic_macs)):
            self.nics.append(Netvsc(open_backend(net), mac, net.id or f"net{index}"))
        providers += self.nics
        self.vmbus = VmbusServer(self.synic, self.partition.memory, providers, vp_count=self.config.vcpus)
        for nic in self.nics:
            nic.backend.start(functools.partial(self._deliver_frames, self.vmbus, nic))

    @staticmethod
    def _deliver_frames(vmbus: VmbusServer, nic: Netvsc, frames: list[bytes]) -> None:
        """A backend's frames for the guest (on the backend's thread, no lock held)."""
        vmbus.call(nic.receive, frames)

    def _housekeeping(self) -> None:
        """Heartbeats and time samples while the guest runs (what Hyper-V sends periodically)."""
        while self.state is not RunState.STOPPED:
            with self._state_changed:
                self._state_changed.wait_for(lambda: self.state is RunState.STOPPED, HOUSEKEEPING_PERIOD)
            with self._lifecycle:
                if self.state is not RunState.RUNNING or self.vmbus is None:
                    continue
                try:
                    self.vmbus.call(self._beat_and_sample)
                except MshvError as exc:
                    log.warning("VMBus housekeeping: %s", exc)

    def _beat_and_sample(self) -> None:
        """One housekeeping pass (with the VMBus server's lock: see _housekeeping)."""
        if self.heartbeat.ready:
            self.heartbeat.beat()
        if self.timesync.ready:
            self.timesync.sample()

    def _load(self) -> BootState:
        memory = self.partition.memory
        if self.config.demo is not None:
            from mshvstack.vmm.guests import demo_image

            loaded = load_elf(demo_image(self.config.demo), memory, f"demo {self.config.demo}")
            return long_mode(memory, loaded.entry, stack=DEMO_STACK)
        assert self.config.kernel is not None
        image = self.config.kernel.read_bytes()
        name = str(self.config.kernel)
        initrd = self.config.initrd.read_bytes() if self.config.initrd else None
        acpi = write_acpi_tables(memory, self.config.vcpus)
        if image[:4] == b"\x7fELF":
            loaded = load_elf(image, memory, name)
            if loaded.pvh:
                start_info = write_start_info(memory, self.config.cmdline, initrd, acpi.rsdp, loaded.end)
                return protected_mode(memory, loaded.entry, ebx=start_info)
            return long_mode(memory, loaded.entry, stack=DEMO_STACK)
        if is_bzimage(image):
            if self.config.extract_vmlinux:
                loaded = load_elf(extract_vmlinux(image, name, limit=self.config.memory), memory, f"{name} (vmlinux)")
                if not loaded.pvh:
                    raise LoaderError(f"{name}: the extracted vmlinux has no PVH entry note (CONFIG_PVH); boot the bzImage itself")
                start_info = write_start_info(memory, self.config.cmdline, initrd, acpi.rsdp, loaded.end)
                return protected_mode(memory, loaded.entry, ebx=start_info)
            return load_bzimage(image, memory, self.config.cmdline, initrd, name, rsdp=acpi.rsdp)
        raise LoaderError(f"{name}: neither an ELF file nor a Linux bzImage")

    def _translate(self, vp_index: int, gva: int, write: bool) -> int:
        """``gva`` through VP ``vp_index``'s own page tables (each VP may use its own)."""
        flags = lib.HV_TRANSLATE_GVA_VALIDATE_READ | (lib.HV_TRANSLATE_GVA_VALIDATE_WRITE if write else 0)
        result = calls.translate_virtual_address(self.partition.hv, vp_index, gva, flags)
        if not result.ok:
            raise MmioError(f"guest address {gva:#x} does not translate (result {result.result})")
        return result.gpa

    # ---- lifecycle
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, data)`` on every lifecycle event; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit_event(self, event: str, **data: Any) -> None:
        """Tell the listeners (QMP clients) of an event another part of the VMM had."""
        self._emit(event, **data)

    def pause_if_running(self) -> bool:
        """Pause a running machine; True if it was running (a paused one stays so)."""
        with self._lifecycle:
            if self.state is RunState.PAUSED:
                return False
            self._pause_locked()
        self._emit("STOP")
        return True

    def _emit(self, event: str, **data: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("event listener failed on %s", event)

    def start(self) -> None:
        if self.state is not RunState.CREATED:
            raise MachineError(f"cannot start a machine that is {self.state.value}")
        self.started_at = time.monotonic()
        self._set_state(RunState.RUNNING)
        if self.vmbus is not None and self._incoming is not None:
            self.vmbus.resignal()
            if self.timesync.ready:   # the guest's wall clock stood still while it was saved: step it
                self.vmbus.call(self.timesync.sample, sync=True)
        if self.vmbus is not None:
            housekeeping = threading.Thread(target=self._housekeeping, name="vmbus-housekeeping", daemon=True)
            self._threads.append(housekeeping)
            housekeeping.start()
        self._start_vps()

    def _start_vps(self) -> None:
        self._vp_threads = [threading.Thread(target=self._vp_thread, args=(vp,), name=f"vp{vp.index}", daemon=True)
                            for vp in self.vps]
        for thread in self._vp_threads:
            thread.start()

    @property
    def vp_thread_ids(self) -> list[int | None]:
        """The host thread id running each VP (what QMP's query-cpus-fast reports)."""
        return [thread.native_id for thread in self._vp_threads]

    def wait(self, timeout: float | None = None) -> StopReason | None:
        with self._state_changed:
            self._state_changed.wait_for(lambda: self.state is RunState.STOPPED, timeout)
        for thread in [*self._threads, *self._vp_threads]:
            thread.join(timeout=5)
        return self.reason

    def run(self) -> StopReason:
        """Start, wait for the guest to stop, tear down; returns why it stopped."""
        self.start()
        reason = self.wait()
        self.close()
        assert reason is not None
        return reason

    def pause(self) -> None:
        with self._lifecycle:
            self._pause_locked()
        self._emit("STOP")

    def _pause_locked(self) -> None:
        """Freeze the partition and park the VPs (with the lifecycle lock; the caller emits STOP)."""
        if self.state is not RunState.RUNNING:
            raise MachineError(f"cannot pause a machine that is {self.state.value}")
        self.partition.pause()
        self._set_state(RunState.PAUSED)
        for vp in self.vps:
            vp.kick()

    def wait_parked(self, timeout: float = 10.0) -> None:
        """Wait until every VP thread of the paused machine is out of its run."""
        if self.state is not RunState.PAUSED:
            raise MachineError(f"cannot save a machine that is {self.state.value}: pause it first")
        running = {vp.index for vp, thread in zip(self.vps, self._vp_threads) if thread.is_alive()}
        with self._state_changed:
            if not self._state_changed.wait_for(lambda: running <= self._parked, timeout):
                raise MachineError(f"VPs {sorted(running - self._parked)} did not stop for the snapshot")

    def snapshot(self, out: BinaryIO, timeout: float = 10.0) -> int:
        """Save the paused machine into ``out`` (machinestate.py) once every VP is out of
        its run; bytes written."""
        with self._lifecycle:
            self.wait_parked(timeout)
            return machinestate.save(self, out)

    def resume(self) -> None:
        with self._lifecycle:
            if self.state is not RunState.PAUSED:
                raise MachineError(f"cannot resume a machine that is {self.state.value}")
            self.partition.resume()
            self._set_state(RunState.RUNNING)
        self._emit("RESUME")

    def stop(self, reason: StopReason) -> None:
        if self._stopped(reason):
            self._emit_shutdown(reason)

    def _stopped(self, reason: StopReason) -> bool:
        """Stop for ``reason`` unless stopped already (True: it stopped now); the caller emits."""
        with self._state_changed:
            if self.state is RunState.STOPPED:
                return False
            self.reason = reason
        log.info("machine stopped: %s", reason)
        self._set_state(RunState.STOPPED)
        for vp in self.vps:
            vp.kick()
        return True

    def _emit_shutdown(self, reason: StopReason) -> None:
        cause = reason.shutdown_cause
        self._emit("SHUTDOWN", guest=cause.by_guest, reason=cause.value)

    def poweroff(self, cause: ShutdownCause = ShutdownCause.HOST_UI) -> None:
        self.stop(StopReason(StopKind.POWEROFF, 0, "powered off by the host", cause))

    def shutdown(self) -> None:
        """Ask the guest to power off through the shutdown IC; power off if it cannot
        be asked or has not stopped within the timeout."""
        self._emit("POWERDOWN")
        if self.vmbus is None or not self.shutdown_ic.ready:
            self.poweroff()
            return
        self.vmbus.call(self.shutdown_ic.request)

        def fallback() -> None:
            if self.wait(self.config.shutdown_timeout) is None:
                self.poweroff()

        threading.Thread(target=fallback, name="shutdown-fallback", daemon=True).start()

    def reset(self) -> None:
        """A hard reset: the partition, its devices and VPs are built afresh from the
        config and the guest boots again; a paused machine stays paused."""
        if threading.current_thread() in self._vp_threads:
            raise MachineError("a VP cannot reset its own machine")
        with self._lifecycle:
            if self.state not in (RunState.RUNNING, RunState.PAUSED):
                raise MachineError(f"cannot reset a machine that is {self.state.value}")
            self._resetting = True
            with self._state_changed:
                self._state_changed.notify_all()
            for vp in self.vps:
                vp.kick()
            for thread in self._vp_threads:
                thread.join()
            self._resetting = False
            self._halted.clear()
            self.crash = None
            self._teardown()
            failed: StopReason | None = None
            stopped = False
            try:
                self._build()
                if self.state is RunState.PAUSED:
                    self.partition.pause()
            except Exception as exc:  # noqa: BLE001 - the old machine is gone: the run ends here
                failed = StopReason(StopKind.ERROR, 1, f"reset failed: {exc}")
                stopped = self._stopped(failed)
            else:
                log.info("machine reset")
                self._start_vps()
        if failed is not None:   # listeners hear of it without the lifecycle lock
            if stopped:
                self._emit_shutdown(failed)
            return
        self._emit("RESET", guest=False, reason="host-qmp-system-reset")

    def sync_time(self) -> None:
        """Step the guest's clock to the host's (a SYNC sample, as Hyper-V sends after a resume)."""
        if self.vmbus is None or not self.timesync.ready:
            raise MachineError("the guest has not opened the time-sync channel")
        self.vmbus.call(self.timesync.sample, sync=True)

    def feed_console(self, data: bytes) -> None:
        """Input for the guest's serial console (the current UART, across resets)."""
        self.uart.feed(data)

    def close(self) -> None:
        if self.state is not RunState.STOPPED:
            self.poweroff()
        for thread in [*self._threads, *self._vp_threads]:
            thread.join(timeout=5)
        with self._lifecycle:
            self._teardown()
        self.mshv.close()

    def _teardown(self) -> None:
        """Release what _build made (or the part it got to): the I/O APIC's thread,
        the partition, the disk images."""
        engine_time = getattr(self.mshv.backend, "engine_time", None)
        if callable(engine_time) and hasattr(self, "partition") and not self.partition.closed:
            for key, value in engine_time().items():   # before the VPs (and their engines) go
                self.engine_time[key] = self.engine_time.get(key, 0.0) + value
        for nic in getattr(self, "nics", []):
            nic.backend.close()   # first: its thread writes guest memory through the VMBus server
        vmbus: VmbusServer | None = getattr(self, "vmbus", None)
        if vmbus is not None:
            vmbus.close()
        if hasattr(self, "ioapic"):
            self.ioapic.close()
        if hasattr(self, "partition") and not self.partition.closed:
            self.partition.close()
        for disk in getattr(self, "disks", []):
            disk.close()
        self.disks = []

    def _set_state(self, state: RunState) -> None:
        with self._state_changed:
            self.state = state
            self._state_changed.notify_all()

    def status(self) -> dict[str, Any]:
        with self._lifecycle:
            return self._status()

    def _status(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started_at if self.started_at else 0.0
        return {
            "state": self.state.value,
            "backend": self.mshv.backend_name,
            "vcpus": len(self.vps),
            "memory": self.config.memory,
            "uptime": round(uptime, 3),
            "exits": self.stats.total,
            "exit_counts": {k: int(v["count"]) for k, v in self.stats.as_dict().items()},
            "console_bytes": self.uart.bytes_out,
            "reason": str(self.reason) if self.reason else None,
            "crash": {"parameters": list(self.crash.parameters), "message": self.crash.message} if self.crash else None,
            "vmbus": self._vmbus_status(),
        }

    def _vmbus_status(self) -> dict[str, Any] | None:
        if self.vmbus is None:
            return None
        return {**self.vmbus.status(), "heartbeat": self.heartbeat.describe(), "shutdown": self.shutdown_ic.describe(),
                "timesync": self.timesync.describe(), "kvp": self.kvp.describe(),
                "disks": [p.describe() for p in self.vmbus.providers() if isinstance(p, Storage)],
                "nics": self.vmbus.call(lambda: [nic.describe() for nic in self.nics])}

    def set_link(self, name: str, up: bool) -> None:
        """A NIC's link up or down (QMP's set_link): the guest sees its carrier follow."""
        nic = next((n for n in getattr(self, "nics", []) if n.label == name), None)
        if nic is None or self.vmbus is None:
            known = ", ".join(n.label for n in getattr(self, "nics", [])) or "none"
            raise MachineError(f"no NIC {name!r} (NICs: {known})")
        self.vmbus.call(nic.set_link, up)

    def kvp_request(self, operation: str, pool: str = "external", key: str = "", value: str = "",
                    timeout: float = 10.0) -> list[dict[str, Any]]:
        """KVP get/set/delete, or list (enumerate) a pool; waits for the guest's answers."""
        for what, text, limit in (("key", key, KVP_KEY_CHARS), ("value", value, KVP_VALUE_CHARS)):
            if len(text.encode("utf-16-le")) // 2 > limit:
                raise MachineError(f"a KVP {what} holds at most {limit} characters, not {len(text)}")
        if self.vmbus is None or not self.kvp.ready:
            raise MachineError("the guest has not opened the KVP channel (is hv_utils loaded?)")
        if pool not in KVP_POOLS:
            raise MachineError(f"unknown KVP pool {pool!r}: one of {', '.join(KVP_POOLS)}")
        number = KVP_POOLS[pool]

        vmbus = self.vmbus

        def ask(send: Callable[[], None]) -> Any:
            vmbus.call(send)   # then wait without the server's lock: the answer needs it
            return self.kvp.wait_reply(timeout)

        def enumerate_pool() -> list[dict[str, Any]]:
            pairs = []
            for index in range(256):
                reply = ask(functools.partial(self.kvp.enumerate, number, index))
                if reply.status:
                    break
                pairs.append({"key": reply.key, "value": reply.value})
            return pairs

        if operation == "list":
            return enumerate_pool()
        if operation == "get" and number == KVP_POOLS["auto"]:
            # The guest generates its intrinsic items (host name, OS, addresses) only when
            # the pool is enumerated, as Hyper-V reads them; a get finds the key that way.
            found = [pair for pair in enumerate_pool() if pair["key"] == key]
            if not found:
                raise MachineError(f"the guest reports no intrinsic KVP item {key!r}")
            return found
        if operation not in ("get", "set", "delete"):
            raise MachineError(f"unknown KVP operation {operation!r}: get, set, delete or list")
        send = {"get": lambda: self.kvp.get(number, key), "set": lambda: self.kvp.set(number, key, value),
                "delete": lambda: self.kvp.delete(number, key)}[operation]
        reply = ask(send)
        if reply.status:
            raise MachineError(f"the guest answered KVP {operation} {key!r} with status {reply.status:#x}")
        return [{"key": reply.key or key, "value": reply.value}]

    # ---- VP threads and exit dispatch
    def _vp_thread(self, vp: Vp) -> None:
        try:
            while self.state is not RunState.STOPPED and not self._resetting:
                if self.state is RunState.PAUSED:
                    with self._state_changed:
                        self._parked.add(vp.index)
                        self._state_changed.notify_all()
                        self._state_changed.wait_for(lambda: self.state is not RunState.PAUSED or self._resetting, 0.5)
                        self._parked.discard(vp.index)
                    continue
                exit_ = vp.run()
                started = time.perf_counter()
                self._dispatch(vp, exit_)
                self.stats.record(type(exit_).__name__, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with its reason
            self.stop(StopReason(StopKind.ERROR, 1, f"VP {vp.index}: {exc}"))

    def _dispatch(self, vp: Vp, exit_: VpExit) -> None:
        if isinstance(exit_, IoPortIntercept):
            self._port_io(vp, exit_)
        elif isinstance(exit_, MemoryIntercept):
            bits = 64 if exit_.header.efer_lma and exit_.header.cs.long_mode else 32 if exit_.header.cr0_pe else 16
            try:
                self.mmio_emulator.emulate(vp, MmioAccess(exit_.gpa, exit_.header.rip, exit_.instruction_bytes, bits),
                                           functools.partial(self._translate, vp.index))
            except MmioUnsupported as exc:
                log.warning("VP %d: %s: the guest gets #UD", vp.index, exc)
                vp.inject_exception(ExceptionVector.UD)
        elif isinstance(exit_, Halt):
            self._halt(vp, exit_)
        elif isinstance(exit_, CpuidIntercept):
            vp.set_registers({HvRegister.RAX: exit_.default_result_rax, HvRegister.RBX: exit_.default_result_rbx,
                              HvRegister.RCX: exit_.default_result_rcx, HvRegister.RDX: exit_.default_result_rdx,
                              HvRegister.RIP: exit_.header.next_rip})
        elif isinstance(exit_, MsrIntercept):
            if exit_.msr_number == MSR_CRASH_CTL and exit_.is_write:
                self._guest_crash_report(vp, exit_.value)
            values = {HvRegister.RIP: exit_.header.next_rip}
            if not exit_.is_write:
                values.update({HvRegister.RAX: 0, HvRegister.RDX: 0})
            vp.set_registers(values)
        elif isinstance(exit_, HypercallIntercept):
            if self.synic is not None and self.vmbus is not None:
                self.synic.handle_hypercall(vp, exit_)   # the port's owner takes its lock
            else:
                vp.set_registers({**exit_.result_registers(int(lib.HV_STATUS_INVALID_CONNECTION_ID)),
                                  HvRegister.RIP: exit_.header.next_rip})
        elif isinstance(exit_, SintDeliverable):
            if self.synic is not None and self.vmbus is not None:
                self.synic.on_sint_deliverable(vp, exit_)
        elif isinstance(exit_, UnrecoverableException):
            self.stop(StopReason(StopKind.TRIPLE_FAULT, 3, f"VP {vp.index} triple-faulted at RIP {exit_.header.rip:#x}"))
        elif isinstance(exit_, Interrupted):
            pass
        elif isinstance(exit_, ExceptionIntercept):
            self.stop(StopReason(StopKind.ERROR, 1, f"unexpected exception {exit_.exception_vector} at {exit_.header.rip:#x}"))
        elif isinstance(exit_, UnknownExit):
            self.stop(StopReason(StopKind.ERROR, 1, f"unhandled message type {exit_.message_type_raw:#x}"))

    def _port_io(self, vp: Vp, io: IoPortIntercept) -> None:
        size = io.access_size
        if io.string_op:
            self._string_io(vp, io)
            return
        if io.is_write:
            self.pio.write(io.port_number, size, io.data)
            vp.set_registers({HvRegister.RIP: io.header.next_rip})
        else:
            value = self.pio.read(io.port_number, size)
            mask = (1 << (8 * size)) - 1
            rax = value if size == 4 else (io.rax & ~mask) | value  # 32-bit IN zero-extends
            vp.set_registers({HvRegister.RAX: rax, HvRegister.RIP: io.header.next_rip})
        if self.state is RunState.STOPPED:
            vp.kick()

    def _string_io(self, vp: Vp, io: IoPortIntercept) -> None:
        """INS/OUTS (REP too): move data between guest memory and the port."""
        size = io.access_size
        count = io.rcx if io.rep_prefix else 1
        count = min(count, STRING_BATCH)  # bounded per exit; the instruction re-runs for the rest
        (rflags,) = vp.get_registers([HvRegister.RFLAGS])
        step = -size if rflags & (1 << 10) else size
        memory = self.partition.memory
        pointer = io.rsi if io.is_write else io.rdi
        for i in range(count):
            gpa = self._translate(vp.index, pointer + i * step, not io.is_write)
            if io.is_write:
                self.pio.write(io.port_number, size, int.from_bytes(memory.read(gpa, size), "little"))
            else:
                memory.write(gpa, self.pio.read(io.port_number, size).to_bytes(size, "little"))
        values = {HvRegister.RSI if io.is_write else HvRegister.RDI: (pointer + count * step) & ((1 << 64) - 1)}
        remaining = (io.rcx - count) if io.rep_prefix else 0
        if io.rep_prefix:
            values[HvRegister.RCX] = remaining
        if remaining == 0:
            values[HvRegister.RIP] = io.header.next_rip
        vp.set_registers(values)

    def _halt(self, vp: Vp, halt: Halt) -> None:
        if halt.header.rflags & RFLAGS_IF:
            return  # interrupts can still wake it: run again
        self._halted.add(vp.index)
        if len(self._halted) == len(self.vps):
            self.stop(StopReason(StopKind.HALTED, 0, "every VP halted with interrupts disabled"))
        else:
            with self._state_changed:
                self._state_changed.wait_for(lambda: self.state is RunState.STOPPED or self._resetting)

    def _guest_crash_report(self, vp: Vp, control: int) -> None:
        """The guest wrote CRASH_CTL: with NOTIFY set it has crashed; stop with what it reported."""
        report = read_report(vp, self.partition.memory, control)
        if report is None:
            return
        self.crash = report
        log.error("VP %d: %s", vp.index, report)
        if report.message:
            log.info("the guest's crash message:\n%s", report.message)
        self._emit("GUEST_PANICKED", action="poweroff", info=report.qmp_info)
        self.stop(StopReason(StopKind.PANIC, PANIC_EXIT_CODE, str(report)))

    def _debug_exit(self, value: int) -> None:
        self.stop(StopReason(StopKind.DEBUG_EXIT, value & 0xFF, "guest wrote to the debug-exit port"))
