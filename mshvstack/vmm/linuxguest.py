"""Build a Linux guest from Debian's own packages: kernel, busybox, initramfs.

The packages are fetched with ``apt-get download``, checked against the
SHA256 that ``apt-cache show`` lists for the same version, and cached
outside the checkout (``$XDG_CACHE_HOME/mshvstack/debs``).  The .deb is
unpacked in Python (ar + tar) and the initramfs is written as a newc cpio
archive with an /init of ours.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"


class GuestUnavailable(RuntimeError):
    """The packages cannot be fetched here (no apt, no network, bad checksum)."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mshvstack" / "debs"


def _apt(*args: str) -> str:
    if shutil.which(args[0]) is None:
        raise GuestUnavailable(f"{args[0]} is not installed: boot a kernel of your own instead "
                               "(mshvstack run VMLINUZ --extract-vmlinux --initrd INITRD)")
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise GuestUnavailable(f"{' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return result.stdout


def _field(record: str, name: str) -> str:
    match = re.search(rf"^{name}: (.+)$", record, re.MULTILINE)
    if match is None:
        raise GuestUnavailable(f"apt-cache show has no {name} field")
    return match.group(1).strip()


def resolve_kernel_package() -> str:
    """The versioned kernel package the metapackage currently depends on."""
    for line in _apt("apt-cache", "depends", KERNEL_METAPACKAGE).splitlines():
        match = re.match(r"\s*Depends: (linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestUnavailable(f"{KERNEL_METAPACKAGE} depends on no kernel image")


@dataclass(frozen=True)
class PackageRecord:
    """What apt-cache knows of a package's candidate version."""
    package: str
    version: str
    sha256: str
    filename: str
    size: int


def package_record(package: str) -> PackageRecord:
    record = _apt("apt-cache", "show", "--no-all-versions", package)
    return PackageRecord(package, _field(record, "Version"), _field(record, "SHA256").lower(),
                         _field(record, "Filename").rsplit("/", 1)[-1], int(_field(record, "Size")))


def fetch(package: str, directory: Path | None = None) -> Path:
    """Download ``package`` (candidate version) into the cache; verify its SHA256."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = package_record(package)
    expected = record.sha256
    path = directory / record.filename
    if not path.exists() or _sha256(path) != expected:
        subprocess.run(["apt-get", "download", f"{package}={record.version}"], cwd=directory, capture_output=True, timeout=600)
        candidates = sorted(directory.glob(f"{package}_*.deb"))
        found = [p for p in candidates if _sha256(p) == expected]
        if not found:
            raise GuestUnavailable(f"apt-get download {package}={record.version} gave no file with SHA256 {expected}")
        if found[0] != path:
            found[0].rename(path)
    if _sha256(path) != expected:
        raise GuestUnavailable(f"{path.name}: SHA256 does not match apt-cache show")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def deb_data(path: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise GuestUnavailable(f"{path.name} is not a Debian package")
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".zst"):
                import zstandard  # only some archives use it
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size & 1)
    raise GuestUnavailable(f"{path.name} has no data.tar member")


def extract(archive: tarfile.TarFile, pattern: str) -> dict[str, bytes]:
    """Regular files whose path matches ``pattern`` (a regex), by path."""
    out: dict[str, bytes] = {}
    for member in archive.getmembers():
        if member.isfile() and re.search(pattern, member.name):
            handle = archive.extractfile(member)
            assert handle is not None
            out[member.name.lstrip("./")] = handle.read()
    return out


@dataclass(frozen=True)
class CpioEntry:
    path: str
    data: bytes = b""
    mode: int = 0o100644   # regular file by default; 0o040755 for a directory
    target: str = ""       # symlink target (mode 0o120777)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as initramfs."""
    out = bytearray()

    def record(ino: int, entry: CpioEntry) -> None:
        body = entry.target.encode() if entry.target else entry.data
        name = entry.path.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name), 0)
        out.extend(b"070701" + b"".join(f"{v:08X}".encode() for v in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(body)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        record(ino, entry)
    record(0, CpioEntry("TRAILER!!!", mode=0))
    return bytes(out)


@dataclass(frozen=True)
class LinuxGuest:
    kernel: Path        # the bzImage (vmlinuz) as Debian ships it
    package: Path       # the kernel's .deb (its modules are read from it on demand)
    busybox: bytes = field(repr=False)
    version: str


def debian_guest(directory: Path | None = None) -> LinuxGuest:
    """Debian's current kernel and busybox, unpacked into ``directory`` (the cache)."""
    directory = directory or cache_dir()
    kernel_deb = fetch(resolve_kernel_package(), directory)
    busybox_deb = fetch(BUSYBOX_PACKAGE, directory)
    kernel_dir = directory / kernel_deb.stem   # named by package and version: unpacked once
    unpacked = sorted(kernel_dir.glob("vmlinuz-*"))
    if len(unpacked) != 1:
        with deb_data(kernel_deb) as archive:
            kernels = extract(archive, r"boot/vmlinuz-")
        if len(kernels) != 1:
            raise GuestUnavailable(f"{kernel_deb.name}: expected one vmlinuz, found {len(kernels)}")
        (name, image), = kernels.items()
        kernel_dir.mkdir(exist_ok=True)
        partial = kernel_dir / f".{Path(name).name}.partial"
        partial.write_bytes(image)
        partial.rename(kernel_dir / Path(name).name)   # atomic: a cut-short unpack leaves no vmlinuz
        unpacked = [kernel_dir / Path(name).name]
    kernel = unpacked[0]
    with deb_data(busybox_deb) as archive:
        busybox = extract(archive, r"bin/busybox$")
    if not busybox:
        raise GuestUnavailable(f"{busybox_deb.name} has no bin/busybox")
    return LinuxGuest(kernel, kernel_deb, next(iter(busybox.values())), kernel.name.removeprefix("vmlinuz-"))


def _modinfo(image: bytes, key: str) -> list[str]:
    """Values of ``key`` in a module's .modinfo strings (``key=value\\0``)."""
    return [m.decode() for m in re.findall(rb"(?:^|\0)" + key.encode() + rb"=([^\0]*)", image)]


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def _module_index(guest: LinuxGuest) -> Path:
    """Unpack every module of the kernel package once, with an index of their .modinfo.

    The package's data.tar.xz takes half a minute to decompress, so the unpacked
    tree is cached beside the kernel; ``index.json`` is written last and marks
    the tree complete.
    """
    directory = guest.kernel.parent / "modules"
    index_path = directory / "index.json"
    if index_path.exists():
        return directory
    directory.mkdir(exist_ok=True)
    index: dict[str, dict[str, list[str]]] = {}
    with deb_data(guest.package) as archive:
        for path, image in extract(archive, r"\.ko$").items():
            name = _module_name(path)
            (directory / f"{name}.ko").write_bytes(image)
            index[name] = {key: _modinfo(image, key) for key in ("depends", "softdep", "alias")}
    partial = directory / ".index.json.partial"
    partial.write_text(json.dumps(index))
    partial.rename(index_path)
    return directory


def kernel_modules(guest: LinuxGuest, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """``wanted`` and everything their .modinfo depends on, in load order.

    ``depends=`` names are followed exactly; a ``softdep=pre:`` name is looked up
    as a module name or as an alias, preferring the portable ``*_generic`` one.
    """
    directory = _module_index(guest)
    index: dict[str, dict[str, list[str]]] = json.loads((directory / "index.json").read_text())
    order: list[str] = []

    def resolve(name: str) -> str | None:
        name = name.replace("-", "_")
        if name in index:
            return name
        candidates = sorted(m for m, info in index.items() if name in info["alias"])
        generic = [m for m in candidates if m.endswith("_generic")]
        return next(iter(generic or candidates), None)

    def place(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise GuestUnavailable(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        hard = [d for deps in index[name]["depends"] for d in deps.split(",") if d]
        soft = [d for dep in index[name]["softdep"] for d in re.sub(r"post:.*", "", dep).replace("pre:", " ").split()]
        for dependency in hard + soft:
            found = resolve(dependency)
            if found is None and dependency in hard:
                raise GuestUnavailable(f"{name} depends on {dependency}, which {guest.package.name} does not ship")
            if found is not None:
                place(found, chain + (name,))
        order.append(name)

    for name in wanted:
        found = resolve(name)
        if found is None:
            raise GuestUnavailable(f"{guest.package.name} ships no module {name}")
        place(found, ())
    return [(name, (directory / f"{name}.ko").read_bytes()) for name in order]


# The start of every /init built here: busybox's applets, then proc, sysfs and devtmpfs.
INIT_PROLOGUE = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""
# Loads what module_files() put into the initramfs, in dependency order.
LOAD_MODULES = 'for module in $(cat /modules.order); do insmod /lib/modules/$module.ko || echo "MARK insmod_failed $module"; done\n'


def module_files(modules: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Initramfs files for kernel_modules()' answer: the images and their load order."""
    files = {f"lib/modules/{name}.ko": image for name, image in modules}
    files["modules.order"] = "\n".join(name for name, _ in modules).encode() + b"\n"
    return files


def busybox_initramfs(busybox: bytes, init: str, files: dict[str, bytes] | None = None) -> bytes:
    """An initramfs with busybox as /bin/sh and friends, ``init`` as /init."""
    entries = [CpioEntry(d, mode=0o040755) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "lib", "mnt")]
    entries.append(CpioEntry("bin/busybox", busybox, 0o100755))
    entries.append(CpioEntry("bin/sh", mode=0o120777, target="busybox"))
    entries.append(CpioEntry("init", init.encode(), 0o100755))
    made: set[str] = {e.path for e in entries}
    for path, data in (files or {}).items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            directory = "/".join(parts[:i])
            if directory not in made:
                entries.append(CpioEntry(directory, mode=0o040755))
                made.add(directory)
        entries.append(CpioEntry(path, data, 0o100755 if data.startswith((b"#!", b"\x7fELF")) else 0o100644))
    return newc_archive(entries)


def _members(archive: tarfile.TarFile) -> dict[str, bytes]:
    """Every regular file of a package by path, and every symlink by its own path
    with its target's bytes (followed inside the package)."""
    members = {m.name.lstrip("./"): m for m in archive.getmembers()}

    def resolve(path: str, hops: int = 0) -> tarfile.TarInfo | None:
        member = members.get(path)
        if member is None or not member.issym() or hops > 8:
            return member
        link = member.linkname
        return resolve(link.lstrip("/") if link.startswith("/") else str(Path(path).parent / link), hops + 1)

    out: dict[str, bytes] = {}
    for path in members:
        member = resolve(path)
        if member is not None and member.isfile():
            handle = archive.extractfile(member)
            assert handle is not None
            out[path] = handle.read()
    return out


def _elf_needs(image: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP path, DT_NEEDED names) of an ELF executable or library."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(image))
    interpreter = None
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_INTERP":
            interpreter = segment.get_interp_name()
    needed = [tag.needed for section in elf.iter_sections() if isinstance(section, DynamicSection)
              for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
    return interpreter, needed


LIBRARY_DIRECTORIES = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib")


def debian_program(package: str, path: str, library_packages: Iterable[str] = ("libc6",),
                   directory: Path | None = None) -> dict[str, bytes]:
    """``path`` from ``package`` with its ELF interpreter and shared libraries, as initramfs files.

    Libraries are looked up in ``library_packages`` (fetched and checked like
    every package) under the multiarch directories the dynamic loader searches.
    """
    with deb_data(fetch(package, directory)) as archive:
        program = _members(archive).get(path.lstrip("/"))
    if program is None:
        raise GuestUnavailable(f"{package} ships no {path}")
    libraries: dict[str, bytes] = {}
    for library_package in library_packages:
        with deb_data(fetch(library_package, directory)) as archive:
            libraries.update(_members(archive))
    files = {path.lstrip("/"): program}
    pending = [program]
    while pending:
        interpreter, needed = _elf_needs(pending.pop())
        wanted = [interpreter.lstrip("/")] if interpreter else []
        for name in needed:
            found = next((f"{d}/{name}" for d in LIBRARY_DIRECTORIES if f"{d}/{name}" in libraries), None)
            if found is None:
                raise GuestUnavailable(f"{path} needs {name}, which {', '.join(library_packages)} do not ship")
            wanted.append(found)
        for library in wanted:
            if library not in files:
                if library not in libraries:
                    raise GuestUnavailable(f"{path} needs {library}, which {', '.join(library_packages)} do not ship")
                files[library] = libraries[library]
                pending.append(libraries[library])
    return files
