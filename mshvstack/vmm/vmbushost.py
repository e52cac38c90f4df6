"""The machine's VMBus devices: the host's SynIC side, the server, the integration
components (heartbeat, shutdown, time sync, KVP) and one storvsp per disk, with
what the VMM asks of them (a heartbeat pass, a graceful shutdown, a clock
step, KVP requests, status)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from mshvstack.abi import lib
from mshvstack.errors import MshvError
from mshvstack.partition import Partition
from mshvstack.vmbus.providers.base import Provider
from mshvstack.vmbus.providers.heartbeat import Heartbeat
from mshvstack.vmbus.providers.kvp import POOLS as KVP_POOLS
from mshvstack.vmbus.providers.kvp import Kvp
from mshvstack.vmbus.providers.scsi import DiskImage
from mshvstack.vmbus.providers.shutdown import Shutdown
from mshvstack.vmbus.providers.storage import Storage
from mshvstack.vmbus.providers.timesync import TimeSync
from mshvstack.vmbus.server import VmbusServer
from mshvstack.vmbus.synic import SynicHost, VpRegisters
from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.runstate import MachineError

KVP_KEY_CHARS = int(lib.KVP_MAX_KEY_SIZE) // 2 - 1       # UTF-16, with its terminator
KVP_VALUE_CHARS = int(lib.KVP_MAX_VALUE_SIZE) // 2 - 1


class VmbusHostError(MachineError):
    """A request the guest's VMBus devices cannot take now (channel not open, bad input)."""


class VmbusHost:
    """Built with the partition: guest hypercalls come to the VMM as intercepts from now on.
    ``vp``: the partition's VP by index (the SynIC host reads and sets its registers)."""

    def __init__(self, partition: Partition, config: MachineConfig, vp: Callable[[int], VpRegisters]) -> None:
        partition.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
        self.synic = SynicHost(partition.hv, partition.memory, vp)
        self.heartbeat, self.shutdown_ic, self.timesync, self.kvp = Heartbeat(), Shutdown(), TimeSync(), Kvp()
        self.disks: list[DiskImage] = []
        try:
            for i, spec in enumerate(config.disks):
                self.disks.append(DiskImage(spec.path, spec.read_only, serial=f"MSHVSTACK{i:04d}"))
        except MshvError:
            self.close()
            raise
        providers: list[Provider] = [self.heartbeat, self.shutdown_ic, self.timesync, self.kvp]
        providers += [Storage(disk) for disk in self.disks]
        self.server = VmbusServer(self.synic, partition.memory, providers, vp_count=config.vcpus)

    def housekeeping(self) -> None:
        """What Hyper-V sends periodically: a heartbeat and a time sample."""
        self.server.call(self._beat_and_sample)

    def _beat_and_sample(self) -> None:
        if self.heartbeat.ready:
            self.heartbeat.beat()
        if self.timesync.ready:
            self.timesync.sample()

    def after_restore(self) -> None:
        """Signal every channel both ways and step the guest's wall clock, which stood
        still while the machine was saved."""
        self.server.resignal()
        if self.timesync.ready:
            self.sync_time()

    def request_shutdown(self) -> bool:
        """Ask the guest to power off; False when it cannot be asked (channel not open)."""
        if not self.shutdown_ic.ready:
            return False
        self.server.call(self.shutdown_ic.request)
        return True

    def sync_time(self) -> None:
        """Step the guest's clock to the host's (a SYNC sample, as Hyper-V sends after a resume)."""
        if not self.timesync.ready:
            raise VmbusHostError("the guest has not opened the time-sync channel")
        self.server.call(self.timesync.sample, sync=True)

    def kvp_request(self, operation: str, pool: str, key: str, value: str, timeout: float) -> list[dict[str, Any]]:
        """KVP get/set/delete, or list (enumerate) a pool; waits for the guest's answers."""
        for what, text, limit in (("key", key, KVP_KEY_CHARS), ("value", value, KVP_VALUE_CHARS)):
            if len(text.encode("utf-16-le")) // 2 > limit:
                raise VmbusHostError(f"a KVP {what} holds at most {limit} characters, not {len(text)}")
        if not self.kvp.ready:
            raise VmbusHostError("the guest has not opened the KVP channel (is hv_utils loaded?)")
        if pool not in KVP_POOLS:
            raise VmbusHostError(f"unknown KVP pool {pool!r}: one of {', '.join(KVP_POOLS)}")
        number = KVP_POOLS[pool]

        def ask(send: Callable[[], None]) -> Any:
            self.server.call(send)   # then wait without the server's lock: the answer needs it
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
                raise VmbusHostError(f"the guest reports no intrinsic KVP item {key!r}")
            return found
        if operation not in ("get", "set", "delete"):
            raise VmbusHostError(f"unknown KVP operation {operation!r}: get, set, delete or list")
        send = {"get": lambda: self.kvp.get(number, key), "set": lambda: self.kvp.set(number, key, value),
                "delete": lambda: self.kvp.delete(number, key)}[operation]
        reply = ask(send)
        if reply.status:
            raise VmbusHostError(f"the guest answered KVP {operation} {key!r} with status {reply.status:#x}")
        return [{"key": reply.key or key, "value": reply.value}]

    def status(self) -> dict[str, Any]:
        return {**self.server.status(), "heartbeat": self.heartbeat.describe(), "shutdown": self.shutdown_ic.describe(),
                "timesync": self.timesync.describe(), "kvp": self.kvp.describe(),
                "disks": [p.describe() for p in self.server.providers() if isinstance(p, Storage)]}

    def close(self) -> None:
        """Stop the server's worker and close the disk images."""
        server: VmbusServer | None = getattr(self, "server", None)
        if server is not None:
            server.close()
        for disk in self.disks:
            disk.close()
        self.disks = []
