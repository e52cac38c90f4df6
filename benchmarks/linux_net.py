"""TCP throughput through user-mode networking: hv_netvsc on the simulator (our netvsp
over libslirp) against virtio-net on QEMU TCG with ``-nic user`` (also libslirp).

Both boot Debian's kernel with the same initramfs, which loads the Hyper-V
network stack and virtio-net, leases an address by DHCP, then moves
``MIB`` MiB each way over one TCP connection to a server this script runs
on the host's loopback (the guest reaches it as 10.0.2.2): host→guest with
``nc 10.0.2.2 PORT >/dev/null``, guest→host with ``dd | nc``.  Each transfer
is timed by the guest's clock around it (/proc/uptime), the same way in both
VMs; the host's own clock for the guest→host one is printed beside it.

    python benchmarks/linux_net.py [MIB]
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mshvstack.vmm.linuxguest import (
    INIT_PROLOGUE,
    LOAD_MODULES,
    GuestUnavailable,
    busybox_initramfs,
    debian_guest,
    kernel_modules,
    module_files,
)

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 32
MODULES = ("hv_vmbus", "hv_netvsc", "virtio_pci", "virtio_net")
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    bound|renew) ip addr add "$ip/$mask" dev "$interface"; ip route add default via "$router" ;;
esac
"""
INIT = INIT_PROLOGUE + "exec >/dev/kmsg 2>&1\n" + LOAD_MODULES + """
ports=$(sed -n 's/.*bench.ports=\\([0-9,]*\\).*/\\1/p' /proc/cmdline)
source=${ports%%,*}; sink=${ports##*,}
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 10 -T 3 -s /etc/udhcpc.script
nc 10.0.2.2 $source >/dev/null
start=$(cut -d' ' -f1 /proc/uptime)
nc 10.0.2.2 $source >/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
echo "RXTIME $start $end"
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero bs=65536 count=%(blocks)d 2>/dev/null | nc 10.0.2.2 $sink
end=$(cut -d' ' -f1 /proc/uptime)
echo "TXTIME $start $end"
poweroff -f
""" % {"blocks": (MIB << 20) // 65536}


class Servers:
    """A source (sends MIB MiB per connection: a short warm-up first, then the timed one)
    and a sink (reads MIB MiB, timing it) on the host's loopback."""

    def __init__(self) -> None:
        self.source = socket.create_server(("127.0.0.1", 0))
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.sink_seconds: float | None = None
        threading.Thread(target=self._serve_source, daemon=True).start()
        threading.Thread(target=self._serve_sink, daemon=True).start()

    @property
    def ports(self) -> str:
        return f"{self.source.getsockname()[1]},{self.sink.getsockname()[1]}"

    def _serve_source(self) -> None:
        chunk = bytes(1 << 20)
        for size in (1 << 20, MIB << 20):   # warm-up, then the measured transfer
            connection, _ = self.source.accept()
            with connection:
                for _ in range(size >> 20):
                    connection.sendall(chunk)

    def _serve_sink(self) -> None:
        connection, _ = self.sink.accept()
        with connection:
            left, started = MIB << 20, None
            while left > 0:
                data = connection.recv(1 << 20)
                if not data:
                    break
                started = started or time.monotonic()
                left -= len(data)
            if started is not None and left <= 0:
                self.sink_seconds = time.monotonic() - started

    def close(self) -> None:
        self.source.close()
        self.sink.close()


def _run(command: list[str], servers: Servers, console: Path | None = None) -> tuple[float | None, float | None]:
    """(host→guest MB/s, guest→host MB/s) by the guest's clock."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=1800, cwd=tempfile.gettempdir())
    output = console.read_text(errors="replace") if console is not None and console.exists() else result.stdout + result.stderr
    rates: list[float | None] = []
    for label in ("RXTIME", "TXTIME"):
        timed = re.search(label + r" ([\d.]+) ([\d.]+)", output)
        seconds = float(timed.group(2)) - float(timed.group(1)) if timed else 0.0
        rates.append((MIB << 20) / 1e6 / seconds if seconds > 0 else None)
    if None in rates:
        print(output[-2000:])
    if servers.sink_seconds:
        print(f"  guest→host by the host's clock: {(MIB << 20) / 1e6 / servers.sink_seconds:.1f} MB/s")
    return rates[0], rates[1]


def main() -> int:
    try:
        linux = debian_guest()
        modules = kernel_modules(linux, MODULES)
    except GuestUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    work = Path(tempfile.mkdtemp())
    files = module_files(modules)
    files["etc/udhcpc.script"] = UDHCPC_SCRIPT.encode()
    initrd = work / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    print(f"Debian kernel {linux.version}, 1 vCPU, 512 MiB, {MIB} MiB over one TCP connection each way, user-mode networking")
    print("simulator (hv_netvsc over our netvsp, libslirp):")
    servers = Servers()
    sim = _run([sys.executable, "-m", "mshvstack.cli", "run", str(linux.kernel), "--extract-vmlinux", "--initrd", str(initrd),
                "--memory", "512M", "--cmdline", f"console=ttyS0 bench.ports={servers.ports}", "--net", "user",
                "--console", str(work / "sim.txt")], servers, console=work / "sim.txt")
    servers.close()
    qemu_binary = shutil.which("qemu-system-x86_64")
    qemu: tuple[float | None, float | None] = (None, None)
    if qemu_binary:
        print("QEMU TCG (virtio-net, -nic user):")
        servers = Servers()
        qemu = _run([qemu_binary, "-machine", "q35,accel=tcg", "-m", "512", "-nographic", "-no-reboot", "-kernel", str(linux.kernel),
                     "-initrd", str(initrd), "-append", f"console=ttyS0 panic=-1 bench.ports={servers.ports}",
                     "-nic", "user,model=virtio-net-pci"], servers)
        servers.close()

    def cell(value: float | None) -> str:
        return f"{value:10.1f}" if value else f"{'failed':>10}"

    print(f"{'':28} {'host→guest':>10} {'guest→host':>10}   (MB/s)")
    print(f"{'simulator (netvsc)':28} {cell(sim[0])} {cell(sim[1])}")
    if qemu_binary:
        print(f"{'QEMU TCG (virtio-net)':28} {cell(qemu[0])} {cell(qemu[1])}")
        ratios = [f"{s / q:10.2f}" if s and q else f"{'-':>10}" for s, q in zip(sim, qemu)]
        print(f"{'ratio':28} {ratios[0]} {ratios[1]}")
    else:
        print("QEMU column skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
