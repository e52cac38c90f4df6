"""cffi builder for the VMBus ring's C core (ringcore.c, compiled at install).

The core is compiled against include/vmbus/vmbus.h, so the control page's
field offsets, the descriptor and the trailer come from the header; the
declarations below are the core's own interface, which cffi checks against
the compiled source.
"""

from __future__ import annotations

from pathlib import Path

import cffi

CDEF = """
#define RINGCORE_OK ...
#define RINGCORE_EMPTY ...
#define RINGCORE_FULL ...
#define RINGCORE_BAD_INDICES ...
#define RINGCORE_BAD_WRITE_INDEX ...
#define RINGCORE_BAD_READ_INDEX ...
#define RINGCORE_SHORT ...
#define RINGCORE_BAD_DESCRIPTOR ...
#define RINGCORE_BAD_PACKET ...
#define RINGCORE_BAD_LAYOUT ...
#define RINGCORE_LARGE_PACKET ...
struct ringcore_run {
    uint32_t data_offset;
    uint32_t length;
    uint32_t buffer;
    uint64_t host_offset;
};
struct ringcore_memory {
    char **bases;
    uint64_t *sizes;
    uint32_t count;
};
struct ringcore_ring {
    uint32_t data_size;
    uint32_t run_count;
    const struct ringcore_run *runs;
    uint32_t control_buffer;
    uint64_t control_offset;
    struct ringcore_memory memory;
};
struct ringcore_result {
    uint32_t write_index;
    uint32_t read_index;
    uint32_t available;
    uint32_t length;
    uint64_t needed;
    uint64_t free;
    uint32_t offset8;
    uint32_t len8;
    int signal;
    int ready;
};
int ringcore_write(struct ringcore_ring *ring, char *first, uint64_t first_size, const char *packet, uint64_t length,
                   struct ringcore_result *result);
int ringcore_read(struct ringcore_ring *ring, char *first, uint64_t first_size, char *out, uint64_t capacity,
                  struct ringcore_result *result);
int ringcore_used(struct ringcore_ring *ring, char *first, uint64_t first_size, struct ringcore_result *result);
int ringcore_wait_for_space(struct ringcore_ring *ring, char *first, uint64_t first_size, uint64_t needed,
                            struct ringcore_result *result);
int ringcore_start_outgoing(struct ringcore_ring *ring, char *first, uint64_t first_size);
int ringcore_start_incoming(struct ringcore_ring *ring, char *first, uint64_t first_size);
"""

HERE = Path(__file__).parent
INCLUDE = HERE.parents[1] / "include"

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("mshvstack.vmbus._ringcore", (HERE / "ringcore.c").read_text(encoding="utf-8"), include_dirs=[str(INCLUDE)],
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
