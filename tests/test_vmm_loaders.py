"""Loaders on generated ELF- and bzImage-shaped files, and on corrupt ones."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.partition import Mshv
from mshvstack.vmm.loader import LoaderError
from mshvstack.vmm.loader.bzimage import BOOT_PARAMS_GPA, CMDLINE_GPA, KERNEL_GPA, load_bzimage
from mshvstack.vmm.loader.elf import load_elf
from mshvstack.vmm.loader.x86boot import CR0_PG, EFER_LMA

RAM = 16 << 20


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, pvh_entry: int | None = None, machine: int = 62) -> bytes:
    """A minimal ELF64 executable with PT_LOAD segments (and a Xen PVH note)."""
    phdrs, blobs = [], []
    note = b""
    if pvh_entry is not None:
        desc = struct.pack("<I", pvh_entry)
        note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    count = len(segments) + (1 if note else 0)
    offset = 64 + 56 * count
    for paddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), memsz, 0x1000))
        blobs.append(data)
        offset += len(data)
    if note:
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(note), len(note), 4))
        blobs.append(note)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, count, 64, 0, 0)
    return header + b"".join(phdrs) + b"".join(blobs)


@pytest.fixture
def memory():  # type: ignore[no-untyped-def]
    with Mshv.open("sim") as mshv:
        part = mshv.create_partition()
        part.initialize()
        part.map_memory(0, RAM)
        yield part.memory
        part.close()


def test_elf_segments_and_bss(memory) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([(0x200000, b"\x90" * 16, 0x2000), (0x300000, b"data", 4)], entry=0x200004)
    memory.write(0x200010, b"\xff" * 16)
    loaded = load_elf(image, memory)
    assert (loaded.entry, loaded.pvh) == (0x200004, False)
    assert memory.read(0x200000, 16) == b"\x90" * 16 and memory.read(0x200010, 16) == bytes(16)  # bss zeroed
    assert memory.read(0x300000, 4) == b"data"


def test_elf_pvh_note_selects_the_32_bit_entry(memory) -> None:  # type: ignore[no-untyped-def]
    loaded = load_elf(make_elf([(0x100000, b"\xf4", 1)], entry=0xFFFFFFFF81000000, pvh_entry=0x100000), memory)
    assert loaded.pvh and loaded.entry == 0x100000


@pytest.mark.parametrize("image, message", [
    (b"MZ\x90\x00" + bytes(100), "not an ELF"),
    (make_elf([(0x200000, b"x" * 64, 64)], 0x200000)[:150], "truncated"),
    (make_elf([(RAM - 0x10, b"x" * 64, 64)], RAM - 0x10), "outside guest RAM"),
    (make_elf([(0x200000, b"x", 1)], 0x200000, machine=183), "not x86-64"),
    (make_elf([], 0x200000), "no loadable segments"),
])
def test_corrupt_elves_get_one_clear_line(memory, image: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LoaderError, match=message) as info:
        load_elf(image, memory, "vmlinux")
    assert "\n" not in str(info.value) and str(info.value).startswith("vmlinux")


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(0, 400))
def test_fuzzed_elves_never_escape_as_tracebacks(data: bytes, cut: int) -> None:
    with Mshv.open("sim") as mshv:
        part = mshv.create_partition()
        part.initialize()
        part.map_memory(0, 1 << 20)
        image = (make_elf([(0x1000, b"abc", 3)], 0x1000) + data)[:cut] if cut % 2 else b"\x7fELF" + data
        try:
            load_elf(image, part.memory)
        except LoaderError:
            pass
        part.close()


def make_bzimage(payload: bytes, version: int = 0x020F, xloadflags: int = 1, init_size: int = 0x10000) -> bytes:
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1                                    # setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200:0x202] = b"\xeb\x66"                    # jump; header ends at 0x202 + 0x66
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x22C, 0x37FFFFFF)    # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)          # cmdline_size
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def test_bzimage_zero_page_cmdline_initrd(memory) -> None:  # type: ignore[no-untyped-def]
    state = load_bzimage(make_bzimage(b"\xf4" * 64), memory, "console=ttyS0 quiet", b"INITRD" * 100)
    assert state.regs.rip == KERNEL_GPA + 0x200 and state.regs.rsi == BOOT_PARAMS_GPA
    assert state.sregs.cr0 & CR0_PG and state.sregs.efer & EFER_LMA
    params = memory.read(BOOT_PARAMS_GPA, 4096)
    assert params[0x210] == 0xFF and struct.unpack_from("<I", params, 0x228)[0] == CMDLINE_GPA
    assert memory.read(CMDLINE_GPA, 20) == b"console=ttyS0 quiet\0"
    image, size = struct.unpack_from("<II", params, 0x218)
    assert size == 600 and memory.read(image, 6) == b"INITRD" and image + size <= RAM
    entries = [struct.unpack_from("<QQI", params, 0x2D0 + 20 * i) for i in range(params[0x1E8])]
    assert (0x100000, RAM - 0x100000, 1) in entries
    assert memory.read(KERNEL_GPA, 4) == b"\xf4" * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 0x0206}, "too old"),
    ({"xloadflags": 0}, "no 64-bit entry"),
    ({"init_size": 64 << 20}, "more memory"),
])
def test_bad_bzimages(memory, kwargs: dict[str, int], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LoaderError, match=message):
        load_bzimage(make_bzimage(b"\x90" * 64, **kwargs), memory, "", None)


def test_initrd_too_large(memory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LoaderError, match="initrd"):
        load_bzimage(make_bzimage(b"\x90" * 64), memory, "", b"x" * (RAM - 0x100000))


def _bzimage_with_payload(payload: bytes) -> bytes:
    image = bytearray(make_bzimage(payload))
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    return bytes(image)


@pytest.mark.parametrize("compress", ["gzip", "xz", "bzip2", "zstd"])
def test_extract_vmlinux_from_compressed_payload(compress: str) -> None:
    import bz2
    import gzip
    import lzma

    zstd = pytest.importorskip("zstandard", reason="zstandard is optional") if compress == "zstd" else None

    from mshvstack.vmm.loader.bzimage import extract_vmlinux

    vmlinux = make_elf([(0x1000000, b"\x90" * 32, 32)], 0xFFFFFFFF81000000, pvh_entry=0x1000000)
    compressors = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress}
    if zstd is not None:
        compressors["zstd"] = zstd.ZstdCompressor(write_content_size=False).compress
    packed = compressors[compress](vmlinux)
    assert extract_vmlinux(_bzimage_with_payload(packed + struct.pack("<I", len(vmlinux)))) == vmlinux
    with pytest.raises(LoaderError, match="corrupt|not an ELF|unsupported"):
        extract_vmlinux(_bzimage_with_payload(packed[:4] + b"\0" * 40))


def test_extract_vmlinux_from_lz4_legacy_payload() -> None:
    """The kernel's lz4 framing: magic, then size-prefixed 8 MiB blocks."""
    block = pytest.importorskip("lz4.block", reason="lz4 is optional (pip install lz4)")
    from mshvstack.vmm.loader.bzimage import extract_vmlinux

    vmlinux = make_elf([(0x1000000, b"\x90" * 64, 64)], 0xFFFFFFFF81000000, pvh_entry=0x1000000)
    compressed = block.compress(vmlinux, store_size=False)
    framed = b"\x02\x21\x4c\x18" + struct.pack("<I", len(compressed)) + compressed
    assert extract_vmlinux(_bzimage_with_payload(framed + struct.pack("<I", len(vmlinux)))) == vmlinux
    garbage = b"\xff" * 16
    with pytest.raises(LoaderError, match="corrupt lz4"):
        extract_vmlinux(_bzimage_with_payload(framed[:4] + struct.pack("<I", len(garbage)) + garbage))


