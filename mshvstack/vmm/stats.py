"""Exit statistics: counts and handling time per exit type."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class ExitStat:
    count: int = 0
    seconds: float = 0.0


@dataclass
class ExitStats:
    by_type: dict[str, ExitStat] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)   # every VP thread records: a leaf

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            stat = self.by_type.setdefault(kind, ExitStat())
            stat.count += 1
            stat.seconds += seconds

    @property
    def total(self) -> int:
        with self._lock:
            return sum(s.count for s in self.by_type.values())

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"count": s.count, "seconds": s.seconds, "us_per_exit": 1e6 * s.seconds / s.count if s.count else 0.0}
                    for k, s in sorted(self.by_type.items(), key=lambda kv: -kv[1].count)}


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
