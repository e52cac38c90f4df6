"""Demo boot latency and port-I/O exit throughput of the machine.

    python benchmarks/boot.py [--runs N]

Figures: time from `mshvstack run --demo` start to the guest's first console
byte and to its exit (baseline: the same interpreter starting and importing
mshvstack, measured in this run), and exits/s of the machine on a port-I/O
heavy guest (baseline: raw MSHV_RUN_VP round trips on the same backend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.machine import Machine

from exits import sim_exit_rate


def demo_boot() -> tuple[float, float]:
    """(seconds to the first console byte, seconds to exit) of `mshvstack run --demo`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", "--demo", "--backend", "sim"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    return first, time.perf_counter() - start


def interpreter_baseline() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mshvstack.cli"], check=True, cwd="/")
    return time.perf_counter() - start


def machine_exit_rate() -> tuple[float, int]:
    machine = Machine(MachineConfig(demo="pioloop", backend="sim", memory=32 << 20))
    start = time.perf_counter()
    reason = machine.run()
    elapsed = time.perf_counter() - start
    assert reason.exit_code == 0, reason
    return machine.stats.total / elapsed, machine.stats.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("UC_IGNORE_REG_BREAK", "1")
    boots = [demo_boot() for _ in range(args.runs)]
    base = statistics.median(interpreter_baseline() for _ in range(args.runs))
    first = statistics.median(b[0] for b in boots)
    total = statistics.median(b[1] for b in boots)
    print(f"demo boot: first console byte {first * 1000:.0f} ms, exit {total * 1000:.0f} ms "
          f"(interpreter + import baseline {base * 1000:.0f} ms; boot adds {(total - base) * 1000:.0f} ms, ratio {total / base:.2f})")
    rate, exits = machine_exit_rate()
    raw = sim_exit_rate(20000)
    print(f"port-I/O guest: {rate:,.0f} exits/s through the machine ({exits} exits), raw MSHV_RUN_VP loop {raw:,.0f}/s, ratio {rate / raw:.3f}")


if __name__ == "__main__":
    main()
