/*
 * The C half of the Unicorn engine: everything that must run inside the
 * emulator's own thread, at a point where the CPU state is precise.
 *
 * Why C and not Python hooks: Unicorn (QEMU's TCG) delivers no exceptions
 * or interrupts to the guest and stops imprecisely when asked to from
 * another thread (an exit request is noticed after the next memory access
 * and the interrupted instruction is re-executed, so a locked
 * read-modify-write runs twice).  QEMU's real x86 event machinery is in the
 * library, exported: do_interrupt (IDT/IVT gates, CPL and TSS stack
 * switches, IST, error codes, #DF promotion, triple fault) and the
 * interruptibility test (IF, the STI/MOV SS shadow, NMI blocking).  It
 * must be called from inside the CPU loop, because a fault while pushing
 * a frame unwinds with longjmp; Python frames cannot be unwound that way.
 *
 * So every stop and every event is taken where QEMU itself takes
 * interrupts: in the CPU's interrupt hook (CPUClass.cpu_exec_interrupt,
 * which the core wraps), called from the CPU loop between translation
 * blocks, where the PC is precise and nothing of the next block has run.
 * QEMU reaches it whenever a block exits to the loop: after every
 * instruction that can make an interrupt deliverable (STI, POPF, IRET,
 * MOV SS, ...), and at the next block start once anyone calls cpu_exit().
 * Other threads only set flags and call cpu_exit(); a timer thread does so
 * at the deadline.  Nothing runs per executed block: new blocks are found
 * when they are translated (Unicorn's edge-generated hook, called before a
 * new block runs), so the guest's hot loops run at Unicorn's own speed.
 *
 * The head of QEMU's CPUX86State is mirrored below; unicorn is pinned and
 * the layout is verified against the public register API when an engine
 * starts (mshvstack_cpu_init), which refuses to run on a mismatch.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct qemu_segment {
    uint32_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
};

struct qemu_x86_head {
    uint64_t regs[16];
    uint64_t eip;
    uint64_t eflags;
    uint64_t cc_dst, cc_src, cc_src2;
    uint32_t cc_op;
    int32_t df;
    uint32_t hflags, hflags2;
    struct qemu_segment segs[6], ldt, tr, gdt, idt;
    uint64_t cr[9];
    int32_t a20_mask;
    uint64_t bnd_regs[4][2];
    uint64_t bndcs_regs[2];
    uint64_t msr_bndcfgs;
    uint64_t efer;
};

/* QEMU's constants (target/i386/cpu.h, include/exec/cpu-all.h). */
#define CPU_INTERRUPT_HARD 0x0002
#define CPU_INTERRUPT_NMI 0x0200
#define CPU_INTERRUPT_TGT_EXT_0 0x0008   /* unused by QEMU's x86: the core's own request */
#define HF2_NMI_MASK (1u << 2)
#define CC_OP_EFLAGS 1   /* QEMU's lazy-flags state: CC_SRC holds the flags */
#define EXCP_NMI 2
#define EXCP_UD 6
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_CSTAR 0xC0000083u
#define MSR_FMASK 0xC0000084u
#define EFER_SCE (1u << 0)
#define EFER_LMA (1u << 10)
#define DESC_A (1u << 8)
#define DESC_W (1u << 9)   /* data: writable; code: readable */
#define DESC_CODE (1u << 11)
#define DESC_S (1u << 12)
#define DESC_P (1u << 15)
#define DESC_L (1u << 21)
#define DESC_B (1u << 22)
#define DESC_G (1u << 23)
#define HF_INHIBIT_IRQ (1u << 3)
#define HF_LMA (1u << 14)
#define HF_CS32 (1u << 4)
#define HF_CS64 (1u << 15)
#define RFLAGS_RF (1u << 16)

#define MAX_FAULT_RANGES 64

enum mshvstack_reason {
    REASON_NONE = 0,
    REASON_CANCELLED = 1,  /* stop_request seen at a block boundary */
    REASON_DEADLINE = 2,   /* the deadline passed */
    REASON_EXCEPTION = 3,  /* an intercepted exception, not delivered */
    REASON_ENGINE = 4,     /* a stop the Python half recorded (a special instruction, a memory fault) */
    REASON_IO = 5,         /* at an IO instruction: the core wrote its intercept message (x86exits.c) */
    REASON_HYPERCALL = 6,  /* at an intercepted hypercall: the core wrote its intercept message (x86exits.c) */
};

/* What the Python half decides at a special instruction. */
enum mshvstack_special {
    SPECIAL_CONTINUE = 0,   /* let the engine execute it */
    SPECIAL_STOP = 1,       /* stop before it */
    SPECIAL_RESUME = 2,     /* emulated: resume at resume_rip (after it, or at it to take a fault) */
};

struct mshvstack_api {
    int (*emu_start)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
    int (*emu_stop)(void *uc);
    int (*hook_del)(void *uc, size_t hh);
    int (*reg_read)(void *uc, int regid, void *value);
    int (*reg_write)(void *uc, int regid, const void *value);
    int (*hook_add)(void *uc, size_t *hh, int type, void *callback, void *user_data, uint64_t begin, uint64_t end, ...);
    void (*do_interrupt)(void *cs);
    void (*hardirq)(void *env, int intno, int is_hw);
    int (*pending_interrupt)(void *cs, int request);
    void (*loop_exit)(void *cs);
    void (*raise_exception_err)(void *env, int intno, int error_code);
    void (*update_hflags)(void *env);
    void (*tlb_flush)(void *cs);
    void (*tlb_reset_dirty)(void *cs, uint64_t host_start, uint64_t length);
    int (*vmem_read)(void *uc, uint64_t address, int prot, void *bytes, size_t size);
    int (*vmem_translate)(void *uc, uint64_t address, int prot, uint64_t *paddress);
    uint64_t (*get_tsc)(void *env);
    void *(*get_cpu)(void *uc, int index);
    void (*cpu_exit)(void *cs);
    void (**interrupt_handler)(void *cs, int mask);
    bool (*exec_interrupt)(void *cs, int request);
};

/* What the Python half found at a hooked address when it last decoded the code there. */
enum mshvstack_special_kind {
    SPECIAL_KIND_NONE = 0,    /* no longer a special instruction: run it */
    SPECIAL_KIND_IO = 1,      /* IN/OUT/INS/OUTS: always an intercept, encoded by the core */
    SPECIAL_KIND_OTHER = 2,   /* the Python half decides */
    SPECIAL_KIND_MSR = 3,     /* RDMSR/WRMSR: runs in the engine for a native MSR, else as OTHER */
    SPECIAL_KIND_HYPERCALL = 4,   /* VMCALL/VMMCALL: encoded by the core when intercepted (see below), else as OTHER */
};

#define MAX_NATIVE_MSRS 64

/* A range of guest pages with translated code, hooked (mshvstack_guard_code). */
struct code_guard {
    uint64_t begin, end;      /* guest-physical, inclusive */
    size_t hook;
};

/*
 * The instruction that starts at a hooked address, as last decoded: valid
 * while the code there still has these bytes and runs at this width (the
 * hook checks both before acting on it).  length 0: not known (the code
 * around it changed), decoded again when the hook is reached.
 */
struct special_entry {
    uint64_t key;             /* address + 1; 0: empty */
    uint8_t kind;
    uint8_t length;
    uint8_t raw[15];
    uint8_t width;            /* the code width it was decoded at (QEMU's HF_CS32/HF_CS64 bits, shifted) */
};

/* A VP's turn to run alone (x86parallel.c). */
enum mshvstack_exclusive {
    EXCLUSIVE_NONE = 0,
    EXCLUSIVE_ACQUIRED = 1,   /* the others are parked; the serial step is next */
    EXCLUSIVE_STEPPING = 2,   /* the serial step runs; the next block boundary ends the turn */
};

struct mshvstack_cpu;

/* Engines of a partition have one of this many bits each (shared past it). */
#define WORLD_BITS 64

/* Engines with one bit that are storing to code pages, and the page (STORING_MANY: several). */
struct storing_slot {
    int count;
    uint64_t page;
};

/*
 * The partition's engines as one machine (x86parallel.c).  The lock guards
 * everything here; owner is also read without it at block boundaries.
 *
 * Lock order (docs/concurrency.md): the world lock and each engine's timer
 * lock are leaves.  Neither is held while the other is taken, nor while
 * Python runs (no callback into Python under either), and Python holds none
 * of its locks across a run but the VP's own run lock: a VP that runs alone
 * (world_acquire) waits for every other running VP to reach a block
 * boundary, which a VP blocked on a lock held by the lone runner would never
 * do.  Both are taken with the GIL released (cffi releases it for each call).
 */
struct mshvstack_world {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int running;                     /* engines inside a run and not parked */
    struct mshvstack_cpu *owner;     /* the engine running alone (NULL: none) */
    struct mshvstack_cpu **members;
    int count, capacity;
    uint64_t next_bit;
    /* guest pages with translated code in some engine: insert-only, read without the lock */
    struct code_owner *code;
    uint64_t code_mask, code_used;
    int code_full;                   /* no room left: a write to any code-capable page goes to all */
    /* checked stores to code pages not yet landed, by engine bit (x86parallel.c's storing_locked) */
    struct storing_slot storing[WORLD_BITS];
    int storing_total;
};

/* A guest page with translated code, and the engines (their world_bit) that translated it. */
struct code_owner {
    uint64_t host;                   /* host address of the page; 0: empty slot */
    uint64_t gpa;
    uint64_t engines;
    uint32_t ready;                  /* every engine guards it (x86parallel.c's world_claim_code) */
    uint32_t stores;                 /* checked stores to it since it was claimed (x86parallel.c's retire_due_locked) */
    uint32_t retire_after;           /* how many retire it; 0: RETIRE_FIRST (doubled at each retirement) */
};

/* What another thread asks of an engine about code (x86parallel.c). */
enum code_event_kind {
    CODE_EVENT_WRITTEN = 0,          /* drop translations of [host, host + length) */
    CODE_EVENT_GUARD = 1,            /* guard the page (another engine translated code there) */
    CODE_EVENT_RETIRE = 2,           /* the page became data: drop its code and its guard (x86parallel.c) */
};

struct code_event {
    uint64_t host;
    uint64_t gpa;
    uint32_t length;
    uint32_t kind;
};

