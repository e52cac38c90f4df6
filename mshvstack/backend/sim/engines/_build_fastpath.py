"""cffi builder for the Unicorn engine's C core (x86core.c, compiled at install).

Everything that must run inside the emulator thread at a precise point is
C: the new-block filter, stops and the deadline timer, interrupt and
exception delivery through QEMU's own x86 code, SYSCALL.  See x86core.c.
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
    volatile int64_t deadline_ns;
    uint64_t resume_rip;
    volatile int stop_request;
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
    ...;
    const uint64_t *code_hosts;
    const uint8_t *code_saved;
    int code_pages;
    int changed_page;
    int parallel;
    uint64_t serial_steps;
    ...;
    uint64_t blocks_filtered;
    uint64_t blocks_redone;
    uint64_t blocks_redone_alone;
    uint64_t running_ns;
    uint64_t pages_retired;
    ...;
};
struct mshvstack_world { ...; };
struct mshvstack_library {
    void *tr_ops;
    void *init_disas_context;
    void *tb_stop;
    void *translate_insn;
    void *notdirty_write;
    void *stop_interrupt;
    void *xchg[4];
    void *cmpxchg_mmu[4];
    void *code[6];
};
void mshvstack_world_init(struct mshvstack_world *w);
void mshvstack_world_destroy(struct mshvstack_world *w);
void mshvstack_world_code_written(struct mshvstack_world *w, const uint64_t *ranges, size_t count);
int mshvstack_parallel_install(const struct mshvstack_library *lib);
int mshvstack_parallel_attach(struct mshvstack_cpu *c, struct mshvstack_world *w, const struct mshvstack_library *lib);
int mshvstack_parallel_ready(struct mshvstack_cpu *c);
void mshvstack_translating_for(struct mshvstack_cpu *c);
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
#define REASON_ENGINE ...
#define REASON_IO ...
#define REASON_HYPERCALL ...
#define RUN_CODE_CHANGED ...
#define SPECIAL_KIND_NONE ...
#define SPECIAL_KIND_IO ...
#define SPECIAL_KIND_OTHER ...
#define SPECIAL_KIND_MSR ...
#define SPECIAL_KIND_HYPERCALL ...
#define SPECIAL_CONTINUE ...
#define SPECIAL_STOP ...
#define SPECIAL_RESUME ...
int mshvstack_cpu_init(struct mshvstack_cpu *c, void *owner, void *uc, const char *library, const uint64_t *probe,
                       int reg_eflags, int reg_msr, int reg_rax);
int mshvstack_cpu_hooks(struct mshvstack_cpu *c, int edge_type, int intr_type, int invalid_type, int insn_type,
                        int syscall_insn, int code_type, int memory_fault_types);
int mshvstack_check_mirror(struct mshvstack_cpu *c, const int *ids);
int mshvstack_memory_fault_ranges(struct mshvstack_cpu *c, const uint64_t *bounds, int count);
#define MAX_FAULT_RANGES ...
int mshvstack_quiet_exit_checks(struct mshvstack_cpu *c, uint32_t tcg_buffer_size);
int mshvstack_hook_special(struct mshvstack_cpu *c, uint64_t address);
void mshvstack_intercept_hypercalls(struct mshvstack_cpu *c, int on);
int mshvstack_set_native_msrs(struct mshvstack_cpu *c, const uint32_t *msrs, int count, uint32_t range_first, uint32_t range_last);
int mshvstack_set_special(struct mshvstack_cpu *c, uint64_t address, int kind, const uint8_t *raw, int length);
int mshvstack_guard_code(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host);
int mshvstack_ram_map(struct mshvstack_cpu *c, uint64_t gpa, uint64_t size, uint64_t host);
int mshvstack_ram_unmap(struct mshvstack_cpu *c, uint64_t gpa, uint64_t size);
int mshvstack_write_protect(struct mshvstack_cpu *c, uint64_t host, uint64_t size, int protect);
void mshvstack_attach_vp(struct mshvstack_cpu *c, uint32_t vp_index, void *register_page, void *message_page,
                         const int register_ids[6]);
int mshvstack_run(struct mshvstack_cpu *c, int64_t deadline_ns);
void mshvstack_publish_registers(struct mshvstack_cpu *c);
uint32_t mshvstack_consume_registers(struct mshvstack_cpu *c);
void mshvstack_enter(struct mshvstack_cpu *c, int64_t deadline_ns);
void mshvstack_leave(struct mshvstack_cpu *c);
void mshvstack_set_deadline(struct mshvstack_cpu *c, int64_t deadline_ns);
void mshvstack_cancel(struct mshvstack_cpu *c);
void mshvstack_offer_soon(struct mshvstack_cpu *c);
void mshvstack_cpu_free(struct mshvstack_cpu *c);
void mshvstack_filter_forget(struct mshvstack_cpu *f, uint64_t start, uint64_t end);
int mshvstack_code_page_known(struct mshvstack_cpu *c, uint64_t linear, uint64_t gpa);
void mshvstack_code_pages_forget(struct mshvstack_cpu *c, uint64_t linear);
void mshvstack_get_segment(struct mshvstack_cpu *c, int index, struct mshvstack_segment *out);
void mshvstack_set_segment(struct mshvstack_cpu *c, int index, const struct mshvstack_segment *in);
size_t mshvstack_read_code(struct mshvstack_cpu *c, uint64_t linear, uint8_t *out, size_t size);
int mshvstack_translate(struct mshvstack_cpu *c, uint64_t linear, uint64_t *gpa);
void mshvstack_read_registers(struct mshvstack_cpu *c, const int *ids, uint64_t *values, int count);
uint64_t mshvstack_read_register(struct mshvstack_cpu *c, int id);
void mshvstack_write_register(struct mshvstack_cpu *c, int id, uint64_t value);
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
extern "Python" int mshvstack_on_new_block(void *owner, uint64_t address, uint32_t size);
extern "Python" int mshvstack_on_injected(void *owner, int vector);
extern "Python" int mshvstack_on_offer(void *owner);
extern "Python" int mshvstack_on_special(void *owner, uint64_t address);
extern "Python" void mshvstack_on_memory_fault(void *owner, int access, uint64_t address, int size, int64_t value);
"""

HERE = Path(__file__).parent
INCLUDE = HERE.parents[3] / "include"
# One unit: parallel execution (x86parallel.c) and the intercept writer (x86exits.c) use the core's CPU state.
C_SOURCES = ("x86core.c", "x86parallel.c", "x86exits.c")
SOURCE = "".join((HERE / name).read_text(encoding="utf-8") for name in C_SOURCES)

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("mshvstack.backend.sim.engines._fastpath", SOURCE, libraries=["dl", "pthread"], include_dirs=[str(INCLUDE)],
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
