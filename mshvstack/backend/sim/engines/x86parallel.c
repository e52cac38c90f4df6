/*
 * VPs that run in parallel, exactly: the partition's engines as one SMP machine.
 *
 * Each VP is its own Unicorn instance on its own host thread, all over the
 * same host memory.  Unicorn builds QEMU's TCG with its parallel mode
 * compiled in but never selected (curr_cflags() is 0), so a locked
 * read-modify-write is translated as a plain load and store: another VP's
 * update in between is lost, and a failed cmpxchg even stores the old value
 * back over another VP's plain store.  QEMU's parallel mode (CF_PARALLEL in
 * the TB being translated) turns every locked instruction, XCHG with memory
 * and CMPXCHG8B/16B into a host atomic, and MFENCE/locked instructions into
 * host barriers; x86 hosts keep the rest of x86-TSO by themselves.
 *
 * So the core wraps two of the x86 translator's hooks (i386_tr_ops, found
 * through the library's symbol table): the first marks each block being
 * translated for one of our engines as parallel, in the TCG context and
 * the TB, the second clears the TB's mark again after translation, so the
 * block is looked up as Unicorn expects (its lookups never ask for
 * CF_PARALLEL).
 *
 * What a host atomic cannot do (QEMU's "stop the world" cases: an atomic
 * that is misaligned, or that reaches MMIO or an unmapped GPA) raises
 * EXCP_ATOMIC.  Unicorn 2.1.4 has no handler for it (its loop would retry the
 * instruction forever), so the core wraps the engine's stop_interrupt hook,
 * which sees every exception index, and runs the instruction alone: every
 * other VP of the partition parks at its next block boundary (the "world"
 * below), and the instruction runs in a one-instruction serial block
 * (count 1, CF_LAST_IO as a private hash class: nothing else asks for it,
 * so a serial block is never found by a parallel lookup).  The next block
 * boundary releases the others.
 */

#define CF_COUNT_MASK 0x00007fff
#define CF_LAST_IO 0x00008000
#define CF_NOCACHE 0x00010000
#define CF_PARALLEL 0x00080000
#define EXCP_ATOMIC 0x10005

/* QEMU's TranslationBlock head (include/exec/exec-all.h, unicorn 2.1.4). */
struct qemu_tb {
    uint64_t pc;
    uint64_t cs_base;
    uint32_t flags;
    uint16_t size;
    uint16_t icount;
    uint32_t cflags;
    uint32_t trace_vcpu_dstate;
    void *tc_ptr;
};

/* QEMU's DisasContextBase head (include/exec/translator.h): the TB, its first PC, and the
 * PC of the instruction translate_insn is about to decode (all linear: CS base + EIP). */
struct qemu_disas_base {
    struct qemu_tb *tb;
    uint64_t pc_first;
    uint64_t pc_next;
};

/* TCGContext (include/tcg/tcg.h): where the current TB's cflags and the code pointer live. */
#define TCG_TB_CFLAGS 100
#define TCG_CODE_GEN_PTR 192
/* CPUState (include/hw/core/cpu.h) */
#define CPU_CFLAGS_NEXT_TB 24
#define CPU_ENV_PTR 296

struct mshvstack_library {
    void *tr_ops;               /* i386_tr_ops: TranslatorOps, init_disas_context first, tb_stop sixth */
    void *init_disas_context;   /* i386_tr_init_disas_context */
    void *tb_stop;              /* i386_tr_tb_stop */
    void *translate_insn;       /* i386_tr_translate_insn */
    void *notdirty_write;       /* notdirty_write (cputlb.c; its .isra.0 clone) */
    void *stop_interrupt;       /* x86_stop_interrupt */
    void *xchg[4];              /* helper_atomic_xchg{b,w_le,l_le,q_le} */
    void *cmpxchg_mmu[4];       /* helper_atomic_cmpxchg{b,w_le,l_le,q_le}_mmu */
    void *code[6];              /* enum code_function */
};

/* Unicorn's functions over translated code by RAM address (exported). */
enum code_function {
    CODE_INVALIDATE_PAGE_FAST = 0,   /* tb_invalidate_phys_page_fast: a store hit a page with code */
    CODE_INVALIDATE_RANGE = 1,       /* tb_invalidate_phys_range */
    CODE_MAP_RAM_PTR = 2,            /* qemu_map_ram_ptr: RAM address -> host address */
    CODE_RAM_ADDR_FROM_HOST = 3,     /* qemu_ram_addr_from_host */
    CODE_TB_FLUSH = 4,               /* tb_flush */
    CODE_LOOP_EXIT_ATOMIC = 5,       /* cpu_loop_exit_atomic */
};
typedef void (*invalidate_fast_fn)(void *uc, void *pages, uint64_t start, int len, uintptr_t retaddr);
static invalidate_fast_fn original_invalidate_fast;   /* the trampoline: its first instructions, then a jump back */
static void (*invalidate_range)(void *uc, uint64_t start, uint64_t end);
static void *(*map_ram_ptr)(void *uc, void *block, uint64_t addr);
static uint64_t (*ram_addr_from_host)(void *uc, void *host);
static void (*tb_flush)(void *cpu);
static void (*loop_exit_atomic)(void *cpu, uintptr_t retaddr);   /* cpu_loop_exit_atomic: raise EXCP_ATOMIC */
#define RAM_ADDR_INVALID UINT64_MAX

/*
 * Unicorn's XCHG helpers are a plain load and a plain store (its
 * atomic_template.h, even in parallel mode), so an XCHG spinlock loses a
 * release stored between them and deadlocks.  The core sends them to its
 * own XCHG, a compare-and-exchange loop over Unicorn's atomic CMPXCHG
 * (which also does the guest's TLB lookup, faults and dirty tracking).
 * Entered by a jump from the helper's first bytes, so the return address
 * is the generated code's, as the lookup needs to restore the guest state.
 */
typedef uint64_t (*cmpxchg_mmu_fn)(void *env, uint64_t addr, uint64_t cmp, uint64_t value, uint32_t oi, uintptr_t ra);
static cmpxchg_mmu_fn cmpxchg_mmu[4];

