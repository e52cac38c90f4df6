"""Linux's own hv_netvsc against our netvsp, over user-mode networking (libslirp).

One boot of Debian's unmodified kernel serves every check, in the order the
guest's /init reaches them: eth0 appears with our MAC and an MTU of 1500,
comes up and leases an address by DHCP; the guest fetches 16 MiB from an
HTTP server this test runs on the host's loopback (through the gateway) and
its sha256 matches; several fetches run at once; eth0 goes down and up and
changes its MTU (Linux closes and reopens the channel with new buffers) and
still fetches intact; the host reads 16 MiB the
guest serves through a forwarded port; the host takes the link down and up
(QMP set_link) and the guest's carrier follows.  Everything asserted about
the guest comes from what it prints itself.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshvstack.net.backend import NetBackendError
from mshvstack.net.slirp import load_library
from mshvstack.vmm.control import QmpClient
from mshvstack.vmm.linuxguest import INIT_PROLOGUE, LOAD_MODULES, busybox_initramfs, kernel_modules, module_files

from linuxvm import LinuxVm, require_debian_guest

MODULES = ("hv_vmbus", "hv_netvsc")
BLOB_BYTES = 16 << 20
SMALL_BYTES = 1 << 20
PARALLEL = 4
GUEST_PORT = 8080
MAC = "00:15:5d:12:34:56"

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        [ -n "$router" ] && ip route add default via "$router" dev "$interface"
        echo "MARK lease $ip $router" ;;
esac
"""

INIT = INIT_PROLOGUE + "exec >/dev/kmsg 2>&1\necho on >/proc/sys/kernel/printk_devkmsg\n" + LOAD_MODULES + """
port=$(sed -n 's/.*mshvtest.port=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
echo "MARK eth0 $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/mtu)"
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 10 -T 3 -s /etc/udhcpc.script || echo "MARK dhcp_failed"
echo "MARK carrier_up $(cat /sys/class/net/eth0/carrier)"
wget -q -O /tmp/blob "http://10.0.2.2:$port/blob" || echo "MARK wget_failed"
echo "MARK fetched $(sha256sum /tmp/blob | cut -d' ' -f1)"
rm -f /tmp/blob
for i in %(parallel)s; do (wget -q -O /tmp/small$i "http://10.0.2.2:$port/small$i" || echo "MARK wget_failed $i") & done
wait
for i in %(parallel)s; do echo "MARK parallel $i $(sha256sum /tmp/small$i | cut -d' ' -f1)"; done
rm -f /tmp/small*
ip link set eth0 down
ip link set eth0 up
echo "MARK downup $(cat /sys/class/net/eth0/operstate)"
ip link set eth0 mtu 1400 || echo "MARK mtu_failed"
echo "MARK mtu_set"
n=0; while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $n -lt 30 ]; do sleep 0.2; n=$((n + 1)); done
echo "MARK carrier_again $n"
wget -q -O /tmp/small0 "http://10.0.2.2:$port/small0" || echo "MARK wget_failed mtu"
echo "MARK mtu $(cat /sys/class/net/eth0/mtu) $(sha256sum /tmp/small0 | cut -d' ' -f1)"
rm -f /tmp/small0
mkdir -p /srv
dd if=/dev/urandom of=/srv/big bs=1M count=%(megabytes)d 2>/dev/null
httpd -p %(guest_port)d -h /srv
echo "MARK serving $(sha256sum /srv/big | cut -d' ' -f1)"
last=""
while true; do
    now="$(cat /sys/class/net/eth0/carrier) $(cat /sys/class/net/eth0/operstate)"
    [ "$now" != "$last" ] && echo "MARK link $now"
    last="$now"
    sleep 0.2
done
""" % {"parallel": " ".join(str(i) for i in range(PARALLEL)), "megabytes": BLOB_BYTES >> 20, "guest_port": GUEST_PORT}


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    linux = require_debian_guest()
    try:
        load_library()
    except NetBackendError as exc:
        pytest.skip(f"libslirp cannot be loaded here: {exc}")
    files = module_files(kernel_modules(linux, MODULES))
    files["etc/udhcpc.script"] = UDHCPC_SCRIPT.encode()
    path = tmp_path_factory.mktemp("linux-net") / "initrd.cpio"
    path.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    return linux.kernel, path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    blobs = {"/blob": os.urandom(BLOB_BYTES)}
    blobs.update({f"/small{i}": os.urandom(SMALL_BYTES) for i in range(PARALLEL)})
    return blobs


