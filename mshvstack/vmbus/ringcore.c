/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: the VMBus ring's mechanics, one C call per ring operation.
 *
 * A ring is a control page (struct vmbus_ring_control) and a data area of
 * data_size bytes.  The data area lies in host memory in runs: pieces that
 * are contiguous in host memory (a ring whose guest pages are scattered has
 * several).  The run table is the host's own; the buffers it points into are
 * passed with each operation, with their sizes, so that memory the VMM took
 * away is never touched (the Python side takes the pointers per operation).
 *
 * The guest is hostile.  Every value read from the control page or a packet
 * descriptor is read once, into a local, validated, and only then used; no
 * value the guest wrote can make an access leave the ring's pages.  The data
 * bytes themselves are copied, never interpreted, except the descriptor,
 * which a read copies out first and validates from the copy it returns.
 *
 * Ordering (vmbus_protocol.md 4.4): data before the index that publishes it
 * (release store), the index before the other side's signalling field (a full
 * fence: x86 lets a load pass an earlier store), and the index read before the
 * data it covers (acquire load).  The guest's side has its own barriers.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "vmbus/vmbus.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the ring's fields are little-endian, as the host must be");

/* What an operation found: the Python side turns each into its result or error. */
#define RINGCORE_OK              0
#define RINGCORE_EMPTY           1   /* read: nothing to read */
#define RINGCORE_FULL            2   /* write: not enough room (needed, free) */
#define RINGCORE_BAD_INDICES     3   /* write or read index invalid (write_index, read_index) */
#define RINGCORE_BAD_WRITE_INDEX 4   /* the write index alone (write_index) */
#define RINGCORE_BAD_READ_INDEX  5   /* the read index alone (read_index) */
#define RINGCORE_SHORT           6   /* fewer bytes available than a descriptor and its trailer (available) */
#define RINGCORE_BAD_DESCRIPTOR  7   /* offset8/len8 do not frame a packet in what is available */
#define RINGCORE_BAD_PACKET      8   /* write: the packet is not a non-empty multiple of 8 bytes */
#define RINGCORE_BAD_LAYOUT      9   /* the run table does not fit the buffers given (a host bug) */
#define RINGCORE_LARGE_PACKET   10   /* read: the packet does not fit the output buffer: nothing consumed (length) */

#define RINGCORE_TRAILER ((uint32_t)sizeof(struct vmbus_ring_trailer))
#define RINGCORE_DESCRIPTOR ((uint32_t)sizeof(struct vmpacket_descriptor))
#define RINGCORE_INDEX_ALIGN ((uint32_t)VMBUS_RING_INDEX_ALIGN)

/* One piece of the data area that is contiguous in host memory. */
struct ringcore_run {
	uint32_t data_offset;   /* where it starts in the data area */
	uint32_t length;
	uint32_t buffer;        /* which of the operation's buffers holds it */
	uint64_t host_offset;   /* where it starts in that buffer */
};

/* The host memory of one operation: each buffer's address and size.  Buffer 0
 * comes with each call (the usual ring lies in one); the caller fills in the
 * others before a call. */
struct ringcore_memory {
	char **bases;
	uint64_t *sizes;
	uint32_t count;
};

/* Where a ring lies: fixed when the ring is set up, owned by the host. */
struct ringcore_ring {
	uint32_t data_size;
	uint32_t run_count;
	const struct ringcore_run *runs;   /* sorted by data_offset, tiling [0, data_size) */
	uint32_t control_buffer;
	uint64_t control_offset;
	struct ringcore_memory memory;     /* the current operation's */
};

/* What an operation saw (for the caller's decision or error message). */
struct ringcore_result {
	uint32_t write_index;
	uint32_t read_index;
	uint32_t available;    /* read: bytes between the indices */
	uint32_t length;       /* read: the packet's bytes (descriptor onward, no trailer) */
	uint64_t needed;       /* write: packet and trailer */
	uint64_t free;         /* write, wait_for_space: bytes free for packets and trailers */
	uint32_t offset8;      /* read: the descriptor's fields, as copied */
	uint32_t len8;
	int signal;            /* the other side must be signalled */
	int ready;             /* wait_for_space: the space is there already */
};

