"""Machine: a partition, its memory and VPs (one thread each), and a lifecycle,
composed of parts with one job each: the platform's devices (platform.py),
the VMBus host (vmbushost.py), the exit handler (vpexits.py), the migration
(migration.py) and the saved state (machinestate.py).

    created → running ⇄ paused → stopped      (reset: rebuilt, same state)

A guest triple fault, reset request, power-off, panic report or debug-exit
write ends the run with a reason and exit code.  Lifecycle changes are announced to listeners as
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

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from mshvstack.abi import lib
from mshvstack.errors import MshvError
from mshvstack.hvcall import HvRegister
from mshvstack.partition import Halt, Mshv, PartitionConfig, Vp
from mshvstack.snapshot import StreamReader
from mshvstack.vmbus.providers.netvsc import Netvsc
from mshvstack.vmbus.server import VmbusServer
from mshvstack.vmm import machinestate
from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.crash import MSR_CRASH_CTL, GuestCrash, read_report
from mshvstack.vmm.loader import LoaderError
from mshvstack.vmm.loader.acpi import write_acpi_tables
from mshvstack.vmm.loader.bzimage import is_bzimage, load_bzimage
from mshvstack.vmm.loader.elf import load_elf
from mshvstack.vmm.loader.pvh import write_start_info
from mshvstack.vmm.loader.vmlinuxcache import cached_vmlinux
from mshvstack.vmm.loader.x86boot import BootState, long_mode, protected_mode
from mshvstack.vmm.migration import Migration
from mshvstack.vmm.platform import Platform
from mshvstack.vmm.runstate import PANIC_EXIT_CODE, Listener, MachineError, RunState, ShutdownCause, StopKind, StopReason
from mshvstack.vmm.stats import ExitStats
from mshvstack.vmm.vmbushost import VmbusHost
from mshvstack.vmm.vpexits import ExitHandler

__all__ = ["Machine", "MachineError", "RunState", "ShutdownCause", "StopKind", "StopReason"]

log = logging.getLogger(__name__)
HOUSEKEEPING_PERIOD = 5.0
RFLAGS_IF = 1 << 9
DEMO_STACK = 0x80000


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
        self.partition = self.mshv.create_partition(PartitionConfig(lapic=True))
        self.partition.initialize()
        # Guest crash reports (HV_X64_MSR_CRASH_CTL writes) come to the VMM; the parameters stay in the hypervisor.
        self.partition.install_intercept(lib.HV_INTERCEPT_TYPE_X64_MSR_INDEX, lib.HV_INTERCEPT_ACCESS_MASK_WRITE, MSR_CRASH_CTL)
        self.partition.map_memory(0, config.memory)
        log.info("partition created on the %s backend; %d MiB of RAM mapped at GPA 0", self.mshv.backend_name, config.memory >> 20)
        self.platform = Platform(self.partition, config, self.console, self.stop)
        self.vmbus_host = VmbusHost(self.partition, config, lambda index: self.vps[index],
                                    nic_macs=self._nic_macs) if config.vmbus else None
        boot = self._load() if self._incoming is None else None
        self.vps: list[Vp] = [self.partition.create_vp(index) for index in range(config.vcpus)]
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
        self.exits = ExitHandler(self.partition, self.platform.pio, self.platform.mmio,
                                 self.vmbus_host.synic if self.vmbus_host else None, self.stop, self._halt, self._guest_crash_report)

    @property
    def vmbus(self) -> VmbusServer | None:
        """The VMBus server (None: the machine offers no VMBus devices)."""
        return self.vmbus_host.server if self.vmbus_host is not None else None

    @property
    def nics(self) -> list[Netvsc]:
        """The synthetic NICs (one per --net)."""
        return self.vmbus_host.nics if getattr(self, "vmbus_host", None) is not None else []   # type: ignore[union-attr]

    def set_link(self, name: str, up: bool) -> None:
        """A NIC's link up or down (QMP's set_link): the guest sees its carrier follow."""
        if self.vmbus_host is None:
            raise MachineError(f"no NIC {name!r}: the machine offers no VMBus devices")
        self.vmbus_host.set_link(name, up)

    def _housekeeping(self) -> None:
        """Heartbeats and time samples while the guest runs (what Hyper-V sends periodically)."""
        while self.state is not RunState.STOPPED:
            with self._state_changed:
                self._state_changed.wait_for(lambda: self.state is RunState.STOPPED, HOUSEKEEPING_PERIOD)
            with self._lifecycle:
                if self.state is not RunState.RUNNING or self.vmbus_host is None:
                    continue
                try:
                    self.vmbus_host.housekeeping()
                except MshvError as exc:
                    log.warning("VMBus housekeeping: %s", exc)

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
                loaded = load_elf(cached_vmlinux(image, name, limit=self.config.memory), memory, f"{name} (vmlinux)")
                if not loaded.pvh:
                    raise LoaderError(f"{name}: the extracted vmlinux has no PVH entry note (CONFIG_PVH); boot the bzImage itself")
                start_info = write_start_info(memory, self.config.cmdline, initrd, acpi.rsdp, loaded.end)
                return protected_mode(memory, loaded.entry, ebx=start_info)
            return load_bzimage(image, memory, self.config.cmdline, initrd, name, rsdp=acpi.rsdp)
        raise LoaderError(f"{name}: neither an ELF file nor a Linux bzImage")

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
        if self.vmbus_host is not None and self._incoming is not None:
            self.vmbus_host.after_restore()
        if self.vmbus_host is not None:
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
        if self.nics:
            raise MachineError("a machine with a NIC (--net) cannot be saved yet: the NIC's state is not a record")
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
        if self.vmbus_host is None or not self.vmbus_host.request_shutdown():
            self.poweroff()
            return

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
        if self.vmbus_host is None:
            raise MachineError("the machine has no VMBus devices")
        self.vmbus_host.sync_time()

    def feed_console(self, data: bytes) -> None:
        """Input for the guest's serial console (the current UART, across resets)."""
        self.platform.uart.feed(data)

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
        for part in (getattr(self, "vmbus_host", None), getattr(self, "platform", None)):
            if part is not None:
                part.close()
        if hasattr(self, "partition") and not self.partition.closed:
            self.partition.close()

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
            "console_bytes": self.platform.uart.bytes_out,
            "reason": str(self.reason) if self.reason else None,
            "crash": {"parameters": list(self.crash.parameters), "message": self.crash.message} if self.crash else None,
            "vmbus": self.vmbus_host.status() if self.vmbus_host is not None else None,
        }

    def kvp_request(self, operation: str, pool: str = "external", key: str = "", value: str = "",
                    timeout: float = 10.0) -> list[dict[str, Any]]:
        """KVP get/set/delete, or list (enumerate) a pool; waits for the guest's answers."""
        if self.vmbus_host is None:
            raise MachineError("the machine has no VMBus devices")
        return self.vmbus_host.kvp_request(operation, pool, key, value, timeout)

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
                self.exits.handle(vp, exit_)
                self.stats.record(type(exit_).__name__, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with its reason
            self.stop(StopReason(StopKind.ERROR, 1, f"VP {vp.index}: {exc}"))

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