@pytest.fixture
def http_server(files: dict[str, bytes]) -> Iterator[int]:
    """An HTTP server on the host's loopback: the guest reaches it as 10.0.2.2."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _fetch(url: str, timeout: float = 300) -> bytes:
    deadline = time.monotonic() + 30
    while True:   # the guest's httpd is listening once it said so; the first connect may still race it
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return bytes(reply.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _link_marks(vm: LinuxVm, state: str, after: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(name == "link" and value.startswith(state) for name, value, _t in vm.marks[after:]):
        assert time.monotonic() < deadline, f"no MARK link {state}: {vm.values('link')}"
        vm.values("link")
        time.sleep(0.2)


@pytest.mark.parametrize("vcpus", [1, 4])
def test_linux_netvsc_over_user_networking(initrd: tuple[Path, Path], http_server: int, files: dict[str, bytes],
                                           tmp_path: Path, vcpus: int) -> None:
    kernel, ramdisk = initrd
    host_port = _free_port()
    vm = LinuxVm(tmp_path, kernel, ramdisk, "--net", f"user,hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_PORT},mac={MAC}",
                 cmdline=f"console=ttyS0 mshvtest.port={http_server}", vcpus=vcpus)
    try:
        address, mtu = vm.wait_for("eth0", timeout=300)[0].split()
        assert (address, mtu) == (MAC, "1500")
        lease = vm.wait_for("lease", timeout=120)[0]
        assert lease == "10.0.2.15 10.0.2.2", lease
        assert vm.wait_for("carrier_up")[0] == "1"
        fetched = vm.wait_for("fetched", timeout=300)[0]
        assert not vm.values("wget_failed")
        assert fetched == hashlib.sha256(files["/blob"]).hexdigest()
        vm.wait_for("serving", timeout=300)
        parallel = dict(value.split() for value in vm.values("parallel"))
        assert parallel == {str(i): hashlib.sha256(files[f"/small{i}"]).hexdigest() for i in range(PARALLEL)}
        mtu, after_change = vm.values("mtu")[0].split()
        assert (mtu, after_change) == ("1400", hashlib.sha256(files["/small0"]).hexdigest()) and not vm.values("mtu_failed")
        served = vm.values("serving")[0]
        body = _fetch(f"http://127.0.0.1:{host_port}/big")
        assert len(body) == BLOB_BYTES and hashlib.sha256(body).hexdigest() == served

        # The host's cable: down, then up; the guest's carrier follows each.
        _link_marks(vm, "1 up", 0)
        with QmpClient(vm.socket) as client:
            nics = client.execute("__org.mshvstack_query-nics")
            assert nics[0]["mac"] == MAC and nics[0]["rx_bytes"] >= BLOB_BYTES and nics[0]["tx_bytes"] >= BLOB_BYTES
            after = len(vm.marks)
            client.execute("set_link", {"name": "net0", "up": False})
            _link_marks(vm, "0", after)
            after = len(vm.marks)
            client.execute("set_link", {"name": "net0", "up": True})
            _link_marks(vm, "1 up", after)
            vmbus = client.execute("__org.mshvstack_query-vmbus")
        channel = next(c for c in vmbus["channels"] if c["device"] == "network")
        assert channel["state"] == "open" and channel["protocol_errors"] == 0, channel
        log = vm.log
        assert "Kernel panic" not in log and "BUG:" not in log and "WARNING:" not in log
        netvsc_lines = [line for line in log.splitlines() if "hv_netvsc" in line]
        print("\n".join(netvsc_lines))
        stats = json.dumps(vmbus["nics"][0])
        print(stats)
    finally:
        vm.kill()
