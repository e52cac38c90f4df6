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

/* Move `length` bytes between `fd` at `file_offset` and the guest buffer: to the file
 * (`to_file`, a guest WRITE) or from it (a READ; past the end of the file the rest is
 * zeroed).  `iov` has room for `count` pieces; on return `*pieces` of them describe
 * the buffer, also after an I/O error (a read may have landed in part). */
int dma_file(int fd, int to_file, uint64_t file_offset, uint64_t length, char *host, uint64_t host_size,
	     uint64_t region_pfn, const uint64_t *pfns, uint32_t count, uint32_t first_offset,
	     struct iovec *iov, uint32_t *pieces, int *error)
{
	uint32_t n = 0;
	*pieces = 0;
	*error = 0;
	int status = dma_pieces(host, host_size, region_pfn, pfns, count, first_offset, length, iov, &n);
	if (status != DMA_OK)
		return status;
	uint32_t at = 0;
	while (at < n) {
		int batch = (int)(n - at < DMA_IOV_BATCH ? n - at : DMA_IOV_BATCH);
		ssize_t done = to_file ? pwritev(fd, iov + at, batch, (off_t)file_offset)
				       : preadv(fd, iov + at, batch, (off_t)file_offset);
		if (done < 0 && errno == EINTR)
			continue;
		if (done < 0 || (done == 0 && to_file)) {
			*error = done < 0 ? errno : EIO;   /* (a write that moves nothing would never end) */
			status = DMA_IO_ERROR;
			break;
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
	/* The pieces as they were, for the caller's report (the loop consumed them). */
	dma_pieces(host, host_size, region_pfn, pfns, count, first_offset, length, iov, &n);
	*pieces = n;
	return status;
}