/* Guest RAM mapped at [gpa, gpa + size), backed by host memory at `host`. */
struct ram_range {
    uint64_t gpa, size, host;
};

/* More than the pages one block reads (BLOCK_PAGES). */
#define CLAIMED_RECENT 4

/* A linear code page and the guest page it mapped when the Python half scanned code there. */
struct page_pair {
    uint64_t linear1;             /* linear page + 1; 0: empty slot */
    uint64_t gpa;
};

/* QEMU's TCG_MAX_INSNS: no translation block has more instructions. */
#define TB_MAX_INSNS 512
/* Room for a new block's code: QEMU ends a block within a page of its start. */
#define BLOCK_BYTES 8192
#define BLOCK_PAGES (BLOCK_BYTES / 0x1000 + 1)
/* A new block's code as the translator read it: bytes, and the guest page of each linear page. */
struct block_code {
    uint64_t gpas[BLOCK_PAGES];   /* ~0: the page does not translate now */
    int pages;                    /* 0: more pages than BLOCK_PAGES (not read here) */
    uint32_t readable;            /* bytes read from the start (all of them, or up to the first unreadable page) */
    uint8_t bytes[BLOCK_BYTES];
};


/* Unicorn's uc_tb (unicorn.h): what the edge-generated hook says of a new block. */
struct uc_tb {
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
};

struct mshvstack_cpu {
    /* block filter: open addressing, pairs of (address + 1, stamp of the code scanned
     * there: its bytes, pages and width); key 0 = empty */
    uint64_t *slots;
    uint64_t mask;
    uint64_t used;
    void *owner;
    void *uc;
    void *cs;
    struct qemu_x86_head *env;
    struct mshvstack_api api;
    int reg_eflags, reg_msr;
    bool (**exec_interrupt_slot)(void *cs, int request);
    int code_hook_type;
    uint64_t resume_rip;        /* set by the Python half with SPECIAL_RESUME */
    /* the deadline timer thread (started at the first deadline); timer_lock guards running,
     * timer_started, timer_quit and deadline_ns's changes (a leaf: see struct mshvstack_world) */
    pthread_mutex_t timer_lock;
    pthread_cond_t timer_cond;
    pthread_t timer;
    int timer_started, timer_quit, running;
    /* requests (any thread may set stop_request; the rest is set by the VP's own thread) */
    volatile int stop_request;
    volatile int offer_request;   /* an interrupt arrived: ask the Python half what to offer (any thread) */
    /* MSRs the engine implements and no intercept asks for (mshvstack_set_native_msrs) */
    uint32_t native_msrs[MAX_NATIVE_MSRS];
    int native_msr_count;
    uint32_t native_range_first, native_range_last;   /* and a range of them (first > last: none) */
    volatile int intercept_hypercalls;   /* the partition intercepts HvPostMessage/HvSignalEvent (any thread) */
    volatile int64_t deadline_ns;
    int pending_vector;
    int pending_nmi;
    int pending_exception;
    uint32_t pending_error_code;
    uint32_t intercepted_exceptions;
    /* the last stop */
    int reason;
    int vector;
    uint32_t error_code;
    uint64_t injected;
    size_t error_code_offset;   /* env->error_code, deep in CPUX86State (0: unknown) */
    /* special instructions by linear address (open addressing, as the block filter) */
    struct special_entry *specials;
    uint64_t specials_mask, specials_used;
    struct special_entry stopped_at;   /* the special instruction of a REASON_IO or REASON_HYPERCALL stop */
    /* guest pages with translated code, hooked in merged ranges (mshvstack_guard_code) */
    struct code_guard *guards;
    int guard_count, guard_capacity;
    /* the VP's pages, where the core writes intercepts it encodes itself (x86exits.c) */
    uint32_t vp_index;
    void *register_page;
    void *message_page;
    int reg_rflags, reg_cr0, reg_cr3, reg_cr4, reg_cr8, reg_dr7;
    /* translated code pages, compared with their bytes at translation before each run */
    const uint64_t *code_hosts;   /* host address of each page */
    const uint8_t *code_saved;    /* page i's bytes at i * 4 KiB */
    int code_pages;               /* how many to compare (0: none, or too many to track) */
    int changed_page;             /* the page a RUN_CODE_CHANGED found */
    /* the memory-fault hooks, over every guest-physical range that is not plain RAM */
    int memory_fault_types;
    int fault_hook_count;
    size_t fault_hooks[MAX_FAULT_RANGES];
    /* parallel execution (x86parallel.c) */
    struct mshvstack_world *world;
    int in_world;                /* inside a run (under the world's lock) */
    int exclusive;               /* enum mshvstack_exclusive: set by the VP's own thread */
    int parallel;                /* blocks are translated with host atomics */
    char *tcg_ctx;               /* Unicorn's TCG context for this engine */
    uint64_t serial_steps;       /* instructions run alone (EXCP_ATOMIC) */
    /* code written on one engine and translated on another (x86parallel.c); under the world's lock */
    uint64_t world_bit;          /* this engine's bit in code_owner.engines */
    int world_index;              /* the bit's number */
    int storing;                  /* a checked store to a code page since the last block boundary */
    uint64_t storing_page;        /* its page (STORING_MANY: more than one) */
    int translate_alone;          /* the next block is translated while the others are parked */
    int alone_boundaries;         /* boundaries passed since (x86parallel.c's ALONE_BOUNDARIES) */
    uint64_t seen_pages[WORLD_BITS];   /* pages others were storing to when the translation began */
    int seen_count;
    uint64_t claimed_recent[CLAIMED_RECENT];   /* host page + 1: claimed while the world's table is full */
    unsigned claimed_next;
    /* guest RAM as the engine maps it, for the host address of a code page (mshvstack_ram_map) */
    struct ram_range *ram;
    int ram_count, ram_capacity;
    struct code_event *events;
    int event_count, event_capacity;
    int events_lost;             /* too many writes queued: drop every translation instead */
    volatile int events_pending;
    /* guest pages this engine write-protects (host page addresses; open addressing, 1: deleted) */
    uint64_t *protected_pages;
    uint64_t protected_mask, protected_used;
    /* the block last translated for this engine (x86parallel.c's translator hooks): where its
     * instructions start, as QEMU's own decoder found them (offsets from tb_first) */
    uint64_t tb_first;
    uint32_t tb_size;             /* its size once translated (0: still translating, or unknown) */
    int tb_insns;                 /* starts recorded (-1: more than TB_MAX_INSNS, unknown) */
    uint16_t tb_starts[TB_MAX_INSNS];
    /* (linear page, guest page) pairs the Python half has guarded and tracked (mshvstack_code_page_known) */
    struct page_pair *pairs;
    uint64_t pairs_mask, pairs_used;
    uint64_t blocks_filtered;     /* new blocks the core found plain, with no call into Python */
    uint64_t blocks_redone;       /* new blocks translated again before they ran (x86parallel.c) */
    uint64_t blocks_redone_alone; /* of them, with the other engines parked */
    uint64_t running_ns;          /* time inside the engine, summed over runs (--stats) */
    uint64_t pages_retired;       /* code pages that became data, unguarded (x86parallel.c's retire_code_page) */
    uint64_t *retired;            /* their guest pages, until code runs there again (guarded again then) */
    int retired_count, retired_capacity;
    struct block_code *block;     /* the new block being looked at (a buffer, not on the hook's stack) */
};

#define RUN_CODE_CHANGED (-1)

static int mshvstack_on_new_block(void *owner, uint64_t address, uint32_t size);
static int mshvstack_on_injected(void *owner, int vector);
static int mshvstack_on_offer(void *owner);
static int native_msr(const struct mshvstack_cpu *c, uint32_t index);
static int mshvstack_on_special(void *owner, uint64_t address);
static void mshvstack_on_memory_fault(void *owner, int access, uint64_t address, int size, int64_t value);
static bool world_boundary(struct mshvstack_cpu *c);
static uint64_t read_msr(struct mshvstack_cpu *c, uint32_t index);
static void world_enter(struct mshvstack_cpu *c);
static void world_leave(struct mshvstack_cpu *c);
static void world_forget(struct mshvstack_cpu *c);
static void world_take_code_events(struct mshvstack_cpu *c);
static void drop_all_code(struct mshvstack_cpu *c);
static int reguard_retired(struct mshvstack_cpu *c, const struct block_code *b);
static int world_guard_everywhere(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host);
static int world_block_trusted(struct mshvstack_cpu *c, const struct block_code *b, uint64_t address);
static void world_stores_landed(struct mshvstack_cpu *c);
int mshvstack_ram_map(struct mshvstack_cpu *c, uint64_t gpa, uint64_t size, uint64_t host);

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return x;
}

/*
 * Open addressing, shared by the block filter and the special-instruction
 * table: entries of `stride` bytes that start with their uint64_t key
 * (address + 1; 0 is an empty slot), mask + 1 of them (a power of two).
 */
static uint64_t slot_of(const void *table, size_t stride, uint64_t mask, uint64_t key)
{
    for (uint64_t i = mix(key) & mask;; i = (i + 1) & mask) {
        uint64_t k;
        memcpy(&k, (const char *)table + i * stride, sizeof k);
        if (!k || k == key)
            return i;
    }
}

/* The table with twice the slots, its entries rehashed (NULL: out of memory, nothing changed). */
static void *doubled(const void *table, size_t stride, uint64_t mask)
{
    uint64_t size = (mask + 1) * 2;
    char *fresh = calloc(size, stride);
    if (!fresh)
        return NULL;
    for (uint64_t i = 0; i <= mask; i++) {
        const char *entry = (const char *)table + i * stride;
        uint64_t key;
        memcpy(&key, entry, sizeof key);
        if (key)
            memcpy(fresh + slot_of(fresh, stride, size - 1, key) * stride, entry, stride);
    }
    return fresh;
}

/* The block filter's entries: (address + 1, stamp) pairs. */
#define FILTER_STRIDE (2 * sizeof(uint64_t))

/* Record the stamp of the code at a block start; 1 when it differs from the one
 * recorded (a new start, or the code there changed): the block is to be scanned. */
static int insert(struct mshvstack_cpu *f, uint64_t key, uint64_t stamp)
{
    uint64_t *entry = f->slots + 2 * slot_of(f->slots, FILTER_STRIDE, f->mask, key);
    if (entry[0] && entry[1] == stamp)
        return 0;
    if (!entry[0]) {
        entry[0] = key;
        f->used++;
    }
    entry[1] = stamp;
    return 1;
}