#define ATOMIC_XCHG(name, index, width_mask)                                                         \
    __attribute__((noinline)) static uint64_t name(void *env, uint64_t addr, uint64_t value, uint32_t oi) \
    {                                                                                                \
        uintptr_t ra = (uintptr_t)__builtin_return_address(0);                                      \
        uint64_t seen = 0;                                                                           \
        value &= (width_mask);                                                                       \
        for (;;) {                                                                                   \
            uint64_t old = cmpxchg_mmu[index](env, addr, seen, value, oi, ra) & (width_mask);        \
            if (old == seen)                                                                         \
                return old;                                                                          \
            seen = old;                                                                              \
        }                                                                                            \
    }
ATOMIC_XCHG(atomic_xchg8, 0, 0xFFull)
ATOMIC_XCHG(atomic_xchg16, 1, 0xFFFFull)
ATOMIC_XCHG(atomic_xchg32, 2, 0xFFFFFFFFull)
ATOMIC_XCHG(atomic_xchg64, 3, ~0ull)
#undef ATOMIC_XCHG

/* Make a function jump to another: movabs $target, %rax; jmp *%rax (rax is free at a call). */
static int redirect(void *function, void *target)
{
    unsigned char code[12] = {0x48, 0xB8};
    uint64_t address = (uint64_t)(uintptr_t)target;
    memcpy(code + 2, &address, 8);
    code[10] = 0xFF;
    code[11] = 0xE0;
    if (memcmp(function, code, sizeof code) == 0)
        return 0;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)function & ~(uintptr_t)(page - 1);
    size_t length = (uintptr_t)function + sizeof code - start;
    if (mprotect((void *)start, length, PROT_READ | PROT_WRITE | PROT_EXEC) != 0)
        return -1;
    memcpy(function, code, sizeof code);
    __builtin___clear_cache((char *)function, (char *)function + sizeof code);
    return mprotect((void *)start, length, PROT_READ | PROT_EXEC);
}

/*
 * Wrap a function whose first instructions are known: a trampoline runs
 * them, then jumps to the rest of the function, and the function's start
 * jumps to the wrapper.  The bytes are checked (they must be the whole,
 * position-independent instructions named), so another build is refused.
 */
static void *trampoline(void *function, const unsigned char *prologue, size_t length)
{
    if (memcmp(function, prologue, length) != 0)
        return NULL;
    unsigned char *code = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED)
        return NULL;
    static const unsigned char jump[6] = {0xFF, 0x25, 0, 0, 0, 0};   /* jmp *0(%rip), the address after it */
    uint64_t rest = (uint64_t)(uintptr_t)function + length;
    memcpy(code, prologue, length);
    memcpy(code + length, jump, sizeof jump);
    memcpy(code + length + sizeof jump, &rest, 8);
    if (mprotect(code, 64, PROT_READ | PROT_EXEC) != 0)
        return NULL;
    return code;
}

/* tb_invalidate_phys_page_fast's first instructions in unicorn 2.1.4's x86_64 build:
 * push %r15; push %r14; mov %r8,%r14; push %r13; mov %rsi,%r13 (12 bytes, as redirect() needs). */
static const unsigned char invalidate_fast_prologue[12] = {0x41, 0x57, 0x41, 0x56, 0x4D, 0x89, 0xC6,
                                                           0x41, 0x55, 0x49, 0x89, 0xF5};

static void core_invalidate_page_fast(void *uc, void *pages, uint64_t start, int len, uintptr_t retaddr);

static int wrap_code_checks(const struct mshvstack_library *lib)
{
    for (int i = 0; i < 6; i++)
        if (!lib->code[i])
            return -1;
    loop_exit_atomic = (void (*)(void *, uintptr_t))lib->code[CODE_LOOP_EXIT_ATOMIC];
    invalidate_range = (void (*)(void *, uint64_t, uint64_t))lib->code[CODE_INVALIDATE_RANGE];
    map_ram_ptr = (void *(*)(void *, void *, uint64_t))lib->code[CODE_MAP_RAM_PTR];
    ram_addr_from_host = (uint64_t (*)(void *, void *))lib->code[CODE_RAM_ADDR_FROM_HOST];
    tb_flush = (void (*)(void *))lib->code[CODE_TB_FLUSH];
    void *fast = lib->code[CODE_INVALIDATE_PAGE_FAST];
    void *through = trampoline(fast, invalidate_fast_prologue, sizeof invalidate_fast_prologue);
    if (!through)
        return -2;
    original_invalidate_fast = (invalidate_fast_fn)through;
    return redirect(fast, (void *)core_invalidate_page_fast) == 0 ? 0 : -3;
}

/* TranslatorOps (include/exec/translator.h): init_disas_context, tb_start, insn_start,
 * breakpoint_check, translate_insn, tb_stop, pc_sync. */
/*
 * Stores through executable mappings at host speed.  Unicorn's
 * notdirty_write (cputlb.c), where a store through a TLB entry still marked
 * "not dirty" goes, marks the entry dirty (later stores: plain host stores)
 * only when the entry cannot fetch (addr_code == -1) and no memory hook
 * covers the page.  Linux maps its own image (text, data, bss, the boot
 * stack) executable until the end of boot, so every store to a kernel
 * variable took that slow path for good: the profile's largest item after
 * the new-block scan.  The core keeps code coherent without that test: a
 * page with translated code is guarded by a memory hook in every engine
 * (x86core.c, guard_page), which keeps every entry for it "not dirty", and
 * guarding clears the marks of entries already dirty for the page.  No
 * engine trusts code it read from a page before every other engine guards
 * it and has passed a block boundary since (world_claim_code, below), so a
 * store through an entry marked dirty before is never missed.  So the test
 * is dropped: the conditional jump
 * after `cmpq $-1, 0x10(%rbp)` (addr_code, CPUTLBEntry's third word) becomes
 * unconditional, on to the hook check and tlb_set_dirty.  The bytes are
 * checked (unicorn 2.1.4's x86_64 build), else the engine refuses to start.
 */
static const unsigned char addr_code_test[6] = {0x48, 0x83, 0x7D, 0x10, 0xFF, 0x74};   /* cmpq $-1,0x10(%rbp); je */

