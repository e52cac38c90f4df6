"""Hypercalls over MSHV_ROOT_HVCALL: codes, errors, one issuing function and typed wrappers."""

from mshvstack.hvcall import calls
from mshvstack.hvcall.call import HvTarget, hvcall, hvcall_rep, hvcall_rep_indexed
from mshvstack.hvcall.codes import HvCall, HvMessageType, HvRegister, HvStatus, InterceptAccess, InterceptType, InterruptType, PartitionProperty
from mshvstack.hvcall.errors import HvCallNotAllowed, HvError

__all__ = [
    "calls", "HvTarget", "hvcall", "hvcall_rep", "hvcall_rep_indexed", "HvCall", "HvMessageType", "HvRegister",
    "HvStatus", "InterceptAccess", "InterceptType", "InterruptType", "PartitionProperty", "HvCallNotAllowed", "HvError",
]