static int grow(struct mshvstack_cpu *f)
{
    uint64_t *fresh = doubled(f->slots, FILTER_STRIDE, f->mask);
    if (!fresh)
        return -1;
    free(f->slots);
    f->slots = fresh;
    f->mask = f->mask * 2 + 1;
    return 0;
}

/* Read our own memory without faulting on a bad pointer (used only to verify layouts). */
static int safe_read(void *dst, const void *src, size_t n)
{
    struct iovec local = {dst, n}, remote = {(void *)src, n};
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -1;
}

/* Up to max words of our own memory from src, page by page: an object may end
 * near the end of its mapping.  Returns how many words were read. */
static int read_words(uint64_t *dst, const void *src, int max)
{
    int words = 0;
    while (words < max && safe_read(dst + words, (const uint64_t *)src + words, 512 * 8) == 0)
        words += 512;
    return words;
}

static int resolve(struct mshvstack_api *api, const char *library)
{
    void *h = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (!h)
        return -1;
#define SYM(field, name) if (!(*(void **)&api->field = dlsym(h, name))) return -2;
    SYM(emu_start, "uc_emu_start")
    SYM(emu_stop, "uc_emu_stop")
    SYM(hook_del, "uc_hook_del")
    SYM(reg_read, "uc_reg_read")
    SYM(reg_write, "uc_reg_write")
    SYM(hook_add, "uc_hook_add")
    SYM(do_interrupt, "x86_cpu_do_interrupt_x86_64")
    SYM(hardirq, "do_interrupt_x86_hardirq_x86_64")
    SYM(pending_interrupt, "x86_cpu_pending_interrupt_x86_64")
    SYM(loop_exit, "cpu_loop_exit_x86_64")
    SYM(raise_exception_err, "raise_exception_err_x86_64")
    SYM(update_hflags, "x86_update_hflags_x86_64")
    SYM(tlb_flush, "tlb_flush_x86_64")
    SYM(tlb_reset_dirty, "tlb_reset_dirty_x86_64")
    SYM(vmem_read, "uc_vmem_read")
    SYM(vmem_translate, "uc_vmem_translate")
    SYM(get_tsc, "cpu_get_tsc_x86_64")
    SYM(get_cpu, "qemu_get_cpu_x86_64")
    SYM(cpu_exit, "cpu_exit")
    SYM(interrupt_handler, "cpu_interrupt_handler")
    SYM(exec_interrupt, "x86_cpu_exec_interrupt_x86_64")
#undef SYM
    return 0;
}

static int is_live(struct mshvstack_cpu *c, struct qemu_x86_head *env, int reg_rax, uint64_t probe_rax)
{
    /* A copy of the registers does not follow a write through the API; the CPU state does. */
    for (uint64_t round = 1; round <= 3; round++) {
        uint64_t value = 0x5A5AC3C3F00F0000ULL ^ (round * 0x1111), seen = 0;
        c->api.reg_write(c->uc, reg_rax, &value);
        if (safe_read(&seen, &env->regs[0], 8) < 0 || seen != value) {
            c->api.reg_write(c->uc, reg_rax, &probe_rax);
            return 0;
        }
    }
    c->api.reg_write(c->uc, reg_rax, &probe_rax);
    return 1;
}

/*
 * Find QEMU's CPUState and CPUX86State behind the engine.  The CPU comes
 * from qemu_get_cpu(); its env_ptr field is the pointer, among the
 * CPU's first words, to registers equal to the probe values the caller
 * wrote through the public API that also follow a later write (a copy would not).
 */
static int discover(struct mshvstack_cpu *c, const uint64_t probe[16], int reg_rax)
{
    enum { CPU_WORDS = 16384 };
    uint64_t *cpuw = calloc(CPU_WORDS, 8), regs[16];
    int found = -1;
    c->cs = c->api.get_cpu(c->uc, -1);   /* unicorn leaves its one CPU's index at -1 */
    if (!c->cs)
        c->cs = c->api.get_cpu(c->uc, 0);
    int words = 0;
    if (!cpuw || !c->cs)
        goto out;
    words = read_words(cpuw, c->cs, CPU_WORDS);
    for (int j = 0; j < words; j++) {
        uint64_t e = cpuw[j], p = (uint64_t)c->cs;
        if (e <= p || e - p > (1u << 20) || (e & 7))
            continue;
        if (safe_read(regs, (void *)e, sizeof regs) == 0 && memcmp(regs, probe, sizeof regs) == 0 &&
            is_live(c, (struct qemu_x86_head *)e, reg_rax, probe[0])) {
            c->env = (struct qemu_x86_head *)e;
            found = 0;
            break;
        }
    }
    /* The CPU's class is embedded in the CPU object, after its registers: its interrupt
     * hook is the first word there equal to QEMU's x86 hook, and the CPU's class
     * pointer (before the registers) points at the class just below it. */
    if (found == 0) {
        int first = (int)(((uint64_t *)c->env - (uint64_t *)c->cs));
        found = -3;
        for (int j = first; j < words && found == -3; j++) {
            if (cpuw[j] != (uint64_t)(uintptr_t)c->api.exec_interrupt)
                continue;
            uint64_t slot = (uint64_t)(uintptr_t)((uint64_t *)c->cs + j);
            for (int k = 0; k < first; k++)
                if (cpuw[k] <= slot && slot - cpuw[k] < 1024 && cpuw[k] > (uint64_t)(uintptr_t)c->env) {
                    c->exec_interrupt_slot = (bool (**)(void *, int))(uintptr_t)slot;
                    found = 0;
                    break;
                }
        }
    }
out:
    free(cpuw);
    return found;
}

int mshvstack_cpu_init(struct mshvstack_cpu *c, void *owner, void *uc, const char *library, const uint64_t *probe,
                       int reg_eflags, int reg_msr, int reg_rax)
{
    memset(c, 0, sizeof *c);
    c->owner = owner;
    c->uc = uc;
    c->reg_eflags = reg_eflags;
    c->reg_msr = reg_msr;
    c->pending_vector = -1;
    c->pending_exception = -1;
    if (resolve(&c->api, library) < 0)
        return -1;
    int status = discover(c, probe, reg_rax);
    if (status < 0)
        return status == -3 ? -4 : -2;
    c->mask = 4095;
    c->slots = calloc(c->mask + 1, FILTER_STRIDE);
    c->specials_mask = 1023;
    c->specials = calloc(c->specials_mask + 1, sizeof *c->specials);
    c->block = malloc(sizeof *c->block);
    if (!c->slots || !c->specials || !c->block)
        return -3;
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&c->timer_cond, &attributes);
    pthread_condattr_destroy(&attributes);
    pthread_mutex_init(&c->timer_lock, NULL);
    return 0;
}

/*
 * The mirrored CPU state the core reads and writes directly, checked
 * against Unicorn's register API: each field is given a value through the
 * API and must show it where the mirror says it is (then restored).  The
 * GPR block was checked when the state was found (discover).  0, or the
 * number of the first field that did not match (enum mirror_field + 1).
 */
enum mirror_field {
    MIRROR_RIP, MIRROR_EFLAGS, MIRROR_CR0, MIRROR_CR3, MIRROR_CR4, MIRROR_FS_BASE, MIRROR_GS_BASE,
    MIRROR_GDTR, MIRROR_IDTR, MIRROR_EFER, MIRROR_HFLAGS, MIRROR_FIELDS,
};

struct uc_table_register {   /* unicorn.h's uc_x86_mmr */
    uint16_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
};

#define EFER_MSR 0xC0000080u
#define CR0_TS (1ULL << 3)
#define CR4_OSFXSR (1ULL << 9)
#define EFLAGS_IF (1ULL << 9)
#define EFLAGS_DF (1ULL << 10)

static int check_word(struct mshvstack_cpu *c, int id, const volatile uint64_t *field, uint64_t value)
{
    uint64_t saved = 0, seen;
    c->api.reg_read(c->uc, id, &saved);
    c->api.reg_write(c->uc, id, &value);
    seen = *field;
    c->api.reg_write(c->uc, id, &saved);
    return seen == value && *field == saved;
}

static int check_table(struct mshvstack_cpu *c, int id, const volatile struct qemu_segment *field)
{
    struct uc_table_register saved = {0}, probe = {0, 0x5A5A5000ULL, 0x3F7, 0};
    c->api.reg_read(c->uc, id, &saved);
    c->api.reg_write(c->uc, id, &probe);
    int ok = field->base == probe.base && field->limit == probe.limit;
    c->api.reg_write(c->uc, id, &saved);
    return ok && field->base == saved.base;
}

int mshvstack_check_mirror(struct mshvstack_cpu *c, const int *ids)
{
    struct qemu_x86_head *env = c->env;
    uint64_t cr0 = 0, cr4 = 0, flags = 0;
    if (!check_word(c, ids[MIRROR_RIP], &env->eip, 0x7FFF12345670ULL))
        return MIRROR_RIP + 1;
    /* EFLAGS: QEMU keeps the arithmetic flags apart; IF stays in env->eflags, DF becomes env->df */
    c->api.reg_read(c->uc, ids[MIRROR_EFLAGS], &flags);
    uint64_t probe = 0x2 | EFLAGS_IF | EFLAGS_DF;
    c->api.reg_write(c->uc, ids[MIRROR_EFLAGS], &probe);
    int eflags_ok = (env->eflags & EFLAGS_IF) && env->df == -1;
    c->api.reg_write(c->uc, ids[MIRROR_EFLAGS], &flags);
    if (!eflags_ok || (env->eflags & EFLAGS_IF) != (flags & EFLAGS_IF))
        return MIRROR_EFLAGS + 1;
    c->api.reg_read(c->uc, ids[MIRROR_CR0], &cr0);
    if (!check_word(c, ids[MIRROR_CR0], &env->cr[0], cr0 ^ CR0_TS))
        return MIRROR_CR0 + 1;
    if (!check_word(c, ids[MIRROR_CR3], &env->cr[3], 0x1234000ULL))
        return MIRROR_CR3 + 1;
    c->api.reg_read(c->uc, ids[MIRROR_CR4], &cr4);
    if (!check_word(c, ids[MIRROR_CR4], &env->cr[4], cr4 ^ CR4_OSFXSR))
        return MIRROR_CR4 + 1;
    if (!check_word(c, ids[MIRROR_FS_BASE], &env->segs[4].base, 0x7F0000001000ULL))
        return MIRROR_FS_BASE + 1;
    if (!check_word(c, ids[MIRROR_GS_BASE], &env->segs[5].base, 0x7F0000002000ULL))
        return MIRROR_GS_BASE + 1;
    if (!check_table(c, ids[MIRROR_GDTR], &env->gdt))
        return MIRROR_GDTR + 1;
    if (!check_table(c, ids[MIRROR_IDTR], &env->idt))
        return MIRROR_IDTR + 1;
    uint64_t efer = read_msr(c, EFER_MSR), seen;
    struct { uint32_t rid; uint64_t value; } msr = {EFER_MSR, efer ^ EFER_SCE};
    c->api.reg_write(c->uc, c->reg_msr, &msr);
    seen = env->efer;
    msr.value = efer;
    c->api.reg_write(c->uc, c->reg_msr, &msr);
    if (seen != (efer ^ EFER_SCE) || env->efer != efer)
        return MIRROR_EFER + 1;
    /* a 64-bit engine starts in long mode with a 64-bit code segment */
    if ((env->hflags & (HF_LMA | HF_CS64)) != (HF_LMA | HF_CS64) || !(env->efer & EFER_LMA))
        return MIRROR_HFLAGS + 1;
    return 0;
}

