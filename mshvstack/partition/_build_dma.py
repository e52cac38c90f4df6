"""cffi builder for guest-memory DMA to and from files (dma.c, compiled at install)."""

from __future__ import annotations

from pathlib import Path

import cffi

CDEF = """
#define DMA_OK ...
#define DMA_OUTSIDE ...
#define DMA_IO_ERROR ...
struct iovec { void *iov_base; size_t iov_len; };
int dma_file(int fd, int to_file, uint64_t file_offset, uint64_t length, char *host, uint64_t host_size,
             uint64_t region_pfn, const uint64_t *pfns, uint32_t count, uint32_t first_offset,
             struct iovec *iov, uint32_t *pieces, int *error);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("mshvstack.partition._dma", (Path(__file__).parent / "dma.c").read_text(encoding="utf-8"),
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
