"""A VP saved and restored through the public partition API only: the register
hypercalls and MSHV_GET/SET_VP_STATE, as on /dev/mshv itself.

The restore order matters (snapshot_migration.md, 1.2): the CPU mode first
(EFER, control registers, segments), then the rest of the architectural
state, the SynIC registers before their pages, APIC_BASE before the LAPIC
blob, and the partition-wide registers (guest OS id, hypercall page,
reference TSC page) through VP 0 only.  Pending events go back through the
event registers, never as an interrupt bitmap.
"""

from __future__ import annotations

import errno

from mshvstack.abi import lib
from mshvstack.errors import ErrnoError
from mshvstack.partition import Vp, VpStateKind
from mshvstack.snapshot.records import VpRecord


def _names(prefix: str, *names: str) -> tuple[int, ...]:
    return tuple(int(getattr(lib, f"{prefix}{name}")) for name in names)


_X = "HV_X64_REGISTER_"
MODE = _names(_X, "EFER", "CR4", "CR3", "CR0")
SEGMENTS = _names(_X, "GDTR", "IDTR", "ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")
GENERAL = _names(_X, "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", *(f"R{i}" for i in range(8, 16)),
                 "RIP", "RFLAGS", "CR2", "CR8", "DR0", "DR1", "DR2", "DR3", "DR6", "DR7", "XFEM")
MSRS = _names(_X, "PAT", "SYSENTER_CS", "SYSENTER_ESP", "SYSENTER_EIP", "STAR", "LSTAR", "CSTAR", "SFMASK",
              "KERNEL_GS_BASE", "TSC_AUX", "TSC", "APIC_BASE")
SYNIC = (*_names("HV_REGISTER_", "SCONTROL", "SIMP", "SIEFP", "VP_ASSIST_PAGE"),
         *(int(lib.HV_REGISTER_SINT0) + i for i in range(16)))
EVENTS = _names("HV_REGISTER_", "INTERRUPT_STATE", "PENDING_INTERRUPTION", "PENDING_EVENT0")
PARTITION_WIDE = (int(lib.HV_REGISTER_GUEST_OS_ID), int(lib.HV_X64_REGISTER_HYPERCALL), int(lib.HV_REGISTER_REFERENCE_TSC))
# The blobs, in restore order: the LAPIC last (after APIC_BASE, with the SynIC set up).
BLOBS = (VpStateKind.XSAVE, VpStateKind.SYNTHETIC_TIMERS, VpStateKind.SIMP, VpStateKind.SIEFP, VpStateKind.LAPIC)


def registers_of(index: int) -> tuple[int, ...]:
    """The registers saved for a VP, in restore order."""
    return MODE + SEGMENTS + GENERAL + MSRS + SYNIC + EVENTS + (PARTITION_WIDE if index == 0 else ())


def save_vp(vp: Vp) -> VpRecord:
    """The VP's whole state (it must not be running)."""
    names = registers_of(vp.index)
    values = vp.get_registers128(names)
    blobs = {}
    for kind in BLOBS:
        try:
            blobs[int(kind)] = vp.get_state(kind)
        except ErrnoError as exc:
            if exc.errno != errno.EIO:   # EIO: a SynIC page the guest has not enabled
                raise
    return VpRecord(vp.index, dict(zip(names, values)), blobs)


def restore_vp(vp: Vp, record: VpRecord) -> None:
    """Give a VP (of a partition created and initialized as the saved one was) a saved state."""
    vp.set_registers(record.registers)
    for kind in BLOBS:
        blob = record.blobs.get(int(kind))
        if blob is not None:
            vp.set_state(kind, blob)