/* Stop the timer thread (before the engine closes: it kicks the CPU) and free. */
void mshvstack_cpu_free(struct mshvstack_cpu *c)
{
    world_forget(c);
    if (c->timer_started) {
        pthread_mutex_lock(&c->timer_lock);
        c->timer_quit = 1;
        pthread_cond_signal(&c->timer_cond);
        pthread_mutex_unlock(&c->timer_lock);
        pthread_join(c->timer, NULL);
        c->timer_started = 0;
    }
    if (c->slots) {
        pthread_cond_destroy(&c->timer_cond);
        pthread_mutex_destroy(&c->timer_lock);
    }
    free(c->slots);
    c->slots = NULL;
    free(c->specials);
    c->specials = NULL;
    free(c->guards);
    c->guards = NULL;
    free(c->retired);
    c->retired = NULL;
    c->retired_count = c->retired_capacity = 0;
    free(c->protected_pages);
    c->protected_pages = NULL;
    free(c->pairs);
    c->pairs = NULL;
    c->pairs_mask = c->pairs_used = 0;
    free(c->block);
    c->block = NULL;
    free(c->ram);
    c->ram = NULL;
    c->ram_count = c->ram_capacity = 0;
}

/* ---- guest RAM as the engine maps it (the Python half says so as it maps) ---- */

/* [gpa, gpa + size) is no longer RAM: ranges overlapping it are cut (split when it lies inside). */
int mshvstack_ram_unmap(struct mshvstack_cpu *c, uint64_t gpa, uint64_t size)
{
    uint64_t end = gpa + size;
    for (int i = 0; i < c->ram_count; i++) {
        struct ram_range r = c->ram[i];
        uint64_t r_end = r.gpa + r.size;
        if (r_end <= gpa || r.gpa >= end)
            continue;
        if (r.gpa < gpa && r_end > end) {   /* split: the tail becomes a range of its own */
            c->ram[i].size = gpa - r.gpa;
            return mshvstack_ram_map(c, end, r_end - end, r.host + (end - r.gpa));
        }
        if (r.gpa < gpa) {
            c->ram[i].size = gpa - r.gpa;
        } else if (r_end > end) {
            c->ram[i] = (struct ram_range){end, r_end - end, r.host + (end - r.gpa)};
        } else {
            c->ram[i--] = c->ram[--c->ram_count];
        }
    }
    return 0;
}

/* [gpa, gpa + size) is RAM backed by host memory at `host`; -1: out of memory. */
int mshvstack_ram_map(struct mshvstack_cpu *c, uint64_t gpa, uint64_t size, uint64_t host)
{
    mshvstack_ram_unmap(c, gpa, size);
    if (c->ram_count == c->ram_capacity) {
        int capacity = c->ram_capacity ? 2 * c->ram_capacity : 8;
        struct ram_range *fresh = realloc(c->ram, (size_t)capacity * sizeof *fresh);
        if (!fresh)
            return -1;
        c->ram = fresh;
        c->ram_capacity = capacity;
    }
    c->ram[c->ram_count++] = (struct ram_range){gpa, size, host};
    return 0;
}

/* Where guest page `gpa` lives in host memory (0: not RAM). */
static uint64_t ram_host(const struct mshvstack_cpu *c, uint64_t gpa)
{
    for (int i = 0; i < c->ram_count; i++)
        if (gpa - c->ram[i].gpa < c->ram[i].size)
            return c->ram[i].host + (gpa - c->ram[i].gpa);
    return 0;
}

/* Forget blocks starting in [start, end) so they are scanned again when next
 * translated (their stamp becomes 0, which no code has). */
