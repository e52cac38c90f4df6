/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: a device's DMA between a file and guest RAM, one call per request.
 *
 * A disk request names its guest buffer as a list of frame numbers, the
 * transfer starting some bytes into the first.  Python slicing a view per
 * page and handing the views to preadv cost more than the I/O itself for a
 * 1 MiB request (256 scattered pages); here the pages become an iovec array
 * over the region's host mapping, consecutive pages joined, and the file is
 * read or written straight through it.
 *
 * The frames come from the guest: each is checked against the region before
 * anything moves (DMA_OUTSIDE if one is not in it), and the caller holds the
 * region's mapping for the call.  The pieces are returned as (host address,
 * length) pairs, so that the caller can tell whoever watches guest RAM what
 * changed.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define DMA_OK 0
#define DMA_OUTSIDE 1   /* a frame outside the region, or the transfer longer than the frames: nothing moved */
#define DMA_IO_ERROR 2  /* the file refused (errno in *error); bytes may have landed */
#define DMA_PAGE 4096u
#define DMA_IOV_BATCH 1024   /* IOV_MAX on Linux */

static int dma_pieces(char *host, uint64_t host_size, uint64_t region_pfn, const uint64_t *pfns, uint32_t count,
		      uint32_t first_offset, uint64_t length, struct iovec *iov, uint32_t *pieces)
{
	uint32_t n = 0;
	uint64_t left = length;
	if (first_offset >= DMA_PAGE)
		return DMA_OUTSIDE;
	for (uint32_t i = 0; left && i < count; i++) {
		uint64_t pfn = pfns[i];
		if (pfn < region_pfn || pfn - region_pfn >= host_size / DMA_PAGE)
			return DMA_OUTSIDE;
		uint64_t start = (pfn - region_pfn) * DMA_PAGE + (i == 0 ? first_offset : 0);
		uint64_t size = DMA_PAGE - (start % DMA_PAGE);
		if (size > left)
			size = left;
		if (n && (char *)iov[n - 1].iov_base + iov[n - 1].iov_len == host + start)
			iov[n - 1].iov_len += size;
		else
			iov[n++] = (struct iovec){host + start, size};
		left -= size;
	}
	if (left)
		return DMA_OUTSIDE;
	*pieces = n;
	return DMA_OK;
}

/* Move the bytes of iov[0..n) between `fd` at `file_offset` and guest RAM, to the end or
 * to the first error (the array is consumed).  A read past the end of the file zeroes the
 * rest.  Returns DMA_OK or DMA_IO_ERROR (errno in *error). */
static int dma_move(int fd, int to_file, uint64_t file_offset, struct iovec *iov, uint32_t n, int *error)
{
	uint32_t at = 0;
	while (at < n) {
		int batch = (int)(n - at < DMA_IOV_BATCH ? n - at : DMA_IOV_BATCH);
		ssize_t done = to_file ? pwritev(fd, iov + at, batch, (off_t)file_offset)
				       : preadv(fd, iov + at, batch, (off_t)file_offset);
		if (done < 0 && errno == EINTR)
			continue;
		if (done < 0 || (done == 0 && to_file)) {
			*error = done < 0 ? errno : EIO;   /* (a write that moves nothing would never end) */
			return DMA_IO_ERROR;
		}
		if (done == 0) {   /* the end of the file: the rest reads as zeros */
			for (; at < n; at++)
				memset(iov[at].iov_base, 0, iov[at].iov_len);
			break;
		}
		file_offset += (uint64_t)done;
		/* Step past what moved; a short transfer goes on mid-piece. */
		while (done > 0 && at < n) {
			if ((size_t)done >= iov[at].iov_len) {
				done -= (ssize_t)iov[at].iov_len;
				at++;
			} else {
				iov[at].iov_base = (char *)iov[at].iov_base + done;
				iov[at].iov_len -= (size_t)done;
				done = 0;
			}
		}
	}
	return DMA_OK;
}

/* The second half of a large transfer, moved by a thread of its own. */
struct dma_half {
	int fd, to_file, status, error;
	uint64_t file_offset;
	struct iovec *iov;
	uint32_t n;
};

static void *dma_half_run(void *arg)
{
	struct dma_half *h = arg;
	h->status = dma_move(h->fd, h->to_file, h->file_offset, h->iov, h->n, &h->error);
	return NULL;
}

/* Split iov[0..*n) (room for `capacity`) where half of `length` lies, cutting a piece in
 * two at a page boundary when no boundary between pieces is near; returns the first
 * piece of the second half and its offset from the start (0: no useful split). */
static uint32_t dma_split(struct iovec *iov, uint32_t *n, uint32_t capacity, uint64_t length, uint64_t *before)
{
	uint64_t done = 0;
	for (uint32_t i = 0; i < *n; i++) {
		if (done + iov[i].iov_len <= length / 2) {
			done += iov[i].iov_len;
			continue;
		}
		uint64_t cut = (length / 2 - done) & ~(uint64_t)(DMA_PAGE - 1);
		if (cut == 0 || cut >= iov[i].iov_len || *n >= capacity) {   /* at a piece boundary */
			*before = i ? done : done + iov[i].iov_len;
			return i ? i : (*n > 1 ? 1 : 0);
		}
		memmove(&iov[i + 2], &iov[i + 1], (size_t)(*n - i - 1) * sizeof *iov);   /* cut piece i in two */
		iov[i + 1] = (struct iovec){(char *)iov[i].iov_base + cut, iov[i].iov_len - cut};
		iov[i].iov_len = cut;
		(*n)++;
		*before = done + cut;
		return i + 1;
	}
	return 0;
}

/* Move `length` bytes between `fd` at `file_offset` and the guest buffer: to the file
 * (`to_file`, a guest WRITE) or from it (a READ; past the end of the file the rest is
 * zeroed).  From `parallel_min` bytes on, the second half moves on a thread of its own
 * while this one moves the first (the host copies at twice the rate where a core is
 * free; the halves touch disjoint bytes of the file and of guest RAM).  `iov` has room
 * for `count` pieces; on return `*pieces` of them describe the buffer, also after an
 * I/O error (a read may have landed in part). */
int dma_file(int fd, int to_file, uint64_t file_offset, uint64_t length, char *host, uint64_t host_size,
	     uint64_t region_pfn, const uint64_t *pfns, uint32_t count, uint32_t first_offset,
	     struct iovec *iov, uint32_t *pieces, int *error, uint64_t parallel_min)
{
	uint32_t n = 0;
	*pieces = 0;
	*error = 0;
	int status = dma_pieces(host, host_size, region_pfn, pfns, count, first_offset, length, iov, &n);
	if (status != DMA_OK)
		return status;
	uint64_t before = 0;
	uint32_t second = length >= parallel_min ? dma_split(iov, &n, count, length, &before) : 0;
	pthread_t thread;
	struct dma_half half = {fd, to_file, DMA_OK, 0, file_offset + before, iov + second, n - second};
	int threaded = second && pthread_create(&thread, NULL, dma_half_run, &half) == 0;
	status = dma_move(fd, to_file, file_offset, iov, second ? second : n, error);
	if (threaded)
		pthread_join(thread, NULL);
	else if (second)   /* no thread to be had: the second half after the first */
		dma_half_run(&half);
	if (status == DMA_OK && half.status != DMA_OK) {
		status = half.status;
		*error = half.error;
	}
	/* The pieces as they were, for the caller's report (the moves consumed them). */
	dma_pieces(host, host_size, region_pfn, pfns, count, first_offset, length, iov, &n);
	*pieces = n;
	return status;
}
