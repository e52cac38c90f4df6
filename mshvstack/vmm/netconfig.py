"""``--net``: one synthetic NIC per option, parsed up front with one-line errors.

    --net user[,hostfwd=tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT ...][,mac=..][,id=..]
    --net tap=IFNAME[,mac=..][,id=..]

The hostfwd syntax is QEMU's ``-nic user,hostfwd=...``; the host address
defaults to 127.0.0.1 (QEMU's default is every address: a forwarded guest
port is then reachable from the network, which a user rarely means), the
guest address to the one DHCP hands out.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from mshvstack.net.backend import NetBackend
from mshvstack.vmm.config import ConfigError

_HOSTFWD = re.compile(r"^(tcp|udp)?:([^:]*):(\d+)-([^:]*):(\d+)$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
HYPERV_OUI = bytes.fromhex("00155d")


@dataclass(frozen=True)
class HostForward:
    udp: bool
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int


@dataclass(frozen=True)
class NetSpec:
    kind: str                    # "user" or "tap"
    ifname: str | None = None
    hostfwd: tuple[HostForward, ...] = ()
    mac: bytes | None = None     # None: 00:15:5d and three random bytes, as Hyper-V hands out
    id: str | None = None

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        kind, _, rest = text.partition(",")
        options = [o for o in rest.split(",") if o] if rest else []
        ifname = None
        if kind.startswith("tap="):
            kind, ifname = "tap", kind[4:]
            if not _IFNAME.match(ifname):
                raise ConfigError(f"--net {text!r}: {ifname!r} is not an interface name (at most 15 of A-Z a-z 0-9 _ . -)")
        elif kind != "user":
            raise ConfigError(f"--net {text!r}: the backend is user or tap=IFNAME (e.g. --net user,hostfwd=tcp::8080-:80)")
        forwards: list[HostForward] = []
        mac: bytes | None = None
        nic_id = None
        for option in options:
            key, eq, value = option.partition("=")
            if not eq:
                raise ConfigError(f"--net {text!r}: {option!r} is not KEY=VALUE")
            if key == "hostfwd" and kind == "user":
                forwards.append(_hostfwd(text, value))
            elif key == "mac":
                if not _MAC.match(value) or int(value[:2], 16) & 1:
                    raise ConfigError(f"--net {text!r}: mac={value} is not a unicast MAC address like 00:15:5d:01:02:03")
                mac = bytes.fromhex(value.replace(":", ""))
            elif key == "id" and re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$", value):
                nic_id = value
            else:
                allowed = "hostfwd, mac or id" if kind == "user" else "mac or id"
                raise ConfigError(f"--net {text!r}: unknown or bad option {option!r} (options: {allowed})")
        return cls(kind, ifname, tuple(forwards), mac, nic_id)

    def mac_address(self) -> bytes:
        return self.mac if self.mac is not None else HYPERV_OUI + os.urandom(3)


def _hostfwd(text: str, value: str) -> HostForward:
    match = _HOSTFWD.match(value)
    if match is None:
        raise ConfigError(f"--net {text!r}: hostfwd={value} is not [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")
    proto, host_addr, host_port, guest_addr, guest_port = match.groups()
    for address in (host_addr, guest_addr):
        if address:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ConfigError(f"--net {text!r}: {address!r} is not an IPv4 address") from None
    ports = int(host_port), int(guest_port)
    if not all(1 <= p <= 65535 for p in ports):
        raise ConfigError(f"--net {text!r}: hostfwd ports must be between 1 and 65535")
    return HostForward(proto == "udp", host_addr or "127.0.0.1", ports[0], guest_addr, ports[1])


def open_backend(spec: NetSpec) -> NetBackend:
    """The backend ``spec`` names, opened (NetBackendError with one clear line if it cannot be)."""
    if spec.kind == "tap":
        from mshvstack.net.tap import TapBackend

        assert spec.ifname is not None
        return TapBackend(spec.ifname)
    from mshvstack.net.slirp import SlirpBackend

    return SlirpBackend(spec.hostfwd)