void mshvstack_filter_forget(struct mshvstack_cpu *f, uint64_t start, uint64_t end)
{
    for (uint64_t i = 0; i <= f->mask; i++) {
        uint64_t *entry = f->slots + 2 * i;
        if (entry[0] && entry[0] - 1 >= start && entry[0] - 1 < end)
            entry[1] = 0;
    }
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void stop(struct mshvstack_cpu *c, int reason)
{
    c->reason = reason;
    c->api.emu_stop(c->uc);
}

/* Deliver what is pending and deliverable now; does not return when it delivers. */
static void inject(struct mshvstack_cpu *c)
{
    if (c->pending_exception >= 0) {
        int vector = c->pending_exception;
        c->pending_exception = -1;
        /* QEMU's own path: #DF promotion, then the exception hook delivers or intercepts. */
        c->api.raise_exception_err(c->env, vector, (int)c->pending_error_code);
    }
    if (c->pending_nmi && c->api.pending_interrupt(c->cs, CPU_INTERRUPT_NMI)) {
        c->pending_nmi = 0;
        c->env->hflags2 |= HF2_NMI_MASK;   /* blocked until IRET */
        c->injected++;
        c->api.hardirq(c->env, EXCP_NMI, 1);
        c->api.loop_exit(c->cs);
    }
    if (c->pending_vector >= 0 && c->api.pending_interrupt(c->cs, CPU_INTERRUPT_HARD)) {
        int vector = c->pending_vector;
        c->pending_vector = -1;
        c->injected++;
        c->pending_vector = mshvstack_on_injected(c->owner, vector);  /* the LAPIC acknowledges it */
        c->api.hardirq(c->env, vector, 1);
        c->api.loop_exit(c->cs);
    }
}

/* The width code is decoded at now (QEMU's HF_CS32 and HF_CS64 as bits 0 and 1). */
static uint8_t code_width(struct mshvstack_cpu *c)
{
    uint32_t hflags = c->env->hflags;
    return (uint8_t)(((hflags & HF_CS32) ? 1 : 0) | ((hflags & HF_CS64) ? 2 : 0));
}

/* Read a block's code and pages through the guest's page tables, as the translator just did. */
static void read_block(struct mshvstack_cpu *c, uint64_t address, uint32_t size, struct block_code *b)
{
    uint64_t end = address + (size ? size : 1);
    b->pages = 0;
    b->readable = 0;
    if (size > BLOCK_BYTES)
        return;
    int readable = 1;
    for (uint64_t page = address & ~0xFFFULL; page < end; page += 0x1000) {
        uint64_t gpa = 0;
        if (c->api.vmem_translate(c->uc, page, 4 /* UC_PROT_EXEC */, &gpa) != 0)
            gpa = ~0ULL;
        b->gpas[b->pages++] = gpa == ~0ULL ? gpa : gpa & ~0xFFFULL;
        uint64_t from = page > address ? page : address, to = page + 0x1000 < address + size ? page + 0x1000 : address + size;
        if (readable && from < to) {
            if (c->api.vmem_read(c->uc, from, 4 /* UC_PROT_EXEC */, b->bytes + (from - address), (size_t)(to - from)) == 0)
                b->readable = (uint32_t)(to - address);
            else
                readable = 0;
        }
    }
}

/*
 * What a block's scan depends on: its bytes, the guest pages they are read
 * from (a linear page remapped to other code, or to the same code on another
 * page whose rewrites must be tracked) and the width they are decoded at.
 * Read through the guest's page tables as the translator just did; never 0.
 */
static uint64_t block_stamp(struct mshvstack_cpu *c, uint64_t address, uint32_t size, const struct block_code *b)
{
    uint64_t h = mix(0x9E3779B97F4A7C15ULL ^ ((uint64_t)code_width(c) << 32) ^ size);
    if (!b->pages) {   /* larger than any block QEMU translates: every page and byte, read here */
        uint64_t end = address + (size ? size : 1);
        for (uint64_t page = address & ~0xFFFULL; page < end; page += 0x1000) {
            uint64_t gpa = 0;
            if (c->api.vmem_translate(c->uc, page, 4 /* UC_PROT_EXEC */, &gpa) != 0)
                gpa = ~0ULL;
            h = mix((h ^ gpa) * 0x9E3779B97F4A7C15ULL);
        }
        uint8_t chunk[512];
        for (uint64_t at = address; at < address + size;) {
            size_t n = address + size - at < sizeof chunk ? (size_t)(address + size - at) : sizeof chunk;
            if (c->api.vmem_read(c->uc, at, 4 /* UC_PROT_EXEC */, chunk, n) != 0) {
                h = mix(h ^ at);
                break;
            }
            for (size_t j = 0; j < n; j += 8) {
                uint64_t word = 0;
                memcpy(&word, chunk + j, n - j < 8 ? n - j : 8);
                h = mix((h ^ word) * 0x9E3779B97F4A7C15ULL);
            }
            at += n;
        }
        return h ? h : 1;
    }
    for (int i = 0; i < b->pages; i++)
        h = mix((h ^ b->gpas[i]) * 0x9E3779B97F4A7C15ULL);
    for (uint32_t j = 0; j < b->readable; j += 8) {
        uint64_t word = 0;
        memcpy(&word, b->bytes + j, b->readable - j < 8 ? b->readable - j : 8);
        h = mix((h ^ word) * 0x9E3779B97F4A7C15ULL);
    }
    if (b->readable < size)
        h = mix(h ^ (address + b->readable));   /* unreadable now: a stamp of where it stopped */
    return h ? h : 1;
}

/* ---- the (linear page, guest page) pairs the Python half knows: open addressing ---- */

static uint64_t pair_slot(const struct page_pair *pairs, uint64_t mask, uint64_t linear1, uint64_t gpa)
{
    for (uint64_t i = mix(linear1 ^ mix(gpa)) & mask;; i = (i + 1) & mask)
        if (!pairs[i].linear1 || (pairs[i].linear1 == linear1 && pairs[i].gpa == gpa))
            return i;
}

/* Rebuild with room for `need` pairs, leaving out those of linear page `drop1` - 1 (0: none). */
static int pairs_rebuild(struct mshvstack_cpu *c, uint64_t need, uint64_t drop1)
{
    uint64_t size = 1024;
    while (size < need * 2)
        size *= 2;
    struct page_pair *fresh = calloc(size, sizeof *fresh), *old = c->pairs;
    if (!fresh)
        return -1;
    uint64_t used = 0;
    for (uint64_t i = 0; old && i <= c->pairs_mask; i++)
        if (old[i].linear1 && old[i].linear1 != drop1) {
            fresh[pair_slot(fresh, size - 1, old[i].linear1, old[i].gpa)] = old[i];
            used++;
        }
    free(old);
    c->pairs = fresh;
    c->pairs_mask = size - 1;
    c->pairs_used = used;
    return 0;
}

/* The Python half guarded guest page `gpa` and tracks its code as seen through linear page
 * `linear`: blocks there need no call into it for their pages.  0, or -1 (out of memory). */
int mshvstack_code_page_known(struct mshvstack_cpu *c, uint64_t linear, uint64_t gpa)
{
    if ((c->pairs_used + 1) * 2 > (c->pairs ? c->pairs_mask + 1 : 0) && pairs_rebuild(c, c->pairs_used + 1, 0) != 0)
        return -1;
    struct page_pair *e = &c->pairs[pair_slot(c->pairs, c->pairs_mask, (linear & ~0xFFFULL) + 1, gpa & ~0xFFFULL)];
    if (!e->linear1) {
        e->linear1 = (linear & ~0xFFFULL) + 1;
        e->gpa = gpa & ~0xFFFULL;
        c->pairs_used++;
    }
    return 0;
}

/* The Python half forgot the code it tracked at a linear page (every guest page it mapped). */
void mshvstack_code_pages_forget(struct mshvstack_cpu *c, uint64_t linear)
{
    if (c->pairs && pairs_rebuild(c, c->pairs_used, (linear & ~0xFFFULL) + 1) != 0) {
        free(c->pairs);   /* no memory to rebuild: forget them all (the Python half is asked again) */
        c->pairs = NULL;
        c->pairs_mask = c->pairs_used = 0;
    }
}

static int pair_known(const struct mshvstack_cpu *c, uint64_t linear, uint64_t gpa)
{
    if (!c->pairs || gpa == ~0ULL)
        return 0;
    const struct page_pair *e = &c->pairs[pair_slot(c->pairs, c->pairs_mask, (linear & ~0xFFFULL) + 1, gpa)];
    return e->linear1 != 0;
}

/*
 * Could the instruction starting at code[0] be one the hypervisor must see?
 * A superset of the Python half's special instructions, by their encoding
 * after any prefixes (legacy; REX in 64-bit code): IN, OUT (E4-E7, EC-EF),
 * INS, OUTS (6C-6F), HLT (F4), WRMSR (0F 30), RDMSR (0F 32), CPUID (0F A2),
 * VMCALL (0F 01 C1), VMMCALL (0F 01 D9).  `n` bytes are readable; fewer
 * than needed to tell count as maybe.
 */
static int maybe_special(const uint8_t *code, uint32_t n, int code64)
{
    uint32_t at = 0;
    for (; at < n; at++) {
        uint8_t b = code[at];
        int prefix = b == 0x66 || b == 0x67 || b == 0xF0 || b == 0xF2 || b == 0xF3 || b == 0x2E || b == 0x36 ||
                     b == 0x3E || b == 0x26 || b == 0x64 || b == 0x65 || (code64 && (b & 0xF0) == 0x40);
        if (!prefix)
            break;
    }
    if (at >= n)
        return 1;
    uint8_t op = code[at];
    if ((op >= 0xE4 && op <= 0xE7) || (op >= 0xEC && op <= 0xEF) || (op >= 0x6C && op <= 0x6F) || op == 0xF4)
        return 1;
    if (op != 0x0F)
        return 0;
    if (at + 1 >= n)
        return 1;
    uint8_t op2 = code[at + 1];
    if (op2 == 0x30 || op2 == 0x32 || op2 == 0xA2)
        return 1;
    if (op2 != 0x01)
        return 0;
    if (at + 2 >= n)
        return 1;
    return code[at + 2] == 0xC1 || code[at + 2] == 0xD9;
}

/*
 * A new block the Python half's scan would leave as it is: it would find no
 * special instruction (QEMU's own instruction starts, recorded while the
 * block was translated, checked by encoding), it has no hooked instruction
 * whose entry the scan would renew, and every page it runs from is guarded
 * and tracked already.  Anything unknown counts as not plain.
 */
static int block_is_plain(struct mshvstack_cpu *c, uint64_t address, uint32_t size, const struct block_code *b)
{
    if (!b->pages || b->readable < size || c->tb_first != address || c->tb_size != size || c->tb_insns <= 0 ||
        c->tb_starts[0] != 0)
        return 0;
    for (int i = 0; i < b->pages; i++)
        if (!pair_known(c, (address & ~0xFFFULL) + (uint64_t)i * 0x1000, b->gpas[i]))
            return 0;
    int code64 = (c->env->hflags & HF_CS64) != 0;
    for (int i = 0; i < c->tb_insns; i++) {
        uint32_t at = c->tb_starts[i];
        if (at >= size || maybe_special(b->bytes + at, size - at, code64))
            return 0;
    }
    if (c->specials_used)
        for (uint64_t a = address; a < address + size; a++)
            if (c->specials[slot_of(c->specials, sizeof *c->specials, c->specials_mask, a + 1)].key)
                return 0;
    return 1;
}

/*
 * Scan a block whose code was not scanned before as it is now: a new start,
 * or the code at a known one changed (rewritten through any mapping, its
 * linear page remapped, run at another width).  Per translated block, never
 * per executed one.  Only a block the core cannot show to be plain goes to
 * the Python half; when its scan hooked instructions in it, leave the block
 * before it runs (nothing of it has run) so it is translated again.
 */
static void new_block(struct mshvstack_cpu *c, uint64_t address, uint32_t size)
{
    if (!c->slots)
        return;
    struct block_code *b = c->block;
    read_block(c, address, size, b);
    if (c->world && !world_block_trusted(c, b, address))
        return;
    if (c->retired_count && reguard_retired(c, b) != 0) {
        drop_all_code(c);   /* (out of memory) */
        return;
    }
    if (c->used * 2 >= c->mask && grow(c) < 0)
        return;
    if (!insert(c, address + 1, block_stamp(c, address, size, b)))
        return;
    if (block_is_plain(c, address, size, b)) {
        c->blocks_filtered++;
        return;
    }
    if (mshvstack_on_new_block(c->owner, address, size))
        c->api.cpu_exit(c->cs);
}

/*
 * A block was translated and is about to run for the first time (Unicorn
 * reports it as an edge from the last block run, and so only once a block
 * has run: the engine runs one when it starts).
 */
void mshvstack_edge_hook(void *uc, struct uc_tb *current, struct uc_tb *previous, void *user_data)
{
    (void)uc;
    (void)previous;
    new_block(user_data, current->pc, current->size);
}

/* QEMU's x86 interrupt hook (the same function in every engine). */
static bool (*original_exec_interrupt)(void *cs, int request);

/* The VP thread's engine while it runs (the interrupt hook is called with QEMU's CPU only). */
static __thread struct mshvstack_cpu *entered;

/*
 * QEMU's interrupt hook, wrapped: called from the CPU loop between blocks.
 * Stops first (asked for, or the deadline), then what is pending and
 * deliverable now, then QEMU's own x86 requests.
 */
static bool core_exec_interrupt(void *cs, int request)
{
    struct mshvstack_cpu *c = entered;
    if (c && c->cs == cs) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* the loop cleared its exit flag: read requests after */
        world_stores_landed(c);
        if (world_boundary(c)) {
            world_take_code_events(c);
            return false;   /* the next block is this VP's serial step: nothing before it */
        }
        world_take_code_events(c);
        if (c->reason != REASON_NONE)
            return false;   /* stopping at an instruction a hook reported: nothing may run or be delivered first */
        if (c->stop_request) {
            stop(c, REASON_CANCELLED);
            return false;
        }
        int64_t deadline = c->deadline_ns;
        if (deadline && now_ns() >= deadline) {
            stop(c, REASON_DEADLINE);
            return false;
        }
        if (c->offer_request && __atomic_exchange_n(&c->offer_request, 0, __ATOMIC_ACQ_REL))
            c->pending_vector = mshvstack_on_offer(c->owner);   /* without leaving the engine */
        if (c->pending_vector >= 0 || c->pending_nmi || c->pending_exception >= 0)
            inject(c);   /* does not return when it delivers */
        return c->api.exec_interrupt(cs, request);
    }
    /* not the engine this thread entered (none can be running here): QEMU's own hook */
    return original_exec_interrupt(cs, request);
}

static void *timer_main(void *argument)
{
    struct mshvstack_cpu *c = argument;
    pthread_mutex_lock(&c->timer_lock);
    int64_t fired = 0;   /* the deadline already kicked for */
    while (!c->timer_quit) {
        int64_t deadline = c->deadline_ns;
        if (!deadline || deadline == fired) {
            pthread_cond_wait(&c->timer_cond, &c->timer_lock);   /* woken by a new deadline */
            continue;
        }
        if (now_ns() < deadline) {
            struct timespec at = {(time_t)(deadline / 1000000000), (long)(deadline % 1000000000)};
            pthread_cond_timedwait(&c->timer_cond, &c->timer_lock, &at);
            continue;
        }
        fired = deadline;
        if (c->running)   /* the CPU loop then sees the deadline; a run entered later sees it at once */
            c->api.cpu_exit(c->cs);
    }
    pthread_mutex_unlock(&c->timer_lock);
    return NULL;
}

