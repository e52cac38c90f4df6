"""What this machine offers mshvstack: the data behind ``mshvstack info``."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any

from mshvstack import __version__
from mshvstack.abi import summary
from mshvstack.backend.host import DEVICE_PATH, HostBackend
from mshvstack.errors import MshvError


def _probe_host() -> dict[str, Any]:
    backend = HostBackend()
    try:
        fd = backend.open()
    except MshvError as exc:
        return {"usable": False, "reason": str(exc)}
    backend.close(fd)
    return {"usable": True, "reason": f"{DEVICE_PATH} opens"}


def _probe_sim() -> dict[str, Any]:
    try:
        importlib.import_module("mshvstack.backend.sim")
    except ImportError as exc:
        return {"usable": False, "reason": f"simulator unavailable: {exc}"}
    return {"usable": True, "reason": "embedded simulator (Unicorn engine)"}


def gather() -> dict[str, Any]:
    """A JSON-ready description of the host, the binding and the backends."""
    return {
        "mshvstack": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "devices": {
            "/dev/mshv": {"exists": os.path.exists(DEVICE_PATH)},
            "/dev/kvm": {"exists": os.path.exists("/dev/kvm")},
        },
        "binding": summary().as_dict(),
        "backends": {"host": _probe_host(), "sim": _probe_sim()},
    }