static int fast_stores_through_code_mappings(void *notdirty)
{
    enum { SEARCH = 256 };
    unsigned char *code = notdirty, *at = NULL;
    if (!code)
        return -1;
    for (int i = 0; i + (int)sizeof addr_code_test + 1 <= SEARCH; i++) {
        int patched = memcmp(code + i, addr_code_test, sizeof addr_code_test - 1) == 0 && code[i + 5] == 0xEB;
        if (memcmp(code + i, addr_code_test, sizeof addr_code_test) == 0 || patched) {
            if (at)
                return -2;   /* not the one function this was written for */
            at = code + i + 5;
        }
    }
    if (!at)
        return -3;
    if (*at == 0xEB)
        return 0;   /* done by an earlier engine */
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)at & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, (size_t)page, PROT_READ | PROT_WRITE | PROT_EXEC) != 0)
        return -4;
    *at = 0xEB;   /* je rel8 -> jmp rel8, same target */
    __builtin___clear_cache((char *)at, (char *)at + 1);
    return mprotect((void *)start, (size_t)page, PROT_READ | PROT_EXEC) == 0 ? 0 : -4;
}

enum { OPS_INIT_DISAS = 0, OPS_TRANSLATE_INSN = 4, OPS_TB_STOP = 5, OPS_COUNT = 7 };

static void (*original_init_disas)(void *db, void *cpu);
static void (*original_translate_insn)(void *db, void *cpu);
static void (*original_tb_stop)(void *db, void *cpu);
static bool (*original_stop_interrupt)(void *uc, int intno);

static void post_locked(struct mshvstack_cpu *c, struct code_event event);
static void storing_locked(struct mshvstack_cpu *c, uint64_t page);
static void stores_landed_locked(struct mshvstack_cpu *c);

/* ---- the world: who runs; one VP at a time may run alone ---- */

/* Boundaries the loop may pass between a block dropped to be translated alone and its translation. */
#define ALONE_BOUNDARIES 4


#ifndef CODE_OWNER_SLOTS
#define CODE_OWNER_SLOTS (1u << 16)   /* 256 MiB of guest code pages before code_full */
#endif

void mshvstack_world_init(struct mshvstack_world *w)
{
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->changed, NULL);
    w->code = calloc(CODE_OWNER_SLOTS, sizeof *w->code);
    w->code_mask = CODE_OWNER_SLOTS - 1;
    w->code_full = w->code == NULL;
}

void mshvstack_world_destroy(struct mshvstack_world *w)
{
    pthread_cond_destroy(&w->changed);
    pthread_mutex_destroy(&w->lock);
    free(w->members);
    w->members = NULL;
    free(w->code);
    w->code = NULL;
}

static int world_join(struct mshvstack_world *w, struct mshvstack_cpu *c)
{
    pthread_mutex_lock(&w->lock);
    if (w->count == w->capacity) {
        int capacity = w->capacity ? w->capacity * 2 : 8;
        struct mshvstack_cpu **members = realloc(w->members, (size_t)capacity * sizeof *members);
        if (!members) {
            pthread_mutex_unlock(&w->lock);
            return -1;
        }
        w->members = members;
        w->capacity = capacity;
    }
    w->members[w->count++] = c;
    c->world = w;
    c->world_index = (int)(w->next_bit++ % WORLD_BITS);   /* shared past 64 engines: more events, never fewer */
    c->world_bit = 1ULL << c->world_index;
    for (uint64_t i = 0; w->code && i <= w->code_mask; i++)   /* code the others translated already */
        if (w->code[i].host)
            post_locked(c, (struct code_event){w->code[i].host, w->code[i].gpa, 0x1000, CODE_EVENT_GUARD});
    pthread_mutex_unlock(&w->lock);
    return 0;
}

static void world_forget(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w)
        return;
    pthread_mutex_lock(&w->lock);
    for (int i = 0; i < w->count; i++)
        if (w->members[i] == c) {
            w->members[i] = w->members[--w->count];
            break;
        }
    c->world = NULL;
    free(c->events);
    c->events = NULL;
    c->event_count = c->event_capacity = 0;
    pthread_mutex_unlock(&w->lock);
}

/* With the lock held: wait while another VP runs alone (not counted as running meanwhile
 * when this VP was counted: the one running alone waits for the count to drop). */
static void wait_for_turn(struct mshvstack_cpu *c, int counted)
{
    struct mshvstack_world *w = c->world;
    if (!w->owner || w->owner == c)
        return;
    if (counted) {
        w->running--;
        pthread_cond_broadcast(&w->changed);
    }
    while (w->owner && w->owner != c)
        pthread_cond_wait(&w->changed, &w->lock);
    if (counted)
        w->running++;
}

/* The VP's thread enters the engine (waits while another VP runs alone). */
static void world_enter(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w)
        return;
    pthread_mutex_lock(&w->lock);
    wait_for_turn(c, 0);
    w->running++;
    c->in_world = 1;
    pthread_mutex_unlock(&w->lock);
}

static void release_locked(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (w->owner == c) {
        __atomic_store_n(&w->owner, NULL, __ATOMIC_RELEASE);
        uint32_t *next = (uint32_t *)((char *)c->cs + CPU_CFLAGS_NEXT_TB);
        if (*next == (1 | CF_LAST_IO | CF_NOCACHE))   /* not consumed: the step did not happen */
            *next = UINT32_MAX;
    }
    c->exclusive = EXCLUSIVE_NONE;
    c->translate_alone = 0;
    pthread_cond_broadcast(&w->changed);
}

static void world_leave(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w)
        return;
    pthread_mutex_lock(&w->lock);
    w->running--;
    c->in_world = 0;
    stores_landed_locked(c);
    release_locked(c);   /* wakes the waiters */
    pthread_mutex_unlock(&w->lock);
}

/* Another VP runs alone: wait at this block boundary until it is done. */
static void world_park(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    pthread_mutex_lock(&w->lock);
    wait_for_turn(c, 1);
    pthread_mutex_unlock(&w->lock);
}