def test_acpi_tables_are_well_formed(memory) -> None:  # type: ignore[no-untyped-def]
    from mshvstack.vmm.loader.acpi import write_acpi_tables

    tables = write_acpi_tables(memory, vcpus=3)
    bios = memory.read(0xE0000, 0x20000)
    rsdp_offset = next(o for o in range(0, len(bios), 16) if bios[o : o + 8] == b"RSD PTR ")
    rsdp = bios[rsdp_offset : rsdp_offset + 36]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt = struct.unpack_from("<Q", rsdp, 24)[0]

    def table(gpa: int) -> bytes:
        length = struct.unpack("<I", memory.read(gpa + 4, 4))[0]
        data = memory.read(gpa, length)
        assert sum(data) % 256 == 0, data[:4]
        return data

    x = table(xsdt)
    pointers = struct.unpack_from(f"<{(len(x) - 36) // 8}Q", x, 36)
    signatures = {table(p)[:4]: p for p in pointers}
    assert set(signatures) == {b"FACP", b"APIC"}
    fadt = table(signatures[b"FACP"])
    dsdt = table(struct.unpack_from("<Q", fadt, 140)[0])
    assert dsdt[:4] == b"DSDT" and b"VMBS" in dsdt and b"VMBUS\0" in dsdt and b"_CRS" in dsdt
    assert struct.unpack_from("<I", fadt, 112)[0] & (1 << 20)  # hardware-reduced
    madt = table(signatures[b"APIC"])
    entries, offset = [], 44
    while offset < len(madt):
        entries.append(madt[offset : offset + madt[offset + 1]])
        offset += madt[offset + 1]
    assert [e[0] for e in entries] == [0, 0, 0, 1]
    assert struct.unpack_from("<II", entries[3], 4) == (0xFEC00000, 0)   # the I/O APIC, from GSI 0
    # COM1: EisaId("PNP0501") and a _CRS with its ports and IRQ 4 (the only way a reduced platform says it)
    assert b"COM1" in dsdt and bytes.fromhex("0c41d00501") in dsdt
    assert bytes.fromhex("4701f803f80301082210007900") in dsdt
    # AML: Name(\_S5_, Package() {5, 0}), then Scope(\_SB) whose package length covers the rest
    assert dsdt[36:48] == bytes.fromhex("085c5f53355f1205020a0500")
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, 0x604)   # sleep control: an I/O byte
    aml = dsdt[48:]
    assert aml[0] == 0x10
    lead = aml[1]
    extra = lead >> 6
    length = (lead & 0x3F) if not extra else (lead & 0x0F) | sum(aml[2 + i] << (4 + 8 * i) for i in range(extra))
    assert 1 + length == len(aml)
    assert tables.dsdt < tables.fadt < tables.madt < tables.xsdt


