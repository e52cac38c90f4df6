"""ABI profiles: what a given kernel generation's mshv_root accepts.

Shared by the simulator (which can play the 6.15 driver or the newest one)
and the hypercall layer (which checks the passthrough allowlist before a call
and names the kernel that lacks a hypercall).  mshv_abi.md sections 1-3 list
the differences.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from mshvstack.abi import lib


def _codes(*names: str) -> frozenset[int]:
    return frozenset(int(getattr(lib, n)) for n in names)


_COMMON = (
    "HVCALL_GET_PARTITION_PROPERTY",
    "HVCALL_SET_PARTITION_PROPERTY",
    "HVCALL_INSTALL_INTERCEPT",
    "HVCALL_GET_VP_REGISTERS",
    "HVCALL_SET_VP_REGISTERS",
    "HVCALL_TRANSLATE_VIRTUAL_ADDRESS",
    "HVCALL_CLEAR_VIRTUAL_INTERRUPT",
    "HVCALL_REGISTER_INTERCEPT_RESULT",
    "HVCALL_ASSERT_VIRTUAL_INTERRUPT",
    "HVCALL_SIGNAL_EVENT_DIRECT",
    "HVCALL_POST_MESSAGE_DIRECT",
    "HVCALL_GET_GPA_PAGES_ACCESS_STATES",
    "HVCALL_GET_VP_CPUID_VALUES",
)


@dataclass(frozen=True)
class AbiProfile:
    """One kernel generation's driver behaviour."""

    name: str
    pt_flags_mask: int                  # accepted MSHV_PT_BIT_* flags
    partition_hvcalls: frozenset[int]   # MSHV_ROOT_HVCALL allowlist on partition/VP fds
    device_hvcalls: frozenset[int]      # ... on /dev/mshv (empty: ENOTTY there)
    async_hvcalls: frozenset[int]       # refused on VP fds
    output_copied_on_failure: bool      # 6.15 copied the output page even on failure
    overlap_endpoints_only: bool        # 6.15 looked up the new region's first and last page (frames and
                                        # user addresses); newest checks the frame interval, not addresses
    missing_unmap_errno: int            # unmapping where no region is: ENOENT (newest), EINVAL (6.15)
    resample_checked_first: bool        # 6.15 refused every RESAMPLE irqfd (EINVAL) before the busy check
    deposit_retried: bool               # newest deposits and retries INSUFFICIENT_MEMORY; 6.15 returned EAGAIN

    def allows(self, code: int, on_device: bool) -> bool:
        return code in (self.device_hvcalls if on_device else self.partition_hvcalls)

    def supports_v2_create(self) -> bool:
        return bool(self.pt_flags_mask & (1 << lib.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES))


def first_profile_allowing(code: int, on_device: bool = False) -> AbiProfile | None:
    """The oldest known driver generation that passes ``code`` through."""
    return next((p for p in PROFILES.values() if p.allows(code, on_device)), None)


PROFILE_6_15 = AbiProfile(
    name="6.15",
    pt_flags_mask=(1 << 3) - 1,
    partition_hvcalls=_codes(*_COMMON),
    device_hvcalls=frozenset(),
    async_hvcalls=_codes("HVCALL_SET_PARTITION_PROPERTY"),
    output_copied_on_failure=True,
    overlap_endpoints_only=True,
    missing_unmap_errno=errno.EINVAL,
    resample_checked_first=True,
    deposit_retried=False,
)

PROFILE_NEWEST = AbiProfile(
    name="newest",
    pt_flags_mask=int(lib.MSHV_PT_FLAGS_MASK),
    partition_hvcalls=_codes(*_COMMON, "HVCALL_SCRUB_PARTITION", "HVCALL_GET_PARTITION_PROPERTY_EX"),
    device_hvcalls=_codes("HVCALL_GET_PARTITION_PROPERTY", "HVCALL_GET_PARTITION_PROPERTY_EX"),
    async_hvcalls=_codes("HVCALL_SET_PARTITION_PROPERTY"),
    output_copied_on_failure=False,
    overlap_endpoints_only=False,
    missing_unmap_errno=errno.ENOENT,
    resample_checked_first=False,
    deposit_retried=True,
)

# Downstream (Azure-style) kernels also pass these through; useful with --profile azure.
PROFILE_AZURE = AbiProfile(
    name="azure",
    pt_flags_mask=PROFILE_NEWEST.pt_flags_mask,
    partition_hvcalls=PROFILE_NEWEST.partition_hvcalls | _codes("HVCALL_READ_GPA", "HVCALL_WRITE_GPA"),
    device_hvcalls=PROFILE_NEWEST.device_hvcalls,
    async_hvcalls=PROFILE_NEWEST.async_hvcalls,
    output_copied_on_failure=False,
    overlap_endpoints_only=False,
    missing_unmap_errno=errno.ENOENT,
    resample_checked_first=False,
    deposit_retried=True,
)

PROFILES = {p.name: p for p in (PROFILE_6_15, PROFILE_NEWEST, PROFILE_AZURE)}


def profile(name: str) -> AbiProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown ABI profile {name!r}; choose one of {', '.join(PROFILES)}") from None
