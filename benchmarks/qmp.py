"""QMP round trips on a running machine's control socket, against a bare
UNIX-socket echo of the same JSON measured in the same run (what the
transport alone costs).

    python benchmarks/qmp.py [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.control import QmpClient
from mshvstack.vmm.machine import Machine
from mshvstack.vmm.qmp import QmpServer

REQUEST = json.dumps({"execute": "query-status", "id": 1}).encode() + b"\n"


def echo_rate(path: Path, seconds: float) -> float:
    """Round trips/s of a server that answers every line with one line (no JSON work)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            while stream.readline():
                stream.write(b'{"return": {"running": true, "status": "running", "singlestep": false}, "id": 1}\r\n')
                stream.flush()

    threading.Thread(target=serve, daemon=True).start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    stream = client.makefile("rwb")
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        stream.write(REQUEST)
        stream.flush()
        json.loads(stream.readline())
        count += 1
    elapsed = time.perf_counter() - start
    client.close()
    listener.close()
    return count / elapsed


def ours_rate(path: Path, seconds: float) -> float:
    with QmpClient(path) as client:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            client.execute("query-status")
            count += 1
        return count / (time.perf_counter() - start)


def qemu_qmp_rate(path: Path, seconds: float) -> float | None:
    try:
        from qemu.qmp import QMPClient
    except ImportError:
        return None

    async def measure() -> float:
        client = QMPClient("bench")
        await client.connect(str(path))
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            await client.execute("query-status")
            count += 1
        rate = count / (time.perf_counter() - start)
        await client.disconnect()
        return rate

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        machine = Machine(MachineConfig(demo="pioloop", backend="sim", memory=32 << 20))
        server = QmpServer(machine, work / "qmp.sock")
        machine.start()   # a guest exiting all the time: the server competes with a busy VP thread
        try:
            baseline = echo_rate(work / "echo.sock", args.seconds)
            ours = ours_rate(work / "qmp.sock", args.seconds)
            theirs = qemu_qmp_rate(work / "qmp.sock", args.seconds)
            busy = machine.state.value == "running"
        finally:
            machine.poweroff()
            server.close()
            machine.close()
    print(f"(the machine's VP was {'busy with exits' if busy else 'stopped'} throughout)")
    print(f"bare UNIX-socket echo (baseline): {baseline:10.0f} round trips/s")
    print(f"query-status, mshvstack ctl client: {ours:8.0f} /s  ({ours / baseline:.2f}x the baseline)")
    if theirs is not None:
        print(f"query-status, qemu.qmp client:      {theirs:8.0f} /s  ({theirs / baseline:.2f}x the baseline)")


if __name__ == "__main__":
    main()
