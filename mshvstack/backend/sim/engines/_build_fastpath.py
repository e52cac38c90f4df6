"""cffi builder for the Unicorn engine's C core (x86core.c, compiled at install).

Everything that must run inside the emulator thread at a precise point is
C: the per-block filter and stop/deadline check, interrupt and exception
delivery through QEMU's own x86 code, SYSCALL.  See x86core.c for why.
"""

from __future__ import annotations

from pathlib import Path

import cffi

CDEF = """
struct mshvstack_cpu {
    uint64_t *slots;
    uint64_t mask;
    uint64_t used;
    void *owner;
    ...;
    volatile int stop_request;
    int64_t deadline_ns;
    int pending_vector;
    int pending_nmi;
    int pending_exception;
    uint32_t pending_error_code;
    uint32_t intercepted_exceptions;
    int reason;
    int vector;
    uint32_t error_code;
    uint64_t injected;
    size_t error_code_offset;
};
struct mshvstack_segment {
    uint64_t base;
    uint32_t limit;
    uint32_t selector;
    uint32_t flags;
};
#define REASON_NONE ...
#define REASON_CANCELLED ...
#define REASON_DEADLINE ...
#define REASON_EXCEPTION ...
int mshvstack_cpu_init(struct mshvstack_cpu *c, void *owner, void *uc, const char *library, const uint64_t *probe,
                       int reg_eflags, int reg_msr, int reg_rax);
int mshvstack_cpu_hooks(struct mshvstack_cpu *c, int block_type, int intr_type, int invalid_type, int insn_type, int syscall_insn);
void mshvstack_cpu_free(struct mshvstack_cpu *c);
void mshvstack_filter_forget(struct mshvstack_cpu *f, uint64_t start, uint64_t end);
void mshvstack_get_segment(struct mshvstack_cpu *c, int index, struct mshvstack_segment *out);
void mshvstack_set_segment(struct mshvstack_cpu *c, int index, const struct mshvstack_segment *in);
size_t mshvstack_read_code(struct mshvstack_cpu *c, uint64_t linear, uint8_t *out, size_t size);
int mshvstack_translate(struct mshvstack_cpu *c, uint64_t linear, uint64_t *gpa);
int mshvstack_first_changed_page(const uint64_t *addresses, const uint8_t *saved, int count, uint64_t page_size);
void mshvstack_read_registers(struct mshvstack_cpu *c, const int *ids, uint64_t *values, int count);
uint64_t mshvstack_get_efer(struct mshvstack_cpu *c);
void mshvstack_set_efer(struct mshvstack_cpu *c, uint64_t value);
uint32_t mshvstack_hflags(struct mshvstack_cpu *c);
uint64_t mshvstack_tsc(struct mshvstack_cpu *c);
uint64_t mshvstack_host_tsc(void);
void mshvstack_set_rflags(struct mshvstack_cpu *c, uint64_t value);
int mshvstack_interrupt_shadow(struct mshvstack_cpu *c);
void mshvstack_end_interrupt_shadow(struct mshvstack_cpu *c);
int mshvstack_nmi_blocked(struct mshvstack_cpu *c);
void mshvstack_set_nmi_blocked(struct mshvstack_cpu *c, int blocked);
extern "Python" void mshvstack_on_new_block(void *owner, uint64_t address, uint32_t size);
extern "Python" int mshvstack_on_injected(void *owner, int vector);
"""

SOURCE = (Path(__file__).with_name("x86core.c")).read_text(encoding="utf-8")

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("mshvstack.backend.sim.engines._fastpath", SOURCE, libraries=["dl"],
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