/* Run alone: every other VP of the partition parks at its next block boundary. */
static void world_acquire(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    pthread_mutex_lock(&w->lock);
    wait_for_turn(c, 1);   /* another VP runs alone first */
    __atomic_store_n(&w->owner, c, __ATOMIC_RELEASE);
    for (int i = 0; i < w->count; i++)
        if (w->members[i] != c && w->members[i]->in_world)
            w->members[i]->api.cpu_exit(w->members[i]->cs);
    while (w->running > 1)
        pthread_cond_wait(&w->changed, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* From the interrupt hook, at a block boundary: park for another VP, or end our own turn. */
static bool world_boundary(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w)
        return false;
    if (c->exclusive == EXCLUSIVE_ACQUIRED) {
        /* A block to translate alone: the loop may pass a boundary or two before it does.
         * (Bounded: a translation that faults leaves the turn to end as a serial step's.) */
        if (c->translate_alone && ++c->alone_boundaries <= ALONE_BOUNDARIES)
            return true;
        c->exclusive = EXCLUSIVE_STEPPING;   /* the serial step is the next block: let it run */
        return true;
    }
    if (c->exclusive == EXCLUSIVE_STEPPING) {
        pthread_mutex_lock(&w->lock);
        release_locked(c);
        pthread_mutex_unlock(&w->lock);
        return false;
    }
    struct mshvstack_cpu *owner = __atomic_load_n(&w->owner, __ATOMIC_ACQUIRE);
    if (owner && owner != c)
        world_park(c);
    return false;
}

/* ---- code written on one engine and translated on another ----
 *
 * Each engine drops its own translations when its own stores hit them
 * (x86core.c: stores to pages with code go through Unicorn's check), but
 * not another engine's: a VP would run the old code another VP (or the
 * host) overwrote, e.g. a module loaded on CPU 1 where CPU 0 once ran a
 * freed one.  So the world keeps which engines translated code on which
 * page, every engine guards every such page (its stores to it reach
 * Unicorn's check, which the core wraps), and a store to one is sent to
 * the engines that translated code there: each drops its translations of
 * the bytes written at its next block boundary (or when it next enters a
 * run), as the x86 rule for cross-modifying code allows (the new code is
 * seen after the writer's store, before the next serializing event).
 *
 * Two more rules keep an engine from trusting code bytes it read while
 * another engine's store to them was still to land (x86parallel.c's
 * world_block_trusted, from the edge hook, before a new block first runs;
 * a block that fails them is dropped and translated again):
 *  - A page becomes code for the partition when an engine first translates
 *    a block there.  Until then any engine may have stored to it through a
 *    TLB entry marked dirty, which no check sees; so every other engine is
 *    told to guard it, and the block is translated again while the others
 *    are parked at block boundaries (world_acquire), where their stores have
 *    landed and, before they run again, their guards are set.  An engine
 *    that joins a page others translated already translates again once,
 *    after it is among the engines a store to the page is sent to.
 *  - A checked store is sent to the other engines before it lands.  An
 *    engine that took the event and translated the page again before the
 *    store landed would keep the old bytes, so an engine amid such stores
 *    says so, with the page, until its next block boundary (`storing`), and
 *    a translation that began while another engine stored to one of its
 *    pages is done again while the others are parked.
 */
/*
 * Host atomics write through the TLB without Unicorn's permission check
 * (its atomic_mmu_lookup), so a locked instruction on a page the
 * simulator write-protects (a read-only region, a page under dirty
 * tracking) wrote it with no intercept and no dirty bit.  Such pages are
 * kept hooked, so an atomic on one reaches Unicorn's store check (wrapped
 * above), where no plain store to them does (their permission fault leaves
 * the block first): the atomic is then redone alone and serially, with the
 * plain stores that do check.  Only pages that may hold code reach the
 * check (Unicorn asks for executable memory only); read-only regions that
 * are not executable are the gap that remains.
 */
enum { PROTECTED_DELETED = 1 };

static uint64_t protected_slot(const struct mshvstack_cpu *c, uint64_t page, int for_insert)
{
    uint64_t i = mix(page) & c->protected_mask, tomb = UINT64_MAX;
    for (;; i = (i + 1) & c->protected_mask) {
        uint64_t k = c->protected_pages[i];
        if (k == page)
            return i;
        if (k == PROTECTED_DELETED && tomb == UINT64_MAX)
            tomb = i;
        if (!k)
            return for_insert && tomb != UINT64_MAX ? tomb : i;
    }
}

static int is_protected(const struct mshvstack_cpu *c, uint64_t host)
{
    if (!c->protected_used)
        return 0;
    uint64_t page = host & ~0xFFFULL;
    return c->protected_pages[protected_slot(c, page, 0)] == page;
}

/* Rebuild with room for `need` pages (tombstones dropped); -1: out of memory. */
static int protected_resize(struct mshvstack_cpu *c, uint64_t need)
{
    uint64_t size = 1024;
    while (size < need * 2)
        size *= 2;
    uint64_t *fresh = calloc(size, sizeof *fresh), *old = c->protected_pages, old_mask = c->protected_mask;
    if (!fresh)
        return -1;
    c->protected_pages = fresh;
    c->protected_mask = size - 1;
    c->protected_used = 0;
    for (uint64_t i = 0; old && i <= old_mask; i++)
        if (old[i] > PROTECTED_DELETED) {
            fresh[protected_slot(c, old[i], 1)] = old[i];
            c->protected_used++;
        }
    free(old);
    return 0;
}

/* The engine's own thread: [host, host + size) is write-protected now, or no longer. */
int mshvstack_write_protect(struct mshvstack_cpu *c, uint64_t host, uint64_t size, int protect)
{
    for (uint64_t page = host & ~0xFFFULL; page < host + size; page += 0x1000) {
        if (protect) {
            if ((c->protected_used + 1) * 2 > (c->protected_pages ? c->protected_mask + 1 : 0) &&
                protected_resize(c, c->protected_used + 1 + (host + size - page) / 0x1000) != 0)
                return -1;
            uint64_t *slot = &c->protected_pages[protected_slot(c, page, 1)];
            if (*slot != page) {
                *slot = page;
                c->protected_used++;
            }
        } else if (c->protected_used) {
            uint64_t *slot = &c->protected_pages[protected_slot(c, page, 0)];
            if (*slot == page)
                *slot = PROTECTED_DELETED;   /* still counted: the table's load includes tombstones */
        }
    }
    return 0;
}

static void kick(struct mshvstack_cpu *c)
{
    if (c->in_world)
        c->api.cpu_exit(c->cs);
}

/* Queue an event for an engine (world lock held).  Past the bound, writes are summed up
 * as "drop every translation"; a guard that finds no room is kept as that too. */
enum { MAX_CODE_EVENTS = 4096 };
static void post_locked(struct mshvstack_cpu *c, struct code_event event)
{
    if (c->event_count == c->event_capacity) {
        int capacity = c->event_capacity ? c->event_capacity * 2 : 64;
        struct code_event *fresh = capacity <= MAX_CODE_EVENTS || event.kind != CODE_EVENT_WRITTEN
                                       ? realloc(c->events, (size_t)capacity * sizeof *fresh) : NULL;
        if (!fresh) {
            c->events_lost = 1;
            __atomic_store_n(&c->events_pending, 1, __ATOMIC_RELEASE);
            return;
        }
        c->events = fresh;
        c->event_capacity = capacity;
    }
    c->events[c->event_count++] = event;
    __atomic_store_n(&c->events_pending, 1, __ATOMIC_RELEASE);
}

static uint64_t code_slot(const struct mshvstack_world *w, uint64_t page)
{
    uint64_t i = mix(page) & w->code_mask;
    while (w->code[i].host && w->code[i].host != page)
        i = (i + 1) & w->code_mask;
    return i;
}

/* Which engines translated code on a host page (read without the lock: slots are only ever filled). */
static uint64_t code_engines(const struct mshvstack_world *w, uint64_t page)
{
    if (__atomic_load_n(&w->code_full, __ATOMIC_ACQUIRE))
        return ~0ULL;
    const struct code_owner *slot = &w->code[code_slot(w, page)];
    return __atomic_load_n(&slot->host, __ATOMIC_ACQUIRE) == page ? __atomic_load_n(&slot->engines, __ATOMIC_SEQ_CST) : 0;
}

/* Send a write of [host, host + length) to the engines with code there, but `writer` (lock held). */
static void send_write_locked(struct mshvstack_world *w, const struct mshvstack_cpu *writer, uint64_t host, uint64_t length)
{
    for (uint64_t page = host & ~0xFFFULL; page < host + length; page += 0x1000) {
        uint64_t engines = code_engines(w, page);
        if (!engines)
            continue;
        uint64_t from = page > host ? page : host, to = page + 0x1000 < host + length ? page + 0x1000 : host + length;
        for (int i = 0; i < w->count; i++) {
            struct mshvstack_cpu *m = w->members[i];
            if (m != writer && (m->world_bit & engines)) {
                post_locked(m, (struct code_event){from, 0, (uint32_t)(to - from), CODE_EVENT_WRITTEN});
                kick(m);
            }
        }
    }
}

static int any_code(const struct mshvstack_world *w, uint64_t host, uint64_t length)
{
    for (uint64_t page = host & ~0xFFFULL; page < host + length; page += 0x1000)
        if (code_engines(w, page))
            return 1;
    return 0;
}

/* The host wrote guest memory (the VMM, device DMA): every engine drops what it translated there.
 * `ranges` holds `count` (host address, length) pairs: a scattered DMA is one call. */
void mshvstack_world_code_written(struct mshvstack_world *w, const uint64_t *ranges, size_t count)
{
    size_t first = 0;
    while (first < count && (!ranges[2 * first + 1] || !any_code(w, ranges[2 * first], ranges[2 * first + 1])))
        first++;
    if (first == count)
        return;   /* no code in any of them: the usual DMA */
    pthread_mutex_lock(&w->lock);
    for (size_t i = first; i < count; i++)
        if (ranges[2 * i + 1])
            send_write_locked(w, NULL, ranges[2 * i], ranges[2 * i + 1]);
    pthread_mutex_unlock(&w->lock);
}

/*
 * Code pages that became data.  A page keeps its guard, and every store to
 * it the checked path (Unicorn's slow store, the world lock), for as long
 * as it is claimed as code: Linux frees its init code and reuses the pages,
 * and a busy page among them (a process's stack, a buffer) slowed the
 * guest two to nine times, by chance of where the allocator put it.  So a
 * claimed page that takes RETIRE_FIRST checked stores is retired: its
 * translations are dropped, its claim cleared and its guard lifted, and
 * code run there again is claimed and guarded again as new code before it
 * runs.  Each retirement doubles the stores the next one needs, so a page
 * that really mixes hot code and data settles guarded.  Only an engine
 * alone in its world retires: with others, one of them could still run
 * code it translated there while this one stored to the page unchecked.
 */
enum { RETIRE_FIRST = 256, RETIRE_MOST = 1 << 24 };

/* With the lock held: a checked store to claimed page `page`; 1 when it is time to retire it. */
static int retire_due_locked(const struct mshvstack_cpu *c, uint64_t page)
{
    struct mshvstack_world *w = c->world;
    if (w->count != 1 || w->code_full)
        return 0;
    struct code_owner *slot = &w->code[code_slot(w, page)];
    if (slot->host != page || !(slot->engines & c->world_bit))
        return 0;
    uint32_t due = slot->retire_after ? slot->retire_after : RETIRE_FIRST;
    return slot->stores < due && ++slot->stores == due;
}

/* Between blocks, on the engine's thread: retire `page` if it is still this engine's alone. */
static void retire_code_page(struct mshvstack_cpu *c, uint64_t page)
{
    struct mshvstack_world *w = c->world;
    if (retired_room(c) != 0)
        return;   /* (out of memory) it stays code: guarded, its stores checked */
    pthread_mutex_lock(&w->lock);
    struct code_owner *slot = w->code_full ? NULL : &w->code[code_slot(w, page)];
    int alone = slot && w->count == 1 && slot->host == page && slot->engines == c->world_bit;
    uint64_t gpa = alone ? slot->gpa : 0;
    if (alone) {
        __atomic_store_n(&slot->engines, 0, __ATOMIC_SEQ_CST);   /* stores and host writes stop looking */
        __atomic_store_n(&slot->ready, 0, __ATOMIC_RELEASE);      /* claimed again: new code, guarded first */
        slot->stores = 0;
        uint32_t due = slot->retire_after ? slot->retire_after : RETIRE_FIRST;
        slot->retire_after = due < RETIRE_MOST ? 2 * due : RETIRE_MOST;
    }
    pthread_mutex_unlock(&w->lock);
    if (!alone)
        return;
    uint64_t ram = ram_addr_from_host(c->uc, (void *)(uintptr_t)page);
    if (ram == RAM_ADDR_INVALID || unguard_page(c, gpa) != 0)
        tb_flush(c->cs);   /* what is left unguarded holds no code then */
    else
        invalidate_range(c->uc, ram, ram + 0x1000);
    c->retired[c->retired_count++] = gpa;   /* guarded again before a block there runs (x86core.c) */
    c->pages_retired++;
}

/* Unicorn's check of a store to a page that may hold code, wrapped: the other engines hear of it. */
static void core_invalidate_page_fast(void *uc, void *pages, uint64_t start, int len, uintptr_t retaddr)
{
    struct mshvstack_cpu *c = entered;
    if (c && c->uc == uc && c->world && len > 0) {
        void *host = map_ram_ptr(uc, NULL, start);
        struct mshvstack_world *w = c->world;
        if (host && c->exclusive != EXCLUSIVE_STEPPING && is_protected(c, (uint64_t)(uintptr_t)host))
            loop_exit_atomic(c->cs, retaddr);   /* a host atomic on a write-protected page: redo it serially
                                                 * (the caller's page_collection lock is a no-op in 2.1.4) */
        if (host && any_code(w, (uint64_t)(uintptr_t)host, (uint64_t)len)) {
            uint64_t page = (uint64_t)(uintptr_t)host & ~0xFFFULL;
            pthread_mutex_lock(&w->lock);
            storing_locked(c, page);   /* before the engines to tell are looked up */
            send_write_locked(w, c, (uint64_t)(uintptr_t)host, (uint64_t)len);
            if (retire_due_locked(c, page)) {
                post_locked(c, (struct code_event){page, 0, 0x1000, CODE_EVENT_RETIRE});
                kick(c);   /* at the next block boundary: not inside the store */
            }
            pthread_mutex_unlock(&w->lock);
        }
    }
    original_invalidate_fast(uc, pages, start, len, retaddr);
}

enum claim { CLAIM_KNOWN = 0, CLAIM_JOINED = 1, CLAIM_NEW = 2 };
#define STORING_MANY UINT64_MAX   /* an engine stores to more than one code page */

/*
 * Code was read from guest page `gpa` (host: where it lives) for a block:
 * CLAIM_KNOWN when this engine had claimed the page before, CLAIM_JOINED
 * when it now hears of stores to a page the others had claimed,
 * CLAIM_NEW when the page is new code (every other engine is told to
 * guard it before it runs guest code again).
 */
static enum claim world_claim_code(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host)
{
    struct mshvstack_world *w = c->world;
    uint64_t page = host & ~0xFFFULL;
    struct code_owner *slot = NULL;
    if (!__atomic_load_n(&w->code_full, __ATOMIC_ACQUIRE)) {
        slot = &w->code[code_slot(w, page)];
        if (__atomic_load_n(&slot->host, __ATOMIC_ACQUIRE) == page && __atomic_load_n(&slot->ready, __ATOMIC_ACQUIRE) &&
            (__atomic_load_n(&slot->engines, __ATOMIC_RELAXED) & c->world_bit))
            return CLAIM_KNOWN;
    } else {
        /* No table to remember claims in: each block's pages are claimed, once per translation. */
        for (int i = 0; i < CLAIMED_RECENT; i++)
            if (c->claimed_recent[i] == page + 1)
                return CLAIM_KNOWN;
    }
    enum claim claim = CLAIM_NEW;
    pthread_mutex_lock(&w->lock);
    if (w->code_full) {
        slot = NULL;
    } else {
        slot = &w->code[code_slot(w, page)];
        if (slot->host == page) {
            claim = slot->ready ? CLAIM_JOINED : CLAIM_NEW;   /* not ready: its claimer was stopped before it ran alone */
            __atomic_fetch_or(&slot->engines, c->world_bit, __ATOMIC_SEQ_CST);
        } else if (++w->code_used * 4 > (w->code_mask + 1) * 3) {
            __atomic_store_n(&w->code_full, 1, __ATOMIC_RELEASE);   /* from now on every write is sent */
            slot = NULL;
        } else {
            slot->gpa = gpa & ~0xFFFULL;
            slot->engines = c->world_bit;
            __atomic_store_n(&slot->host, page, __ATOMIC_SEQ_CST);
        }
    }
    if (claim == CLAIM_NEW)
        for (int i = 0; i < w->count; i++)
            if (w->members[i] != c)
                post_locked(w->members[i], (struct code_event){page, gpa & ~0xFFFULL, 0x1000, CODE_EVENT_GUARD});
    if (!slot)
        c->claimed_recent[c->claimed_next++ % CLAIMED_RECENT] = page + 1;
    pthread_mutex_unlock(&w->lock);
    return claim;
}

/* The others are parked now (the block just translated was read alone): a page is ready
 * once the engine that claimed it runs its block. */
static void claims_ready(struct mshvstack_cpu *c, const struct block_code *b)
{
    struct mshvstack_world *w = c->world;
    if (__atomic_load_n(&w->code_full, __ATOMIC_ACQUIRE))
        return;
    for (int i = 0; i < b->pages; i++) {
        uint64_t host = b->gpas[i] == ~0ULL ? 0 : ram_host(c, b->gpas[i]);
        struct code_owner *slot = host ? &w->code[code_slot(w, host & ~0xFFFULL)] : NULL;
        if (slot && __atomic_load_n(&slot->host, __ATOMIC_ACQUIRE) == (host & ~0xFFFULL))
            __atomic_store_n(&slot->ready, 1, __ATOMIC_RELEASE);
    }
}

/* After an engine guarded a page it translated code on (x86core.c's mshvstack_guard_code):
 * the page was claimed when the block was translated, unless the table is full. */
static int world_guard_everywhere(struct mshvstack_cpu *c, uint64_t gpa, uint64_t host)
{
    struct mshvstack_world *w = c->world;
    if (w && !(code_engines(w, host & ~0xFFFULL) & c->world_bit))
        world_claim_code(c, gpa, host);
    return 0;
}

/* With the lock held: this engine is about to store to code page `page` (a checked store). */
static void storing_locked(struct mshvstack_cpu *c, uint64_t page)
{
    struct mshvstack_world *w = c->world;
    struct storing_slot *s = &w->storing[c->world_index];
    if (!c->storing) {
        c->storing = 1;
        c->storing_page = page;
        __atomic_store_n(&s->page, s->count ? STORING_MANY : page, __ATOMIC_SEQ_CST);
        __atomic_store_n(&s->count, s->count + 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&w->storing_total, 1, __ATOMIC_SEQ_CST);
    } else if (c->storing_page != page) {
        c->storing_page = STORING_MANY;
        __atomic_store_n(&s->page, STORING_MANY, __ATOMIC_SEQ_CST);
    }
}

/* With the lock held: this engine's stores have landed. */
static void stores_landed_locked(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!c->storing)
        return;
    struct storing_slot *s = &w->storing[c->world_index];
    c->storing = 0;
    __atomic_store_n(&s->count, s->count - 1, __ATOMIC_SEQ_CST);
    if (!s->count)
        __atomic_store_n(&s->page, 0, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&w->storing_total, 1, __ATOMIC_SEQ_CST);
}