def test_pvh_start_info(memory) -> None:  # type: ignore[no-untyped-def]
    from mshvstack.vmm.loader.pvh import START_INFO_MAGIC, write_start_info

    gpa = write_start_info(memory, "console=hvc0", b"RAMDISK!", 0xE0000, 0x300000)
    magic, version, _flags, modules, modlist, cmdline, rsdp, memmap, entries, _r = struct.unpack(
        "<IIIIQQQQII", memory.read(gpa, 56))
    assert (magic, version, modules, rsdp) == (START_INFO_MAGIC, 1, 1, 0xE0000)
    assert memory.read(cmdline, 13) == b"console=hvc0\0"
    address, size = struct.unpack("<QQ", memory.read(modlist, 16))
    assert memory.read(address, size) == b"RAMDISK!"
    kinds = [struct.unpack_from("<QQI", memory.read(memmap + 24 * i, 24))[2] for i in range(entries)]
    assert kinds.count(1) == 2


def test_a_decompression_bomb_stops_at_the_guests_memory() -> None:
    """A 1 GiB payload that compresses to a few MiB is refused after the guest's
    memory worth of output, not decompressed whole."""
    import resource
    import zlib

    from mshvstack.vmm.loader.bzimage import extract_vmlinux

    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(64 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(16)) + compressor.flush()   # 1 GiB of zeros
    del zeros
    assert len(bomb) < 8 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LoaderError, match="decompresses to more than the guest's 32 MiB"):
        extract_vmlinux(_bzimage_with_payload(bomb + struct.pack("<I", 0)), "bomb", limit=32 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10   # KiB: well under the 1 GiB


@pytest.mark.parametrize("compress", ["zstd", "xz", "bzip2", "lz4"])
def test_corrupt_payloads_are_one_line(compress: str) -> None:
    from mshvstack.vmm.loader.bzimage import extract_vmlinux

    magic = {"zstd": b"\x28\xb5\x2f\xfd", "xz": b"\xfd7zXZ\x00", "bzip2": b"BZh", "lz4": b"\x02\x21\x4c\x18"}[compress]
    if compress == "zstd":
        pytest.importorskip("zstandard", reason="zstandard is optional")
    if compress == "lz4":
        pytest.importorskip("lz4.block", reason="lz4 is optional")
    garbage = magic + struct.pack("<I", 24) + bytes(range(24)) * 2
    with pytest.raises(LoaderError) as info:
        extract_vmlinux(_bzimage_with_payload(garbage), "vmlinuz")
    assert str(info.value).startswith("vmlinuz: ") and "\n" not in str(info.value)


def test_elf_headers_that_overflow_or_lie_are_one_line(memory) -> None:  # type: ignore[no-untyped-def]
    huge = bytearray(make_elf([(0x200000, b"x" * 16, 16)], 0x200000))
    phoff = struct.unpack_from("<Q", huge, 0x20)[0]
    struct.pack_into("<QQ", huge, phoff + 0x18, (1 << 64) - 0x1000, 0x10)          # p_paddr near the top
    struct.pack_into("<Q", huge, phoff + 0x28, (1 << 63))                         # p_memsz: the sum overflows 64 bits
    with pytest.raises(LoaderError, match="outside guest RAM"):
        load_elf(bytes(huge), memory, "vmlinux")
    short_note = make_elf([(0x200000, b"x", 1)], 0x200000, pvh_entry=0x100000)
    index = short_note.index(b"Xen\x00")
    bad = bytearray(short_note)
    struct.pack_into("<I", bad, index - 8, 2)   # n_descsz (namesz, descsz, type, then the name): 2 bytes
    with pytest.raises(LoaderError) as info:
        load_elf(bytes(bad), memory, "vmlinux")
    assert str(info.value).startswith("vmlinux: ") and "\n" not in str(info.value)


def _gzip_bzimage(vmlinux: bytes) -> bytes:
    import gzip
    return _bzimage_with_payload(gzip.compress(vmlinux) + struct.pack("<I", len(vmlinux)))


def test_the_vmlinux_cache_extracts_each_kernel_once(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mshvstack.vmm.loader import vmlinuxcache
    calls = []
    real = vmlinuxcache.extract_vmlinux
    monkeypatch.setattr(vmlinuxcache, "extract_vmlinux", lambda *a: calls.append(a) or real(*a))
    first, second = make_elf([(0x100000, b"one" * 100, 0)], 0x100000), make_elf([(0x100000, b"two" * 100, 0)], 0x100000)
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(first), root=tmp_path) == first
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(first), root=tmp_path) == first
    assert len(calls) == 1
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(second), root=tmp_path) == second   # another kernel, another entry
    assert len(calls) == 2
    # A damaged entry (one byte flipped) is never booted: the kernel is extracted again and the entry rewritten.
    entry = next(path for path in tmp_path.glob("*.vmlinux") if path.read_bytes().endswith(first[-16:]))
    damaged = bytearray(entry.read_bytes())
    damaged[-1] ^= 1
    entry.write_bytes(bytes(damaged))
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(first), root=tmp_path) == first
    assert len(calls) == 3
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(first), root=tmp_path) == first
    assert len(calls) == 3
    # The limit still holds for a cached kernel (a smaller guest).
    with pytest.raises(LoaderError, match="more than"):
        vmlinuxcache.cached_vmlinux(_gzip_bzimage(first), limit=len(first) - 1, root=tmp_path)


def test_the_vmlinux_cache_keeps_the_most_recent_kernels_and_survives_a_read_only_home(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mshvstack.vmm.loader import vmlinuxcache
    kernels = [make_elf([(0x100000, bytes([n]) * 64, 0)], 0x100000) for n in range(vmlinuxcache.KEEP + 2)]
    for kernel in kernels:
        assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(kernel), root=tmp_path) == kernel
    assert len(list(tmp_path.glob("*.vmlinux"))) == vmlinuxcache.KEEP
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")   # a cache root below a plain file cannot be created
    assert vmlinuxcache.cached_vmlinux(_gzip_bzimage(kernels[0]), root=blocked / "cache") == kernels[0]