static volatile uint32_t *control_field(const struct ringcore_ring *ring, const struct ringcore_memory *memory, size_t field)
{
	uint64_t size;

	if (ring->control_buffer >= memory->count)
		return NULL;
	size = memory->sizes[ring->control_buffer];
	if (ring->control_offset > size || size - ring->control_offset < sizeof(struct vmbus_ring_control))
		return NULL;
	char *control = memory->bases[ring->control_buffer] + ring->control_offset;
	if ((uintptr_t)control % sizeof(uint32_t))
		return NULL;
	return (volatile uint32_t *)(control + field);
}

#define FIELD(name) offsetof(struct vmbus_ring_control, name)

/* The operation's memory, with buffer 0 as the call gives it. */
static const struct ringcore_memory *bind(struct ringcore_ring *ring, char *first, uint64_t first_size)
{
	if (ring->memory.count == 0)
		return NULL;
	ring->memory.bases[0] = first;
	ring->memory.sizes[0] = first_size;
	return &ring->memory;
}

#define BIND(ring) \
	const struct ringcore_memory *memory = bind(ring, first, first_size); \
	if (memory == NULL) \
		return RINGCORE_BAD_LAYOUT

static uint32_t load(volatile uint32_t *field)
{
	return __atomic_load_n(field, __ATOMIC_ACQUIRE);
}

static void publish(volatile uint32_t *field, uint32_t value)
{
	__atomic_store_n(field, value, __ATOMIC_RELEASE);
}

