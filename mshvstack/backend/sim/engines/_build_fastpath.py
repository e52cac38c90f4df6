"""cffi builder for the Unicorn engine's block filter (C, compiled at install).

Unicorn calls a block hook on every executed translation block; a Python
hook there costs about a microsecond per block and made compute-bound guests
~100x slower.  This C hook only calls into Python the first time a block
address is seen (to find the instructions the hypervisor must trap); every
later execution of that block costs a hash lookup.
"""

from __future__ import annotations

import cffi

CDEF = """
struct mshvstack_block_filter {
    uint64_t *slots;
    uint64_t mask;
    uint64_t used;
    void *owner;
};
int mshvstack_filter_init(struct mshvstack_block_filter *f, void *owner);
void mshvstack_filter_free(struct mshvstack_block_filter *f);
void mshvstack_filter_forget(struct mshvstack_block_filter *f, uint64_t start, uint64_t end);
void mshvstack_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data);
extern "Python" void mshvstack_on_new_block(void *owner, uint64_t address, uint32_t size);
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct mshvstack_block_filter {
    uint64_t *slots;   /* open addressing; 0 = empty, otherwise address + 1 */
    uint64_t mask;
    uint64_t used;
    void *owner;
};

static void mshvstack_on_new_block(void *owner, uint64_t address, uint32_t size);

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return x;
}

static int insert(struct mshvstack_block_filter *f, uint64_t key)
{
    uint64_t i = mix(key) & f->mask;
    while (f->slots[i]) {
        if (f->slots[i] == key)
            return 0;
        i = (i + 1) & f->mask;
    }
    f->slots[i] = key;
    f->used++;
    return 1;
}

static int grow(struct mshvstack_block_filter *f)
{
    uint64_t old_size = f->mask + 1, *old = f->slots;
    f->slots = calloc(old_size * 2, sizeof(uint64_t));
    if (!f->slots) { f->slots = old; return -1; }
    f->mask = old_size * 2 - 1;
    f->used = 0;
    for (uint64_t i = 0; i < old_size; i++)
        if (old[i])
            insert(f, old[i]);
    free(old);
    return 0;
}

int mshvstack_filter_init(struct mshvstack_block_filter *f, void *owner)
{
    f->mask = 4095;
    f->used = 0;
    f->owner = owner;
    f->slots = calloc(f->mask + 1, sizeof(uint64_t));
    return f->slots ? 0 : -1;
}

void mshvstack_filter_free(struct mshvstack_block_filter *f)
{
    free(f->slots);
    f->slots = NULL;
}

/* Forget blocks starting in [start, end) so they are scanned again. */
void mshvstack_filter_forget(struct mshvstack_block_filter *f, uint64_t start, uint64_t end)
{
    uint64_t size = f->mask + 1, *old = f->slots;
    uint64_t *fresh = calloc(size, sizeof(uint64_t));
    if (!fresh)
        return;
    f->slots = fresh;
    f->used = 0;
    for (uint64_t i = 0; i < size; i++)
        if (old[i] && !(old[i] - 1 >= start && old[i] - 1 < end))
            insert(f, old[i]);
    free(old);
}

void mshvstack_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct mshvstack_block_filter *f = user_data;
    (void)uc;
    if (!f->slots)
        return;
    if (f->used * 2 >= f->mask && grow(f) < 0)
        return;
    if (insert(f, address + 1))
        mshvstack_on_new_block(f->owner, address, size);
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("mshvstack.backend.sim.engines._fastpath", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