/* With the timer lock held: a new deadline (the timer thread starts with the first one). */
static void change_deadline(struct mshvstack_cpu *c, int64_t deadline_ns)
{
    c->deadline_ns = deadline_ns;
    if (deadline_ns && !c->timer_started && pthread_create(&c->timer, NULL, timer_main, c) == 0)
        c->timer_started = 1;
    pthread_cond_signal(&c->timer_cond);
}

/* Move the deadline (any thread). */
void mshvstack_set_deadline(struct mshvstack_cpu *c, int64_t deadline_ns)
{
    if (c->deadline_ns == deadline_ns)
        return;
    pthread_mutex_lock(&c->timer_lock);
    change_deadline(c, deadline_ns);
    pthread_mutex_unlock(&c->timer_lock);
}

/* The VP thread is about to run the engine: the interrupt hook is to be called between
 * blocks (the first boundary checks the deadline: one passed while stopped stops it there);
 * the timer thread is woken only when the deadline changed. */
void mshvstack_enter(struct mshvstack_cpu *c, int64_t deadline_ns)
{
    world_enter(c);
    world_take_code_events(c);
    entered = c;
    (*c->api.interrupt_handler)(c->cs, CPU_INTERRUPT_TGT_EXT_0);
    pthread_mutex_lock(&c->timer_lock);
    c->running = 1;
    if (c->deadline_ns != deadline_ns)
        change_deadline(c, deadline_ns);
    pthread_mutex_unlock(&c->timer_lock);
}

void mshvstack_leave(struct mshvstack_cpu *c)
{
    entered = NULL;
    world_leave(c);
    pthread_mutex_lock(&c->timer_lock);
    c->running = 0;
    pthread_mutex_unlock(&c->timer_lock);
}

/* Make a running engine leave its current block (any thread; the timer lock orders it
 * against the run's start and end). */
static void kick_running(struct mshvstack_cpu *c)
{
    pthread_mutex_lock(&c->timer_lock);
    if (c->running)
        c->api.cpu_exit(c->cs);
    pthread_mutex_unlock(&c->timer_lock);
}

/* An interrupt arrived (any thread): at the next block boundary, the Python half says what
 * to offer, and the engine goes on (an IPI to a running VP costs no stop and no new run). */
void mshvstack_offer_soon(struct mshvstack_cpu *c)
{
    __atomic_store_n(&c->offer_request, 1, __ATOMIC_SEQ_CST);
    kick_running(c);
}

/* Stop at the next block boundary (any thread). */
void mshvstack_cancel(struct mshvstack_cpu *c)
{
    c->stop_request = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    kick_running(c);
}

/*
 * Unicorn checks for exit requests after every guest memory access as well
 * as at block starts; one seen after a store restarts the instruction, so
 * a store ran twice (an MMIO write, a locked increment).  Only the block
 * start check is precise: turn the others off with the flag Unicorn keeps
 * for that (uc_struct.no_exit_request).  It is found next to fields whose
 * values are known (uc_priv.h, unicorn 2.1.4): ... bool no_exit_request;
 * bool init_done; sigjmp_buf jmp_bufs[64]; int nested_level;
 * TranslationBlock *last_tb; FlatView *empty_view; uint32_t
 * tcg_buffer_size; ...  Call after a first block ran (last_tb set), before
 * guest code is translated.
 */
int mshvstack_quiet_exit_checks(struct mshvstack_cpu *c, uint32_t tcg_buffer_size)
{
    enum { WORDS = 16384, NESTED = 64 };
    const size_t jump_buffers = NESTED * sizeof(sigjmp_buf);
    uint64_t *w = calloc(WORDS, 8);
    unsigned char *flag = NULL;   /* the first match: others lie past the end of this uc_struct */
    if (!w)
        return -1;
    int words = read_words(w, c->uc, WORDS);
    for (int j = 0; j < words && !flag; j++) {
        size_t t = (size_t)j * 8;
        if ((uint32_t)w[j] != tcg_buffer_size || t < jump_buffers + 32)
            continue;
        unsigned char *base = (unsigned char *)w;
        uint64_t last_tb;
        int nested;
        memcpy(&last_tb, base + t - 16, 8);
        memcpy(&nested, base + t - 24, 4);
        size_t buffers = t - 24 - jump_buffers;
        const unsigned char *bools = base + buffers - 8;   /* hook_insert, first_tb, no_exit_request, init_done */
        if (last_tb && !(last_tb & 7) && nested == 0 && bools[0] == 0 && bools[1] <= 1 && bools[2] == 0 && bools[3] == 1) {
            flag = (unsigned char *)c->uc + buffers - 6;
        }
    }
    free(w);
    if (!flag)
        return -2;
    *flag = 1;
    return 0;
}

/* Leave the block now, from a hook (never a Python frame: this longjmps);
 * Unicorn synced the PC and flags to the instruction before calling it. */
static void leave_block(struct mshvstack_cpu *c)
{
    c->api.loop_exit(c->cs);
}

static struct special_entry *special_slot(struct mshvstack_cpu *c, uint64_t address)
{
    return &c->specials[slot_of(c->specials, sizeof *c->specials, c->specials_mask, address + 1)];
}

static int grow_specials(struct mshvstack_cpu *c)
{
    struct special_entry *fresh = doubled(c->specials, sizeof *c->specials, c->specials_mask);
    if (!fresh)
        return -1;
    free(c->specials);
    c->specials = fresh;
    c->specials_mask = c->specials_mask * 2 + 1;
    return 0;
}

/* What the instruction at a linear address is now, decoded by the Python half at the
 * current code width: its bytes and kind (SPECIAL_KIND_NONE when it is not special);
 * length 0 when it is not known.  0, or -1 out of memory. */
int mshvstack_set_special(struct mshvstack_cpu *c, uint64_t address, int kind, const uint8_t *raw, int length)
{
    if (c->specials_used * 2 >= c->specials_mask && grow_specials(c) < 0)
        return -1;
    struct special_entry *e = special_slot(c, address);
    if (!e->key) {
        e->key = address + 1;
        c->specials_used++;
    }
    e->kind = (uint8_t)kind;
    e->length = (uint8_t)(length < 0 ? 0 : length > (int)sizeof e->raw ? (int)sizeof e->raw : length);
    e->width = code_width(c);
    memset(e->raw, 0, sizeof e->raw);
    memcpy(e->raw, raw, e->length);
    return 0;
}

/* The entry still describes the code at its address: the same bytes, run at the same width. */
static int special_is_current(struct mshvstack_cpu *c, const struct special_entry *e, uint64_t address)
{
    uint8_t code[sizeof e->raw];
    if (!e->length || e->width != code_width(c))
        return 0;
    return c->api.vmem_read(c->uc, address, 4 /* UC_PROT_EXEC */, code, e->length) == 0 &&
           memcmp(code, e->raw, e->length) == 0;
}

static int intercepted_hypercall(const struct mshvstack_cpu *c);   /* x86exits.c: it knows the call codes */

/*
 * A code hook on a special instruction.  What was decoded here is used only
 * while the code here is still what was decoded (hooks stay when code
 * changes, and a block whose own bytes did not change is not scanned again
 * when code it overlaps changed): otherwise the instruction is decoded again
 * first, and when that hooks new instructions the block is left to be
 * translated again from here.  IO is always an intercept: where the VP's
 * pages are attached the core stops and encodes it without Python; the rest
 * the Python half decides.
 */
void mshvstack_special_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct mshvstack_cpu *c = user_data;
    (void)uc;
    (void)size;
    struct special_entry *e = special_slot(c, address);
    if (!e->key)
        return;
    if (!special_is_current(c, e, address)) {
        if (mshvstack_on_new_block(c->owner, address, sizeof e->raw))
            leave_block(c);
        e = special_slot(c, address);   /* the scan may have grown the table */
        if (!e->key || !special_is_current(c, e, address))
            return;   /* not decodable here: let the CPU run it (and fault) */
    }
    if (e->kind == SPECIAL_KIND_NONE || (e->kind == SPECIAL_KIND_MSR && native_msr(c, (uint32_t)c->env->regs[1] /* ECX */)))
        return;
    int encoded = e->kind == SPECIAL_KIND_IO && c->message_page ? REASON_IO
                  : e->kind == SPECIAL_KIND_HYPERCALL && intercepted_hypercall(c) ? REASON_HYPERCALL : REASON_NONE;
    if (encoded != REASON_NONE) {   /* an intercept the core writes itself (x86exits.c) */
        c->stopped_at = *e;
        stop(c, encoded);
        leave_block(c);
    }
    int action = mshvstack_on_special(c->owner, address);
    if (action == SPECIAL_CONTINUE)
        return;
    if (action == SPECIAL_STOP)
        stop(c, REASON_ENGINE);
    else
        c->env->eip = c->resume_rip;
    leave_block(c);
}

/*
 * The MSRs RDMSR/WRMSR may reach without the Python half: those QEMU's x86
 * implements itself (FS_BASE, KERNEL_GS_BASE, ... which Linux writes at every
 * context switch) that no intercept asks for.  -1: more than the table holds.
 */
int mshvstack_set_native_msrs(struct mshvstack_cpu *c, const uint32_t *msrs, int count, uint32_t range_first, uint32_t range_last)
{
    if (count < 0 || count > MAX_NATIVE_MSRS)
        return -1;
    memcpy(c->native_msrs, msrs, (size_t)count * sizeof *msrs);
    c->native_msr_count = count;
    c->native_range_first = range_first;
    c->native_range_last = range_last;
    return 0;
}

static int native_msr(const struct mshvstack_cpu *c, uint32_t index)
{
    if (index >= c->native_range_first && index <= c->native_range_last)
        return 1;
    for (int i = 0; i < c->native_msr_count; i++)
        if (c->native_msrs[i] == index)
            return 1;
    return 0;
}

int mshvstack_hook_special(struct mshvstack_cpu *c, uint64_t address)
{
    size_t h;
    return c->api.hook_add(c->uc, &h, c->code_hook_type, (void *)mshvstack_special_hook, c, address, address);
}