/* Between blocks (the engine's own thread): its stores so far have landed. */
static void world_stores_landed(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w || !c->storing)
        return;
    pthread_mutex_lock(&w->lock);
    stores_landed_locked(c);
    pthread_mutex_unlock(&w->lock);
}

/* A translation begins: the pages other engines are storing to now (read before any code byte). */
static void storing_seen_now(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    c->seen_count = 0;
    if (!w || !__atomic_load_n(&w->storing_total, __ATOMIC_SEQ_CST))
        return;
    for (int i = 0; i < WORLD_BITS; i++)
        if (__atomic_load_n(&w->storing[i].count, __ATOMIC_SEQ_CST))
            c->seen_pages[c->seen_count++] = __atomic_load_n(&w->storing[i].page, __ATOMIC_SEQ_CST);
}

static int storing_seen(const struct mshvstack_cpu *c, uint64_t page)
{
    for (int i = 0; i < c->seen_count; i++)
        if (c->seen_pages[i] == page || c->seen_pages[i] == STORING_MANY)
            return 1;
    return 0;
}

static void drop_all_code(struct mshvstack_cpu *c)
{
    tb_flush(c->cs);
    c->api.cpu_exit(c->cs);
}

/* Drop the block just translated (before it runs: nothing of it has) and leave to translate it again. */
static void translate_again(struct mshvstack_cpu *c, const struct block_code *b, uint64_t address)
{
    uint64_t host = b->pages && b->gpas[0] != ~0ULL ? ram_host(c, b->gpas[0]) : 0;
    uint64_t ram = host ? ram_addr_from_host(c->uc, (void *)(uintptr_t)(host + (address & 0xFFF))) : RAM_ADDR_INVALID;
    if (ram == RAM_ADDR_INVALID)
        tb_flush(c->cs);
    else
        invalidate_range(c->uc, ram, ram + 1);
    c->api.cpu_exit(c->cs);
}

