"""Fault injection: make chosen ioctls or hypercalls fail on purpose.

Tests use it to reach every error path of the layers above:

    sim.faults.fail_ioctl("MSHV_RUN_VP", errno.EINTR, times=1)
    sim.faults.fail_hvcall(lib.HVCALL_GET_VP_REGISTERS, lib.HV_STATUS_ACCESS_DENIED)
    sim.faults.partial_reps(lib.HVCALL_GET_VP_REGISTERS, completed=1)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Rule:
    value: int
    times: int | None  # None: forever


@dataclass
class FaultPlan:
    ioctl_rules: dict[str, _Rule] = field(default_factory=dict)   # read unlocked by every ioctl: empty, none armed
    _hvcall: dict[int, _Rule] = field(default_factory=dict)
    _reps: dict[int, _Rule] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)   # the rules (a test's thread, every ioctl): a leaf

    def fail_ioctl(self, name: str, err: int, times: int | None = None) -> None:
        """Make ioctl ``name`` fail with ``err`` (``times`` times, or always)."""
        with self._lock:
            self.ioctl_rules[name] = _Rule(err, times)

    def fail_hvcall(self, code: int, status: int, times: int | None = None) -> None:
        """Make hypercall ``code`` return HV_STATUS ``status``."""
        with self._lock:
            self._hvcall[code] = _Rule(status, times)

    def partial_reps(self, code: int, completed: int, times: int | None = 1) -> None:
        """Make a rep hypercall stop after ``completed`` reps (status TIME_OUT-like)."""
        with self._lock:
            self._reps[code] = _Rule(completed, times)

    def clear(self) -> None:
        with self._lock:
            self.ioctl_rules.clear()
            self._hvcall.clear()
            self._reps.clear()

    @staticmethod
    def _take(rules: dict[Any, _Rule], key: object) -> int | None:
        rule = rules.get(key)
        if rule is None:
            return None
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                del rules[key]
        return int(rule.value)

    def ioctl_errno(self, name: str) -> int | None:
        return self._armed(self.ioctl_rules, name)

    def hvcall_status(self, code: int) -> int | None:
        return self._armed(self._hvcall, code)

    def rep_limit(self, code: int) -> int | None:
        return self._armed(self._reps, code)

    def _armed(self, rules: dict[Any, _Rule], key: object) -> int | None:
        if not rules:   # nothing armed (the common case, on every ioctl and hypercall): no lock
            return None
        with self._lock:
            return self._take(rules, key)
