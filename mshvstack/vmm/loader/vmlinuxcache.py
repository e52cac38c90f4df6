"""The vmlinux inside a bzImage, extracted once and kept on disk.

Decompressing Debian's xz payload takes over a second here, on every boot
of the same kernel: about a tenth of booting it to userspace.  The result
is kept under ``$XDG_CACHE_HOME/mshvstack/vmlinux``, named by the bzImage's
SHA-256 and stored behind its own CRC-32 (a tenth of a SHA-256's time over
60 MiB here), so a damaged file is never booted: it is extracted again.  A cache that cannot be written (read-only
home, full disk) only costs the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
import zlib
from pathlib import Path

from mshvstack.vmm.loader.bzimage import extract_vmlinux

_CHECK = struct.Struct("<I")   # the CRC-32 of what follows
KEEP = 4   # kernels kept


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mshvstack" / "vmlinux"


def cached_vmlinux(image: bytes, name: str = "bzImage", limit: int = 1 << 30, root: Path | None = None) -> bytes:
    """extract_vmlinux(image), from the cache when this bzImage was extracted before."""
    path = (root or cache_root()) / f"{hashlib.sha256(image).hexdigest()}.vmlinux"
    data = _read(path)
    if data is not None and len(data) <= limit:
        return data
    data = extract_vmlinux(image, name, limit)
    _write(path, data)
    return data


def _read(path: Path) -> bytes | None:
    """The cached vmlinux if the file is whole (its CRC-32 leads it) and an ELF file."""
    try:
        with path.open("rb") as cached:
            check, data = cached.read(_CHECK.size), cached.read()
        os.utime(path)   # recently used: the last to be pruned
    except OSError:
        return None
    if len(check) < _CHECK.size or data[:4] != b"\x7fELF" or zlib.crc32(data) != _CHECK.unpack(check)[0]:
        return None
    return data


def _write(path: Path, data: bytes) -> None:
    """Atomically (a temporary file renamed), so a reader never sees half a file; then
    only the most recently used KEEP kernels stay (each is tens of MiB)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".vmlinux-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_CHECK.pack(zlib.crc32(data)))
            out.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return
    _prune(path.parent)


def _prune(directory: Path) -> None:
    with contextlib.suppress(OSError):
        kept = sorted(directory.glob("*.vmlinux"), key=lambda entry: entry.stat().st_mtime, reverse=True)
        for stale in kept[KEEP:]:
            stale.unlink()