/*
 * A new block, before it first runs (x86core.c's new_block): 1 when its
 * code can be trusted (see above); 0 when it was dropped, to be translated
 * again (alone, when the others must be parked first).
 */
static int world_block_trusted(struct mshvstack_cpu *c, const struct block_code *b, uint64_t address)
{
    world_stores_landed(c);   /* between blocks: this engine's own stores have landed */
    /* the others were parked while it was read (or there are none) */
    int parked = c->exclusive != EXCLUSIVE_NONE || __atomic_load_n(&c->world->count, __ATOMIC_ACQUIRE) == 1;
    int alone = 0, again = 0;
    for (int i = 0; i < b->pages; i++) {
        uint64_t host = b->gpas[i] == ~0ULL ? 0 : ram_host(c, b->gpas[i]);
        if (!host)
            continue;
        enum claim claim = world_claim_code(c, b->gpas[i], host);
        alone |= claim == CLAIM_NEW || storing_seen(c, host & ~0xFFFULL);
        again |= claim == CLAIM_JOINED;
    }
    if (parked) {
        claims_ready(c, b);
        if (c->translate_alone) {   /* the turn ends before the block runs; the block stays */
            c->translate_alone = 0;
            c->exclusive = EXCLUSIVE_STEPPING;
            c->api.cpu_exit(c->cs);
        }
        return 1;
    }
    if (alone) {
        world_acquire(c);
        c->exclusive = EXCLUSIVE_ACQUIRED;
        c->translate_alone = 1;
        c->alone_boundaries = 0;
    }
    if (alone || again) {
        c->blocks_redone++;
        c->blocks_redone_alone += alone;
        translate_again(c, b, address);
        return 0;
    }
    return 1;
}