/* An unmapped or protected access: recorded by the Python half, then a stop at the instruction. */
bool mshvstack_memory_hook(void *uc, int access, uint64_t address, int size, int64_t value, void *user_data)
{
    struct mshvstack_cpu *c = user_data;
    (void)uc;
    mshvstack_on_memory_fault(c->owner, access, address, size, value);
    stop(c, REASON_ENGINE);
    leave_block(c);
    return false;
}

/*
 * Guest stores must drop the translations of the code they overwrite.
 * Unicorn (2.1.4) checks a store for code only through a TLB entry marked
 * not dirty: every entry starts so, but the first store through an entry
 * that cannot fetch (a no-execute mapping: Linux writes module code, and
 * anything through its direct map, so) drops only the translations of the
 * bytes it wrote and then marks the entry dirty, and making a page code
 * does not clear the marks (tlb_protect_code does nothing).  So a page
 * copied over code through such a mapping kept its other translations, and
 * the old code ran where it had run before (Linux: a freed module's init
 * code ran for the module loaded at its address).  Unicorn never marks an
 * entry dirty while a memory hook covers its page: every guest page with
 * translated code gets one (fetch from unmapped memory, which never fires
 * on RAM; the memory-fault handler if it does), and the marks of the
 * entries already dirty for it are cleared.  Only runs of adjacent code
 * pages share a hook (GUARD_GAP 0).  Ranges closer than 16 pages were
 * merged once, for fewer hooks to walk when a store first goes through an
 * entry (a Debian boot: 1583 code pages in 397 runs, 27 ranges), but every
 * store to a data page in a gap then took the checked path for good, and
 * which busy pages (a stack, a buffer) Linux placed in gaps was chance: the
 * same guest loop ran at 1.2 s or 28 s, a disk mode 2 to 5 times slower
 * (benchmarks/linux_disk.py, about 30 boots); with no gaps and retired
 * code pages (x86parallel.c), one mode in 16 boots ran 1.45 times its
 * median.  Stores to other pages stay at host speed.  Called for
 * each guest page the first time code on it is scanned (host: where its
 * bytes are); 0, or -1 (out of memory, or Unicorn refused the hook).
 */
#define GUARD_HOOK_TYPE (1 << 6)   /* UC_HOOK_MEM_FETCH_UNMAPPED (unicorn.h) */
#ifndef GUARD_GAP
#define GUARD_GAP 0ULL
#endif

/* Room for one more guard range; -1: out of memory. */
static int guard_room(struct mshvstack_cpu *c)
{
    if (c->guard_count < c->guard_capacity)
        return 0;
    int capacity = c->guard_capacity ? 2 * c->guard_capacity : 64;
    struct code_guard *fresh = realloc(c->guards, (size_t)capacity * sizeof *fresh);
    if (!fresh)
        return -1;
    c->guards = fresh;
    c->guard_capacity = capacity;
    return 0;
}

/* Hook [from, to] (room made first); -1: Unicorn refused the hook. */
static int add_guard_range(struct mshvstack_cpu *c, uint64_t from, uint64_t to)
{
    size_t h;
    if (c->api.hook_add(c->uc, &h, GUARD_HOOK_TYPE, (void *)mshvstack_memory_hook, c, from, to) != 0)
        return -1;
    c->guards[c->guard_count++] = (struct code_guard){from, to, h};
    return 0;
}

static int guard_page(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host)
{
    uint64_t begin = gpa & ~0xFFFULL, end = begin + 0xFFF;
    int touching[2], count = 0;
    for (int i = 0; i < c->guard_count; i++) {
        const struct code_guard *g = &c->guards[i];
        if (begin >= g->begin && end <= g->end) {
            /* In a range already (a gap merged into it): entries marked before may remain. */
            c->api.tlb_reset_dirty(c->cs, host & ~0xFFFULL, 0x1000);
            return 0;
        }
        if (begin <= g->end + 1 + GUARD_GAP && g->begin <= end + 1 + GUARD_GAP && count < 2)
            touching[count++] = i;   /* merged with it: at most one range on each side */
    }
    uint64_t from = begin, to = end;
    for (int k = 0; k < count; k++) {
        const struct code_guard *g = &c->guards[touching[k]];
        from = g->begin < from ? g->begin : from;
        to = g->end > to ? g->end : to;
    }
    if (guard_room(c) != 0 || add_guard_range(c, from, to) != 0)
        return -1;
    for (int k = count - 1; k >= 0; k--) {   /* the higher index first: removal moves the last range */
        int i = touching[k];
        c->api.hook_del(c->uc, c->guards[i].hook);
        c->guards[i] = c->guards[--c->guard_count];
    }
    c->api.tlb_reset_dirty(c->cs, host & ~0xFFFULL, 0x1000);
    return 0;
}

/*
 * Lift the guard over guest page `gpa` (it holds no translated code now:
 * x86parallel.c's retire_code_page): the range holding it is split around
 * it, so stores to it become plain host stores again.  Between blocks only.
 * 0, or -1 (out of memory, or Unicorn refused a hook: the caller drops
 * every translation, so no code is left unguarded).
 */
static int unguard_page(struct mshvstack_cpu *c, uint64_t gpa)
{
    uint64_t page = gpa & ~0xFFFULL;
    for (int i = 0; i < c->guard_count; i++) {
        struct code_guard g = c->guards[i];
        if (page < g.begin || page > g.end)
            continue;
        c->api.hook_del(c->uc, g.hook);
        c->guards[i] = c->guards[--c->guard_count];
        int failed = 0;
        if (g.begin < page)
            failed |= guard_room(c) != 0 || add_guard_range(c, g.begin, page - 1) != 0;
        if (page + 0xFFF < g.end)
            failed |= guard_room(c) != 0 || add_guard_range(c, page + 0x1000, g.end) != 0;
        return failed ? -1 : 0;
    }
    return 0;
}

/* Room to remember one more retired page (until code is translated there again); -1: out of memory. */
static int retired_room(struct mshvstack_cpu *c)
{
    if (c->retired_count < c->retired_capacity)
        return 0;
    int capacity = c->retired_capacity ? 2 * c->retired_capacity : 64;
    uint64_t *fresh = realloc(c->retired, (size_t)capacity * sizeof *fresh);
    if (!fresh)
        return -1;
    c->retired = fresh;
    c->retired_capacity = capacity;
    return 0;
}

/*
 * A new block is about to run: a page of it that was retired is guarded
 * again first.  Here, not in the Python half's scan: a block whose code was
 * scanned before is not shown to it again.  0, or -1 (no guard: the caller
 * drops every translation).
 */
static int reguard_retired(struct mshvstack_cpu *c, const struct block_code *b)
{
    for (int i = 0; i < b->pages && c->retired_count; i++)
        for (int k = 0; k < c->retired_count; k++) {
            if (c->retired[k] != b->gpas[i])
                continue;
            uint64_t host = ram_host(c, b->gpas[i]);
            if (host && guard_page(c, b->gpas[i], host) != 0)
                return -1;   /* still listed: guarded at its next new block */
            c->retired[k] = c->retired[--c->retired_count];
            break;
        }
    return 0;
}

/* Guard a page this engine translated code on, here and (x86parallel.c) in every other engine. */
int mshvstack_guard_code(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host)
{
    if (guard_page(c, gpa, host) != 0)
        return -1;
    return world_guard_everywhere(c, gpa, host);
}

/* An exception raised by guest code (or injected): intercept it or deliver it. */
void mshvstack_intr_hook(void *uc, uint32_t intno, void *user_data)
{
    struct mshvstack_cpu *c = user_data;
    (void)uc;
    if (intno < 32 && (c->intercepted_exceptions >> intno) & 1) {
        c->vector = (int)intno;
        c->error_code = c->error_code_offset ? *(uint32_t *)((char *)c->env + c->error_code_offset) : 0;
        stop(c, REASON_EXCEPTION);
        return;
    }
    c->api.do_interrupt(c->cs);
}

/* #UD: Unicorn reports it here rather than as an exception. */
int mshvstack_invalid_hook(void *uc, void *user_data)
{
    struct mshvstack_cpu *c = user_data;
    (void)uc;
    if ((c->intercepted_exceptions >> EXCP_UD) & 1) {
        c->vector = EXCP_UD;
        c->error_code = 0;
        stop(c, REASON_EXCEPTION);
        return 1;
    }
    /* cs->exception_index is #UD here: deliver it (a fault while delivering longjmps on). */
    c->api.do_interrupt(c->cs);
    return 1;
}

static uint64_t read_msr(struct mshvstack_cpu *c, uint32_t index)
{
    struct { uint32_t rid; uint64_t value; } msr = {index, 0};
    c->api.reg_read(c->uc, c->reg_msr, &msr);
    return msr.value;
}

static void load_segment(struct mshvstack_cpu *c, int index, uint32_t selector, uint32_t flags)
{
    struct qemu_segment *s = &c->env->segs[index];
    s->selector = selector;
    s->base = 0;
    s->limit = 0xFFFFFFFF;
    s->flags = flags;
}

/*
 * Unicorn loads written flags into CC_SRC but leaves QEMU's lazy-flags
 * operation (cc_op) as it was, so the flags read back later are computed
 * from the wrong operation: say that CC_SRC now holds the flags themselves.
 */
void mshvstack_set_rflags(struct mshvstack_cpu *c, uint64_t value)
{
    c->api.reg_write(c->uc, c->reg_eflags, &value);
    c->env->cc_op = CC_OP_EFLAGS;
}

/*
 * SYSCALL.  Unicorn replaced QEMU's implementation with a hook call, so
 * the architectural behaviour (SDM vol. 2B) is done here: RCX/R11 saved,
 * flat CPL0 CS/SS from STAR, RFLAGS masked, RIP from LSTAR (CSTAR from
 * compatibility mode).  Called with the PC at the instruction.
 */
