"""Mshv: the /dev/mshv device (real or simulated) and partition creation."""

from __future__ import annotations

from typing import Literal

from mshvstack.abi import ffi, lib
from mshvstack.abi.profiles import AbiProfile
from mshvstack.abi.profiles import profile as lookup_profile
from mshvstack.backend.base import Backend
from mshvstack.backend.handle import FdHandle, FdOwner
from mshvstack.backend.host import HostBackend
from mshvstack.errors import DeviceUnavailable, MshvError
from mshvstack.hvcall import calls
from mshvstack.hvcall.call import HvTarget
from mshvstack.partition.partition import Partition, PartitionConfig

BackendChoice = Literal["auto", "host", "sim"]


class Mshv(FdOwner):
    """An open /dev/mshv.  Mshv.open() picks the backend; use as a context manager."""

    def __init__(self, backend: Backend, profile: AbiProfile, reason: str) -> None:
        self.backend = backend
        self.profile = profile
        self.reason = reason
        self._handle = FdHandle(backend, backend.open(), "/dev/mshv")
        self._device_target = HvTarget(self._handle, profile, on_device=True)

    @classmethod
    def open(cls, backend: BackendChoice | str | Backend = "auto", profile: str | AbiProfile = "newest") -> Mshv:
        """Open the real device ("host"), the simulator ("sim"), or whichever works ("auto")."""
        abi = lookup_profile(profile) if isinstance(profile, str) else profile
        if not isinstance(backend, str):
            return cls(backend, abi, f"{backend.name} backend supplied by the caller")
        if backend not in ("auto", "host", "sim"):
            raise MshvError(f"unknown backend {backend!r}: choose auto, host or sim")
        if backend in ("auto", "host"):
            host = HostBackend()
            try:
                return cls(host, abi, "/dev/mshv opened")
            except DeviceUnavailable as exc:
                if backend == "host":
                    raise
                reason = f"simulator: {exc.explanation.split(';')[0]}"
        else:
            reason = "simulator requested"
        from mshvstack.backend.sim import SimBackend

        return cls(SimBackend(abi), abi, reason)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def create_partition(self, config: PartitionConfig = PartitionConfig()) -> Partition:
        """MSHV_CREATE_PARTITION (v2 when the config disables CPU/xsave features)."""
        fd = self.fd   # refuses a closed device
        if config.uses_v2 and not self.profile.supports_v2_create():
            raise MshvError(f"disabling processor/xsave features needs mshv_create_partition_v2, "
                            f"which the {self.profile.name} driver does not accept (newer kernels do)")
        if config.uses_v2:
            arg = ffi.new("struct mshv_create_partition_v2 *")
            arg.pt_num_cpu_fbanks = lib.MSHV_NUM_CPU_FEATURES_BANKS
            banks = config.disabled_processor_features or (0, 0)
            arg.pt_cpu_fbanks[0], arg.pt_cpu_fbanks[1] = banks
            arg.pt_disabled_xsave = config.disabled_xsave_features or 0
        else:
            arg = ffi.new("struct mshv_create_partition *")
        arg.pt_flags = config.pt_flags()
        arg.pt_isolation = lib.MSHV_PT_ISOLATION_NONE
        return Partition(self, self.backend.ioctl(fd, lib.MSHV_CREATE_PARTITION, arg), config)

    def root_property(self, code: int) -> int:
        """A property of the root partition (HVCALL_GET_PARTITION_PROPERTY on /dev/mshv; newest kernels)."""
        return calls.get_partition_property(self._device_target, code)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Mshv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