/* On the engine's own thread, between blocks or before a run: what the others asked for. */
static void world_take_code_events(struct mshvstack_cpu *c)
{
    struct mshvstack_world *w = c->world;
    if (!w || !__atomic_load_n(&c->events_pending, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&w->lock);
    struct code_event *events = c->events;
    int count = c->event_count, lost = c->events_lost;
    c->events = NULL;
    c->event_count = c->event_capacity = 0;
    c->events_lost = 0;
    __atomic_store_n(&c->events_pending, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&w->lock);
    for (int i = 0; i < count; i++) {
        const struct code_event *e = &events[i];
        if (e->kind == CODE_EVENT_WRITTEN) {
            uint64_t ram = lost ? RAM_ADDR_INVALID : ram_addr_from_host(c->uc, (void *)(uintptr_t)e->host);
            if (ram != RAM_ADDR_INVALID)
                invalidate_range(c->uc, ram, ram + e->length);
            continue;
        }
        if (e->kind == CODE_EVENT_RETIRE) {
            retire_code_page(c, e->host);
            continue;
        }
        if (guard_page(c, e->gpa, e->host) != 0)
            lost = 1;
    }
    free(events);
    if (lost)
        tb_flush(c->cs);
}

/* ---- the translator's hooks ---- */

/* The TCG context behind the engine: the uc_struct field whose context holds the
 * TB being translated now (its cflags and its code pointer). */
static void discover_tcg(struct mshvstack_cpu *c, const struct qemu_tb *tb)
{
    enum { WORDS = 4096 };
    uint64_t *w = calloc(WORDS, 8);
    if (!w)
        return;
    int words = read_words(w, c->uc, WORDS);
    for (int j = 0; j < words; j++) {
        uint64_t p = w[j], code = 0;
        uint32_t cflags = 0;
        if (!p || (p & 7))
            continue;
        if (safe_read(&cflags, (char *)(uintptr_t)p + TCG_TB_CFLAGS, 4) == 0 &&
            safe_read(&code, (char *)(uintptr_t)p + TCG_CODE_GEN_PTR, 8) == 0 &&
            cflags == tb->cflags && code == (uint64_t)(uintptr_t)tb->tc_ptr && code) {
            c->tcg_ctx = (char *)(uintptr_t)p;
            break;
        }
    }
    free(w);
}

static void core_init_disas(void *db, void *cpu)
{
    original_init_disas(db, cpu);
    struct mshvstack_cpu *c = entered;
    if (!c || c->cs != cpu)
        return;
    struct qemu_tb *tb = ((struct qemu_disas_base *)db)->tb;
    c->tb_first = ((struct qemu_disas_base *)db)->pc_first;   /* a new block: its instruction starts follow */
    c->tb_size = 0;
    c->tb_insns = 0;
    storing_seen_now(c);
    if (!c->tcg_ctx)
        discover_tcg(c, tb);
    if (!c->tcg_ctx || !c->parallel || (tb->cflags & CF_LAST_IO))
        return;
    *(uint32_t *)(c->tcg_ctx + TCG_TB_CFLAGS) |= CF_PARALLEL;
    tb->cflags |= CF_PARALLEL;   /* the translator reads it too (CMPXCHG8B/16B) */
}

/*
 * Each instruction of a block, before QEMU decodes it: where it starts, so
 * the core's new-block filter (x86core.c, block_is_plain) looks at exactly
 * the instructions the block runs.  QEMU calls this for every instruction
 * it puts in the block (translator_loop), and ends a block within a page.
 */
static void core_translate_insn(void *db, void *cpu)
{
    struct mshvstack_cpu *c = entered;
    if (c && c->cs == cpu && c->tb_insns >= 0) {
        uint64_t at = ((struct qemu_disas_base *)db)->pc_next - c->tb_first;
        if (c->tb_insns < TB_MAX_INSNS && at <= UINT16_MAX)
            c->tb_starts[c->tb_insns++] = (uint16_t)at;
        else
            c->tb_insns = -1;   /* unknown: the block goes to the Python half */
    }
    original_translate_insn(db, cpu);
}

static void core_tb_stop(void *db, void *cpu)
{
    original_tb_stop(db, cpu);
    struct mshvstack_cpu *c = entered;
    if (c && c->cs == cpu) {
        struct qemu_disas_base *base = db;
        base->tb->cflags &= ~(uint32_t)CF_PARALLEL;
        /* translator_loop sets tb->size to this right after tb_stop */
        c->tb_size = base->pc_first == c->tb_first ? (uint32_t)(base->pc_next - base->pc_first) : 0;
    }
}

/* Every exception index passes here: EXCP_ATOMIC is run alone, serially. */
static bool core_stop_interrupt(void *uc, int intno)
{
    struct mshvstack_cpu *c = entered;
    if (intno == EXCP_ATOMIC && c && c->uc == uc && c->world) {
        world_acquire(c);
        c->exclusive = EXCLUSIVE_ACQUIRED;
        c->serial_steps++;
        *(uint32_t *)((char *)c->cs + CPU_CFLAGS_NEXT_TB) = 1 | CF_LAST_IO | CF_NOCACHE;
        return false;
    }
    return original_stop_interrupt(uc, intno);
}

static int patch_pointer(void **slot, void *expected, void *replacement)
{
    if (*slot == replacement)
        return 0;
    if (*slot != expected)
        return -1;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)slot & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, (size_t)page * 2, PROT_READ | PROT_WRITE) != 0)
        return -2;
    *slot = replacement;
    return 0;
}