void mshvstack_syscall_hook(void *uc, void *user_data)
{
    struct mshvstack_cpu *c = user_data;
    struct qemu_x86_head *env = c->env;
    uint8_t code[15];
    unsigned length = 0;
    uint64_t rflags = 0;
    (void)uc;
    if (!(env->efer & EFER_SCE))
        c->api.raise_exception_err(env, EXCP_UD, 0);
    /* Instruction length: legacy and REX prefixes, then 0f 05. */
    memset(code, 0, sizeof code);
    {
        uint64_t linear = env->segs[1].base + env->eip;
        if (c->api.vmem_read(c->uc, linear, 4 /* UC_PROT_EXEC */, code, sizeof code) != 0)
            c->api.vmem_read(c->uc, linear, 4, code, 2);
    }
    while (length < 13 && (code[length] == 0x66 || code[length] == 0x67 || code[length] == 0xF2 || code[length] == 0xF3 ||
                           code[length] == 0x2E || code[length] == 0x36 || code[length] == 0x3E || code[length] == 0x26 ||
                           code[length] == 0x64 || code[length] == 0x65 || (code[length] & 0xF0) == 0x40))
        length++;
    length += 2;
    c->api.reg_read(c->uc, c->reg_eflags, &rflags);
    uint64_t star = read_msr(c, MSR_STAR);
    uint32_t selector = (uint32_t)(star >> 32) & 0xFFFC;
    uint64_t next = env->eip + length;
    if (env->hflags & HF_LMA) {
        int from64 = (env->hflags & HF_CS64) != 0;
        env->regs[1] = next;          /* RCX */
        env->regs[11] = rflags;       /* R11 */
        load_segment(c, 1, selector, DESC_G | DESC_P | DESC_S | DESC_CODE | DESC_W | DESC_A | DESC_L);
        load_segment(c, 2, selector + 8, DESC_G | DESC_B | DESC_P | DESC_S | DESC_W | DESC_A);
        rflags &= ~read_msr(c, MSR_FMASK);
        env->eip = from64 ? read_msr(c, MSR_LSTAR) : read_msr(c, MSR_CSTAR);
    } else {
        env->regs[1] = (uint32_t)next;
        load_segment(c, 1, selector, DESC_G | DESC_B | DESC_P | DESC_S | DESC_CODE | DESC_W | DESC_A);
        load_segment(c, 2, selector + 8, DESC_G | DESC_B | DESC_P | DESC_S | DESC_W | DESC_A);
        rflags &= ~((1u << 9) | (1u << 17));  /* IF, VM */
        env->eip = (uint32_t)star;
    }
    rflags &= ~(uint64_t)RFLAGS_RF;
    mshvstack_set_rflags(c, rflags);
    c->api.update_hflags(env);
    c->api.loop_exit(c->cs);  /* leave the helper: it would add the instruction length again */
}

/* ---- state the public API does not reach ---- */

struct mshvstack_segment {
    uint64_t base;
    uint32_t limit;
    uint32_t selector;
    uint32_t flags;   /* QEMU's descriptor flags (descriptor bits 8-23) */
};

/* index: 0-5 ES CS SS DS FS GS, 6 LDTR, 7 TR, 8 GDTR, 9 IDTR */
static struct qemu_segment *segment_at(struct mshvstack_cpu *c, int index)
{
    struct qemu_x86_head *env = c->env;
    if (index < 6)
        return &env->segs[index];
    switch (index) {
    case 6: return &env->ldt;
    case 7: return &env->tr;
    case 8: return &env->gdt;
    default: return &env->idt;
    }
}

void mshvstack_get_segment(struct mshvstack_cpu *c, int index, struct mshvstack_segment *out)
{
    struct qemu_segment *s = segment_at(c, index);
    out->base = s->base;
    out->limit = s->limit;
    out->selector = s->selector;
    out->flags = s->flags;
}

void mshvstack_set_segment(struct mshvstack_cpu *c, int index, const struct mshvstack_segment *in)
{
    struct qemu_segment *s = segment_at(c, index);
    s->base = in->base;
    s->limit = in->limit;
    s->selector = in->selector;
    s->flags = in->flags;
    c->api.update_hflags(c->env);
}

/* Guest code at a linear address through the guest's own page tables (no fault is raised):
 * the bytes up to the first page that does not translate; returns how many. */
size_t mshvstack_read_code(struct mshvstack_cpu *c, uint64_t linear, uint8_t *out, size_t size)
{
    size_t done = 0;
    while (done < size) {
        size_t n = 0x1000 - ((linear + done) & 0xFFF);
        if (n > size - done)
            n = size - done;
        if (c->api.vmem_read(c->uc, linear + done, 4 /* UC_PROT_EXEC */, out + done, n) != 0)
            break;
        done += n;
    }
    return done;
}

/* The guest-physical address of a linear one (no fault); 0 when it does not translate. */
int mshvstack_translate(struct mshvstack_cpu *c, uint64_t linear, uint64_t *gpa)
{
    return c->api.vmem_translate(c->uc, linear, 4 /* UC_PROT_EXEC */, gpa) == 0;
}

/* The first tracked code page whose bytes differ from those saved at translation (-1: none).
 * Host memory of mapped regions only: the engine drops a region's pages when it is unmapped. */
static int mshvstack_first_changed_page(const uint64_t *addresses, const uint8_t *saved, int count, uint64_t page_size)
{
    for (int i = 0; i < count; i++)
        if (memcmp((const void *)(uintptr_t)addresses[i], saved + (uint64_t)i * page_size, page_size) != 0)
            return i;
    return -1;
}

/* One plain register through Unicorn's own uc_reg_read and uc_reg_write (their side
 * effects included: a control register recomputes the mode, RIP inside a hook restarts
 * there), without the Python binding's per-call cost, which a hypercall's handling pays
 * several times. */
uint64_t mshvstack_read_register(struct mshvstack_cpu *c, int id)
{
    uint64_t value = 0;
    c->api.reg_read(c->uc, id, &value);
    return value;
}

void mshvstack_write_register(struct mshvstack_cpu *c, int id, uint64_t value)
{
    c->api.reg_write(c->uc, id, &value);
}

/* Many registers in one call from Python: the VP's snapshot after every stop. */
void mshvstack_read_registers(struct mshvstack_cpu *c, const int *ids, uint64_t *values, int count)
{
    for (int i = 0; i < count; i++)
        values[i] = mshvstack_read_register(c, ids[i]);
}

uint64_t mshvstack_get_efer(struct mshvstack_cpu *c)
{
    return c->env->efer;
}

/* EFER as the VMM sets it, LMA included (WRMSR cannot set LMA). */
void mshvstack_set_efer(struct mshvstack_cpu *c, uint64_t value)
{
    c->env->efer = value;
    c->api.update_hflags(c->env);
    c->api.tlb_flush(c->cs);
}

/* The guest's TSC as RDTSC returns it (Unicorn's RDMSR of IA32_TSC reads 0). */
uint64_t mshvstack_tsc(struct mshvstack_cpu *c)
{
    return c->api.get_tsc(c->env);
}

/* The host's TSC, which is what the guest's RDTSC reads under Unicorn. */
uint64_t mshvstack_host_tsc(void)
{
    return __builtin_ia32_rdtsc();
}

uint32_t mshvstack_hflags(struct mshvstack_cpu *c)
{
    return c->env->hflags;
}

int mshvstack_interrupt_shadow(struct mshvstack_cpu *c)
{
    return (c->env->hflags & HF_INHIBIT_IRQ) != 0;
}

/* An emulated instruction completed: a STI/MOV SS shadow ends with it. */
void mshvstack_end_interrupt_shadow(struct mshvstack_cpu *c)
{
    c->env->hflags &= ~HF_INHIBIT_IRQ;
}

int mshvstack_nmi_blocked(struct mshvstack_cpu *c)
{
    return (c->env->hflags2 & HF2_NMI_MASK) != 0;
}

void mshvstack_set_nmi_blocked(struct mshvstack_cpu *c, int blocked)
{
    if (blocked)
        c->env->hflags2 |= HF2_NMI_MASK;
    else
        c->env->hflags2 &= ~HF2_NMI_MASK;
}

/*
 * Where memory faults are hooked: each [begin, end] pair (inclusive), the
 * guest-physical ranges that are not plain RAM (unmapped, MMIO, or mapped
 * with less than read/write/execute somewhere).  Why not everywhere:
 * Unicorn never marks a page's TLB entry dirty while a memory hook covers
 * the page, so every store to it takes the slow path (an address-space
 * lookup and a translated-code check per store); over plain RAM a store is
 * a plain host store.  So the CPU's TLB is flushed here too: an entry made
 * fast while its page was plain RAM must not outlive the page's protection,
 * whatever Unicorn's own protection change flushes.
 * Called whenever the mapping changed, before the next run.  0, or -1 for
 * too many ranges (none are hooked then).
 */
int mshvstack_memory_fault_ranges(struct mshvstack_cpu *c, const uint64_t *bounds, int count)
{
    for (int i = 0; i < c->fault_hook_count; i++)
        c->api.hook_del(c->uc, c->fault_hooks[i]);
    c->fault_hook_count = 0;
    c->api.tlb_flush(c->cs);
    if (count > MAX_FAULT_RANGES)
        return -1;
    for (int i = 0; i < count; i++) {
        size_t h;
        if (c->api.hook_add(c->uc, &h, c->memory_fault_types, (void *)mshvstack_memory_hook, c,
                            bounds[2 * i], bounds[2 * i + 1]) != 0)
            return -1;
        c->fault_hooks[c->fault_hook_count++] = h;
    }
    return 0;
}

/* Install the hooks, all in C (none of them may be a Python frame: they can longjmp). */
int mshvstack_cpu_hooks(struct mshvstack_cpu *c, int edge_type, int intr_type, int invalid_type, int insn_type,
                        int syscall_insn, int code_type, int memory_fault_types)
{
    size_t h;
    c->code_hook_type = code_type;
    c->memory_fault_types = memory_fault_types;
    if (mshvstack_memory_fault_ranges(c, (const uint64_t[]){0, UINT64_MAX}, 1) != 0)
        return -5;
    if (c->api.hook_add(c->uc, &h, edge_type, (void *)mshvstack_edge_hook, c, 1, 0) != 0)
        return -1;
    if (c->api.hook_add(c->uc, &h, intr_type, (void *)mshvstack_intr_hook, c, 1, 0) != 0)
        return -2;
    if (c->api.hook_add(c->uc, &h, invalid_type, (void *)mshvstack_invalid_hook, c, 1, 0) != 0)
        return -3;
    if (c->api.hook_add(c->uc, &h, insn_type, (void *)mshvstack_syscall_hook, c, 1, 0, syscall_insn) != 0)
        return -4;
    original_exec_interrupt = c->api.exec_interrupt;
    *c->exec_interrupt_slot = core_exec_interrupt;
    return 0;
}