static void full_fence(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static int index_valid(const struct ringcore_ring *ring, uint32_t index)
{
	return index < ring->data_size && index % RINGCORE_INDEX_ALIGN == 0;
}

/* Bytes from ``from`` to ``to`` going forward around the ring (both valid indices). */
static uint32_t distance(const struct ringcore_ring *ring, uint32_t from, uint32_t to)
{
	return to >= from ? to - from : ring->data_size - (from - to);
}

static uint32_t advance(const struct ringcore_ring *ring, uint32_t index, uint64_t bytes)
{
	return (uint32_t)(((uint64_t)index + bytes) % ring->data_size);
}

/* The host address of data offset ``offset`` and how many bytes follow it in
 * the same run; NULL when the run table does not fit the buffers. */
static char *locate(const struct ringcore_ring *ring, const struct ringcore_memory *memory, uint32_t offset, uint32_t *room)
{
	uint32_t low = 0, high = ring->run_count;

	while (low < high) {   /* the last run starting at or before offset */
		uint32_t middle = low + (high - low) / 2;
		if (ring->runs[middle].data_offset <= offset)
			low = middle + 1;
		else
			high = middle;
	}
	if (low == 0)
		return NULL;
	const struct ringcore_run *run = &ring->runs[low - 1];
	if (offset - run->data_offset >= run->length || run->buffer >= memory->count)
		return NULL;
	uint64_t size = memory->sizes[run->buffer];
	if (run->host_offset > size || size - run->host_offset < run->length)
		return NULL;
	*room = run->length - (offset - run->data_offset);
	return memory->bases[run->buffer] + run->host_offset + (offset - run->data_offset);
}

enum copy_direction { INTO_RING, OUT_OF_RING };

/* Copy `length` bytes between `buffer` and the ring from `offset`, across the wrap and the
 * runs; 0 if a piece lies outside the memory given (nothing past it is touched). */
static int copy_ring(const struct ringcore_ring *ring, const struct ringcore_memory *memory, uint32_t offset,
		     char *buffer, uint32_t length, enum copy_direction direction)
{
	while (length) {
		uint32_t room;
		char *at = locate(ring, memory, offset, &room);
		if (at == NULL)
			return 0;
		uint32_t n = length < room ? length : room;
		if (direction == INTO_RING)
			memcpy(at, buffer, n);
		else
			memcpy(buffer, at, n);
		buffer += n;
		length -= n;
		offset = advance(ring, offset, n);
	}
	return 1;
}

static void clear(struct ringcore_result *result)
{
	memset(result, 0, sizeof(*result));
}

/* Both indices, each read once and validated. */
static int indices(const struct ringcore_ring *ring, volatile uint32_t *write_field, volatile uint32_t *read_field,
		   struct ringcore_result *result)
{
	result->write_index = load(write_field);
	result->read_index = load(read_field);
	if (!index_valid(ring, result->write_index) || !index_valid(ring, result->read_index))
		return RINGCORE_BAD_INDICES;
	return RINGCORE_OK;
}

/* Host -> guest: append one packet and its trailer, publish the write index,
 * and say whether the guest must be signalled (empty -> non-empty while its
 * interrupt mask is clear). */
static int ringcore_write(struct ringcore_ring *ring, char *first, uint64_t first_size,
			  const char *packet, uint64_t length, struct ringcore_result *result)
{
	BIND(ring);
	volatile uint32_t *write_field = control_field(ring, memory, FIELD(write_index));
	volatile uint32_t *read_field = control_field(ring, memory, FIELD(read_index));
	volatile uint32_t *mask_field = control_field(ring, memory, FIELD(interrupt_mask));

	clear(result);
	if (write_field == NULL || read_field == NULL || mask_field == NULL)
		return RINGCORE_BAD_LAYOUT;
	if (length == 0 || length % RINGCORE_INDEX_ALIGN)
		return RINGCORE_BAD_PACKET;
	int status = indices(ring, write_field, read_field, result);
	if (status != RINGCORE_OK)
		return status;
	uint32_t start = result->write_index;
	result->free = ring->data_size - distance(ring, result->read_index, start) - RINGCORE_TRAILER;
	result->needed = length + RINGCORE_TRAILER;
	if (length > result->free || result->needed > result->free)   /* the first: no wrap of the sum */
		return RINGCORE_FULL;
	struct vmbus_ring_trailer trailer = { .reserved = 0, .start_index = start };
	if (!copy_ring(ring, memory, start, (char *)packet, (uint32_t)length, INTO_RING) ||
	    !copy_ring(ring, memory, advance(ring, start, length), (char *)&trailer, RINGCORE_TRAILER, INTO_RING))
		return RINGCORE_BAD_LAYOUT;
	publish(write_field, advance(ring, start, result->needed));
	full_fence();
	if (load(mask_field))
		return RINGCORE_OK;
	result->read_index = load(read_field);
	if (!index_valid(ring, result->read_index))
		return RINGCORE_BAD_READ_INDEX;
	result->signal = result->read_index == start;
	return RINGCORE_OK;
}

/* Guest -> host, the end of a read: publish the read index past the packet
 * that ``result`` describes (as ringcore_read validated and copied it) and say
 * whether the guest must be signalled (it published a pending send size that
 * this read's space now satisfies). */
static int consume(const struct ringcore_ring *ring, const struct ringcore_memory *memory, struct ringcore_result *result)
{
	volatile uint32_t *read_field = control_field(ring, memory, FIELD(read_index));
	volatile uint32_t *pending_field = control_field(ring, memory, FIELD(pending_send_sz));

	if (read_field == NULL || pending_field == NULL)
		return RINGCORE_BAD_LAYOUT;
	uint64_t old_free = ring->data_size - result->available - RINGCORE_TRAILER;
	uint64_t new_free = old_free + result->length + RINGCORE_TRAILER;
	publish(read_field, advance(ring, result->read_index, (uint64_t)result->length + RINGCORE_TRAILER));
	full_fence();
	/* Some writers store size - 1: the low bits are not part of the size. */
	uint64_t pending = load(pending_field) & ~(uint32_t)(RINGCORE_INDEX_ALIGN - 1);
	result->signal = pending != 0 && old_free < pending && pending <= new_free;
	return RINGCORE_OK;
}

/* Guest -> host: copy the next packet (descriptor onward, no trailer) to
 * ``out``, its descriptor as validated, and consume it.  A packet longer than
 * ``capacity`` is left in the ring (RINGCORE_LARGE_PACKET, its ``length`` in
 * ``result``): the caller may read again with more room. */
static int ringcore_read(struct ringcore_ring *ring, char *first, uint64_t first_size,
			 char *out, uint64_t capacity, struct ringcore_result *result)
{
	BIND(ring);
	volatile uint32_t *write_field = control_field(ring, memory, FIELD(write_index));
	volatile uint32_t *read_field = control_field(ring, memory, FIELD(read_index));
	struct vmpacket_descriptor descriptor;

	clear(result);
	if (write_field == NULL || read_field == NULL || capacity < RINGCORE_DESCRIPTOR)
		return RINGCORE_BAD_LAYOUT;
	int status = indices(ring, write_field, read_field, result);
	if (status != RINGCORE_OK)
		return status;
	uint32_t start = result->read_index;
	result->available = distance(ring, start, result->write_index);
	if (result->available == 0)
		return RINGCORE_EMPTY;
	if (result->available < RINGCORE_DESCRIPTOR + RINGCORE_TRAILER)
		return RINGCORE_SHORT;
	if (!copy_ring(ring, memory, start, out, RINGCORE_DESCRIPTOR, OUT_OF_RING))
		return RINGCORE_BAD_LAYOUT;
	memcpy(&descriptor, out, sizeof(descriptor));   /* validated from the copy returned: read once */
	result->offset8 = descriptor.offset8;
	result->len8 = descriptor.len8;
	uint64_t length = (uint64_t)descriptor.len8 * 8;
	if (length < RINGCORE_DESCRIPTOR || descriptor.offset8 < RINGCORE_DESCRIPTOR / 8 || descriptor.offset8 > descriptor.len8 ||
	    length + RINGCORE_TRAILER > result->available)
		return RINGCORE_BAD_DESCRIPTOR;
	result->length = (uint32_t)length;
	if (length > capacity)
		return RINGCORE_LARGE_PACKET;
	if (!copy_ring(ring, memory, advance(ring, start, RINGCORE_DESCRIPTOR), out + RINGCORE_DESCRIPTOR,
		       result->length - RINGCORE_DESCRIPTOR, OUT_OF_RING))
		return RINGCORE_BAD_LAYOUT;
	return consume(ring, memory, result);
}

/* Bytes between the indices (write_index and read_index, each validated alone). */
static int used(const struct ringcore_ring *ring, const struct ringcore_memory *memory, struct ringcore_result *result)
{
	volatile uint32_t *write_field = control_field(ring, memory, FIELD(write_index));
	volatile uint32_t *read_field = control_field(ring, memory, FIELD(read_index));

	clear(result);
	if (write_field == NULL || read_field == NULL)
		return RINGCORE_BAD_LAYOUT;
	result->write_index = load(write_field);
	if (!index_valid(ring, result->write_index))
		return RINGCORE_BAD_WRITE_INDEX;
	result->read_index = load(read_field);
	if (!index_valid(ring, result->read_index))
		return RINGCORE_BAD_READ_INDEX;
	result->available = distance(ring, result->read_index, result->write_index);
	result->free = ring->data_size - result->available - RINGCORE_TRAILER;
	return RINGCORE_OK;
}

static int ringcore_used(struct ringcore_ring *ring, char *first, uint64_t first_size, struct ringcore_result *result)
{
	BIND(ring);
	return used(ring, memory, result);
}

/* Host -> guest, blocked: publish the pending send size, then look again at
 * the space (the guest may have freed it meanwhile); withdraw it if there. */
static int ringcore_wait_for_space(struct ringcore_ring *ring, char *first, uint64_t first_size, uint64_t needed,
				   struct ringcore_result *result)
{
	BIND(ring);
	volatile uint32_t *pending_field = control_field(ring, memory, FIELD(pending_send_sz));

	clear(result);
	if (pending_field == NULL)
		return RINGCORE_BAD_LAYOUT;
	result->needed = needed;
	publish(pending_field, (uint32_t)((needed + RINGCORE_INDEX_ALIGN - 1) & ~(uint64_t)(RINGCORE_INDEX_ALIGN - 1)));
	full_fence();
	int status = used(ring, memory, result);
	result->needed = needed;
	if (status != RINGCORE_OK)
		return status;
	if (result->free >= needed) {
		publish(pending_field, 0);
		result->ready = 1;
	}
	return RINGCORE_OK;
}

/* At open, host -> guest: advertise pending-send-size support, clear our pending size. */
static int ringcore_start_outgoing(struct ringcore_ring *ring, char *first, uint64_t first_size)
{
	BIND(ring);
	volatile uint32_t *features = control_field(ring, memory, FIELD(feature_bits));
	volatile uint32_t *pending = control_field(ring, memory, FIELD(pending_send_sz));

	if (features == NULL || pending == NULL)
		return RINGCORE_BAD_LAYOUT;
	publish(features, VMBUS_RING_FEAT_PENDING_SEND_SZ);
	publish(pending, 0);
	return RINGCORE_OK;
}

/* At open, guest -> host: the host wants interrupts for new data. */
static int ringcore_start_incoming(struct ringcore_ring *ring, char *first, uint64_t first_size)
{
	BIND(ring);
	volatile uint32_t *mask = control_field(ring, memory, FIELD(interrupt_mask));

	if (mask == NULL)
		return RINGCORE_BAD_LAYOUT;
	publish(mask, 0);
	return RINGCORE_OK;
}
