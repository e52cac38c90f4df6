"""Linux bzImage, 64-bit boot protocol: zero page, e820, command line, initrd."""

from __future__ import annotations

import struct

from mshvstack.partition.memory import GuestMemory
from mshvstack.vmm.loader import LoaderError
from mshvstack.vmm.loader.memmap import memory_map
from mshvstack.vmm.loader.x86boot import BootState, long_mode

BOOT_PARAMS_GPA = 0x7000
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_GPA = 0x100000
STACK_GPA = 0x8FF0
HDRS = 0x53726448  # "HdrS"
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADER_TYPE_UNDEFINED = 0xFF
CAN_USE_HEAP = 0x80


def is_bzimage(image: bytes) -> bool:
    return len(image) >= 0x250 and image[0x1FE:0x200] == b"\x55\xaa" and struct.unpack_from("<I", image, 0x202)[0] == HDRS


def load_bzimage(image: bytes, memory: GuestMemory, cmdline: str, initrd: bytes | None, name: str = "bzImage",
                 rsdp: int = 0) -> BootState:
    """Load the protected-mode kernel at 1 MiB and enter its 64-bit entry point."""
    if not is_bzimage(image):
        raise LoaderError(f"{name}: not a Linux bzImage (no boot signature / HdrS header)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x020C:
        raise LoaderError(f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old (2.12+ needed for the 64-bit entry)")
    xloadflags = struct.unpack_from("<H", image, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"{name}: kernel has no 64-bit entry point (XLF_KERNEL_64 unset)")
    setup_sects = image[0x1F1] or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(image):
        raise LoaderError(f"{name}: truncated (setup claims {setup_sects} sectors)")
    kernel = image[kernel_offset:]
    init_size = struct.unpack_from("<I", image, 0x260)[0]
    if KERNEL_GPA + max(len(kernel), init_size) > memory.size:
        raise LoaderError(f"{name}: needs {max(len(kernel), init_size) >> 20} MiB above 1 MiB; give the machine more memory")
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > min(CMDLINE_MAX, struct.unpack_from("<I", image, 0x238)[0] + 1 or CMDLINE_MAX):
        raise LoaderError(f"--cmdline is {len(encoded)} bytes; this kernel accepts at most {struct.unpack_from('<I', image, 0x238)[0]}")
    memory.write(KERNEL_GPA, kernel)
    memory.write(CMDLINE_GPA, encoded)

    params = bytearray(4096)
    header_end = 0x202 + image[0x201]
    params[0x1F1:header_end] = image[0x1F1:header_end]
    params[0x210] = LOADER_TYPE_UNDEFINED                       # type_of_loader
    params[0x211] |= CAN_USE_HEAP                               # loadflags
    struct.pack_into("<H", params, 0x224, 0xFE00)               # heap_end_ptr
    struct.pack_into("<I", params, 0x228, CMDLINE_GPA)          # cmd_line_ptr
    if initrd:
        limit = min(struct.unpack_from("<I", image, 0x22C)[0] or 0x37FFFFFF, memory.size - 1)
        address = (limit + 1 - len(initrd)) & ~0xFFF
        if address < KERNEL_GPA + max(len(kernel), init_size):
            raise LoaderError(f"initrd of {len(initrd) >> 20} MiB does not fit beside the kernel; give the machine more memory")
        memory.write(address, initrd)
        struct.pack_into("<II", params, 0x218, address, len(initrd))  # ramdisk_image, ramdisk_size
    if rsdp:
        struct.pack_into("<Q", params, 0x070, rsdp)             # acpi_rsdp_addr
    entries = memory_map(memory)
    params[0x1E8] = len(entries)
    for i, (start, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", params, 0x2D0 + 20 * i, start, size, kind)
    memory.write(BOOT_PARAMS_GPA, bytes(params))
    return long_mode(memory, KERNEL_GPA + 0x200, stack=STACK_GPA, boot_params=BOOT_PARAMS_GPA)


_COMPRESSORS = (
    (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"), (b"\x02\x21\x4c\x18", "lz4"),
)


LZ4_LEGACY_BLOCK = 8 << 20


def _lz4_legacy(payload: bytes, name: str, limit: int) -> bytes:
    """The kernel's lz4 'legacy' framing: magic, then (u32 size, block) until the end."""
    try:
        import lz4.block
    except ImportError:
        raise LoaderError(f"{name}: lz4 payload; pip install lz4 to extract it (or boot the bzImage itself)") from None
    out, offset = bytearray(), 4
    while offset + 4 <= len(payload) and len(out) <= limit:
        (size,) = struct.unpack_from("<I", payload, offset)
        if size == 0x184C2102:  # a new frame starts (concatenated streams)
            offset += 4
            continue
        block = payload[offset + 4 : offset + 4 + size]
        if len(block) != size:
            break  # the trailing uncompressed-size word
        out += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)
        offset += 4 + size
    return bytes(out)


def _zstd(payload: bytes, name: str, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise LoaderError(f"{name}: zstd payload; pip install zstandard to extract it (or boot the bzImage itself)") from None
    # Fed a little at a time: one block of input can expand ~40000-fold, so output stays near the limit.
    decompressor, out = zstandard.ZstdDecompressor().decompressobj(), bytearray()
    for start in range(0, len(payload), 1024):
        if len(out) > limit or decompressor.eof:
            break   # past the limit, or the frame ended (the size word follows it)
        out += decompressor.decompress(payload[start : start + 1024])
    return bytes(out)


def _decompress(kind: str | None, payload: bytes, name: str, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the decompressed payload (a bomb stops there)."""
    import bz2
    import lzma
    import zlib

    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, limit + 1)
    if kind in ("xz", "lzma"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE).decompress(payload, limit + 1)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload, limit + 1)
    if kind == "lz4":
        return _lz4_legacy(payload, name, limit)
    if kind == "zstd":
        return _zstd(payload, name, limit)
    raise LoaderError(f"{name}: unsupported payload compression ({kind or 'unknown'})")


def extract_vmlinux(image: bytes, name: str = "bzImage", limit: int = 1 << 30) -> bytes:
    """The vmlinux ELF inside a bzImage's compressed payload, at most ``limit`` bytes
    (the guest's memory: a vmlinux bigger than that could not be loaded anyway).

    On slow engines running the in-kernel decompressor costs minutes to hours
    (engines.md); decompressing on the host takes well under a second.
    """
    if not is_bzimage(image):
        raise LoaderError(f"{name}: not a Linux bzImage")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    if not length or len(payload) != length:
        raise LoaderError(f"{name}: payload offset/length point outside the file")
    kind = next((k for magic, k in _COMPRESSORS if payload.startswith(magic)), None)
    try:
        data = _decompress(kind, payload, name, limit)
    except LoaderError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decompressor has its own error types
        raise LoaderError(f"{name}: corrupt {kind} payload ({exc})") from None
    if len(data) > limit:
        raise LoaderError(f"{name}: the payload decompresses to more than the guest's {limit >> 20} MiB")
    if data[:4] != b"\x7fELF":
        raise LoaderError(f"{name}: the decompressed payload is not an ELF vmlinux")
    return data