/* Once per process: wrap the x86 translator's hooks (checked against the symbol table). */
int mshvstack_parallel_install(const struct mshvstack_library *lib)
{
    void **ops = lib->tr_ops;
    if (!ops || !lib->init_disas_context || !lib->tb_stop || !lib->translate_insn)
        return -1;
    if (ops[OPS_INIT_DISAS] == (void *)core_init_disas && ops[OPS_TB_STOP] == (void *)core_tb_stop &&
        ops[OPS_TRANSLATE_INSN] == (void *)core_translate_insn)
        return 0;
    original_init_disas = (void (*)(void *, void *))lib->init_disas_context;
    original_tb_stop = (void (*)(void *, void *))lib->tb_stop;
    original_translate_insn = (void (*)(void *, void *))lib->translate_insn;
    if (patch_pointer(&ops[OPS_INIT_DISAS], lib->init_disas_context, (void *)core_init_disas) != 0)
        return -2;
    if (patch_pointer(&ops[OPS_TB_STOP], lib->tb_stop, (void *)core_tb_stop) != 0)
        return -3;
    if (patch_pointer(&ops[OPS_TRANSLATE_INSN], lib->translate_insn, (void *)core_translate_insn) != 0)
        return -3;
    void *own[4] = {(void *)atomic_xchg8, (void *)atomic_xchg16, (void *)atomic_xchg32, (void *)atomic_xchg64};
    for (int i = 0; i < 4; i++) {
        if (!lib->xchg[i] || !lib->cmpxchg_mmu[i])
            return -4;
        cmpxchg_mmu[i] = (cmpxchg_mmu_fn)lib->cmpxchg_mmu[i];
        if (redirect(lib->xchg[i], own[i]) != 0)
            return -5;
    }
    if (wrap_code_checks(lib) != 0)
        return -6;
    return fast_stores_through_code_mappings(lib->notdirty_write) == 0 ? 0 : -7;
}

/*
 * Attach an engine to its partition's world.  Checks what the core assumes
 * of QEMU's CPUState (the env pointer and cflags_next_tb where the headers
 * put them) and wraps the engine's stop_interrupt hook (the one uc_struct
 * word equal to x86_stop_interrupt).
 */
int mshvstack_parallel_attach(struct mshvstack_cpu *c, struct mshvstack_world *w, const struct mshvstack_library *lib)
{
    void *env = NULL;
    uint32_t next = 0;
    if (safe_read(&env, (char *)c->cs + CPU_ENV_PTR, 8) != 0 || env != (void *)c->env)
        return -1;
    if (safe_read(&next, (char *)c->cs + CPU_CFLAGS_NEXT_TB, 4) != 0 || next != UINT32_MAX)
        return -2;
    enum { WORDS = 4096 };
    uint64_t *words = calloc(WORDS, 8);
    if (!words)
        return -3;
    /* the first match: another engine's uc_struct may lie just past this one */
    int n = read_words(words, c->uc, WORDS), found = -1;
    for (int j = 0; j < n && found < 0; j++)
        if (words[j] == (uint64_t)(uintptr_t)lib->stop_interrupt || words[j] == (uint64_t)(uintptr_t)core_stop_interrupt)
            found = j;
    free(words);
    if (found < 0)
        return -4;
    original_stop_interrupt = (bool (*)(void *, int))lib->stop_interrupt;
    ((void **)c->uc)[found] = (void *)core_stop_interrupt;
    c->parallel = 1;
    return world_join(w, c) == 0 ? 0 : -3;
}

/* The translation that attach() could not check: the TCG context was found at the first block. */
int mshvstack_parallel_ready(struct mshvstack_cpu *c)
{
    return c->tcg_ctx != NULL;
}

/* Make the thread's engine the one being translated for (engine set-up, outside a run). */
void mshvstack_translating_for(struct mshvstack_cpu *c)
{
    entered = c;
}
