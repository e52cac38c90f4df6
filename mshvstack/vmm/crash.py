"""Guest crash reports through the Hyper-V crash MSRs.

A guest that panics writes five parameters to HV_X64_MSR_CRASH_P0..P4 and
then CRASH_CTL with CRASH_NOTIFY; with CRASH_NOTIFY_MSG, P3 and P4 are the
GPA and length of a message it left in its memory (Linux: the last page of
its kernel log).  The machine intercepts the CRASH_CTL write and reads the
report here; everything read is the guest's, so bounded and checked.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol

from mshvstack.abi import lib
from mshvstack.errors import MshvError
from mshvstack.hvcall import HvRegister
from mshvstack.partition.memory import GuestMemory

log = logging.getLogger(__name__)
MSR_CRASH_CTL = int(lib.HV_MSR_CRASH_CTL)
MESSAGE_MAX = 4096   # Linux leaves at most one page of kernel log
REGISTERS = [HvRegister.GUEST_CRASH_P0 + i for i in range(5)]
_PRINTK_TIME = re.compile(r"^\[\s*\d+\.\d+\]")


class CrashingVp(Protocol):
    index: int

    def get_registers(self, names: list[int]) -> list[int]: ...


@dataclass(frozen=True)
class GuestCrash:
    """What a guest reported: P0..P4, and the message it left."""

    parameters: tuple[int, int, int, int, int]
    message: str = ""

    @property
    def summary(self) -> str:
        """The panic line of the message (Linux: "Kernel panic - not syncing: ..."), else its last line."""
        lines = [_PRINTK_TIME.sub("", line).strip() for line in self.message.splitlines()]
        lines = [line for line in lines if line]
        panic = [line for line in lines if "Kernel panic" in line]
        return (panic or lines or [""])[-1]

    @property
    def qmp_info(self) -> dict[str, object]:
        """GUEST_PANICKED's ``info``, as QEMU reports a Hyper-V guest's panic."""
        return {"type": "hyper-v", **{f"arg{i + 1}": value for i, value in enumerate(self.parameters)}}

    def __str__(self) -> str:
        words = " ".join(f"P{i}={value:#x}" for i, value in enumerate(self.parameters))
        return f"guest panicked: {self.summary} ({words})" if self.summary else f"guest panicked ({words})"


def read_report(vp: CrashingVp, memory: GuestMemory, control: int) -> GuestCrash | None:
    """The report behind a CRASH_CTL write of ``control`` (None: not a crash notification)."""
    if not control & lib.HV_CRASH_CTL_CRASH_NOTIFY:
        return None
    p0, p1, p2, p3, p4 = vp.get_registers(REGISTERS)
    message = ""
    if control & lib.HV_CRASH_CTL_CRASH_NOTIFY_MSG and 0 < p4:
        try:   # P3 its GPA, P4 its length: the guest's word, so bounded and checked
            message = memory.read(p3, min(p4, MESSAGE_MAX)).split(b"\0", 1)[0].decode("utf-8", "replace")
        except MshvError:
            log.warning("VP %d reported a crash message at unmapped GPA %#x", vp.index, p3)
    return GuestCrash((p0, p1, p2, p3, p4), message)
