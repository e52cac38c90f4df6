/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: the snapshot and migration stream (docs/snapshot.md).  A header,
 * then sections, each checksummed; all integers little-endian.
 */
#ifndef MSHVSTACK_SNAPSHOT_H
#define MSHVSTACK_SNAPSHOT_H

#include <linux/types.h>

#define MSHVSTACK_SNAPSHOT_VERSION        1

#define MSHVSTACK_SECTION_CONFIG          1   /* the machine's configuration, JSON */
#define MSHVSTACK_SECTION_VP              2   /* one VP: registers and state blobs */
#define MSHVSTACK_SECTION_MEMORY          3   /* guest pages of one range, zero pages left out */
#define MSHVSTACK_SECTION_DEVICE          4   /* one device's state, JSON */
#define MSHVSTACK_SECTION_CLOCK           5   /* the partition's reference time when it stopped (__u64) */
#define MSHVSTACK_SECTION_MEMORY_ZLIB     6   /* a MEMORY payload, compressed with zlib (RFC 1950) */
#define MSHVSTACK_SECTION_END             0x454E4421   /* the stream is complete */

struct mshvstack_snapshot_header {
	__u8  magic[8];                 /* "MSHVSNAP" */
	__u32 version;
	__u32 flags;                    /* 0 */
};

struct mshvstack_snapshot_section {
	__u32 kind;
	__u32 crc32;                    /* CRC-32 (zlib's) of kind and length (little-endian), then the payload */
	__u64 length;                   /* payload bytes that follow */
};

/* MSHVSTACK_SECTION_VP: then `registers` entries, then `blobs` (each followed by its
 * bytes, padded to 8). */
struct mshvstack_snapshot_vp {
	__u32 index;
	__u32 registers;
	__u32 blobs;
	__u32 reserved;
};

struct mshvstack_snapshot_register {
	__u32 name;                     /* hv_register_name */
	__u32 reserved;
	__u64 low;
	__u64 high;
};

struct mshvstack_snapshot_blob {
	__u32 kind;                     /* MSHV_VP_STATE_* */
	__u32 length;
};

/* MSHVSTACK_SECTION_MEMORY: then a bitmap of `pages` bits (bit i: page i follows),
 * padded to 8 bytes, then the 4 KiB pages whose bit is set, in order. */
struct mshvstack_snapshot_memory {
	__u64 gpa;
	__u64 pages;
};

#endif
