/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: synthetic network (netvsc/netvsp) wire formats: NVSP, the
 * protocol on the channel's ring, written from
 * shared/reference/netvsc.md section 2.  RNDIS, carried inside NVSP, is in
 * rndis.h.  Little-endian, packed; every NVSP message is 40 bytes.
 */
#ifndef MSHVSTACK_VMBUS_NETVSC_H
#define MSHVSTACK_VMBUS_NETVSC_H

#include <linux/types.h>
#include "vmbus.h"

/* ---- protocol versions the guest offers (one at a time, newest first) ---- */
#define NVSP_PROTOCOL_VERSION_1     0x00000002
#define NVSP_PROTOCOL_VERSION_2     0x00030002
#define NVSP_PROTOCOL_VERSION_4     0x00040000
#define NVSP_PROTOCOL_VERSION_5     0x00050000
#define NVSP_PROTOCOL_VERSION_6     0x00060000
#define NVSP_PROTOCOL_VERSION_61    0x00060001

/* ---- message types ---- */
#define NVSP_MSG_TYPE_INIT                      1
#define NVSP_MSG_TYPE_INIT_COMPLETE             2
#define NVSP_MSG1_TYPE_SEND_NDIS_VER            100
#define NVSP_MSG1_TYPE_SEND_RECV_BUF            101
#define NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE   102
#define NVSP_MSG1_TYPE_REVOKE_RECV_BUF          103
#define NVSP_MSG1_TYPE_SEND_SEND_BUF            104
#define NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE   105
#define NVSP_MSG1_TYPE_REVOKE_SEND_BUF          106
#define NVSP_MSG1_TYPE_SEND_RNDIS_PKT           107
#define NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE  108
#define NVSP_MSG2_TYPE_SEND_NDIS_CONFIG         125
#define NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION      128
#define NVSP_MSG4_TYPE_SWITCH_DATA_PATH         129
#define NVSP_MSG5_TYPE_SUBCHANNEL               133
#define NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE   134

/* ---- status in completions ---- */
#define NVSP_STAT_NONE              0
#define NVSP_STAT_SUCCESS           1
#define NVSP_STAT_FAIL              2
#define NVSP_STAT_PROTOCOL_TOO_NEW  3
#define NVSP_STAT_PROTOCOL_TOO_OLD  4
#define NVSP_STAT_INVALID_RNDIS_PKT 5
#define NVSP_STAT_BUSY              6
#define NVSP_STAT_UNSUPPORTED       7

/* The receive buffer's transfer-page set id: Linux checks it on every receive. */
#define NETVSC_RECEIVE_BUFFER_ID    0xCAFE
#define NETVSC_SEND_BUFFER_ID       0
#define NETVSC_INVALID_SECTION      0xFFFFFFFFU
#define NVSP_CHANNEL_TYPE_DATA      0
#define NVSP_CHANNEL_TYPE_CONTROL   1
#define NVSP_SUBCHANNEL_ALLOCATE    1
/* Linux copies every host packet into a buffer of this size and truncates the rest. */
#define NETVSC_MAX_GUEST_PACKET     4624

/* NDIS_CONFIG capability bits */
#define NVSP_CAP_VMQ            0x01
#define NVSP_CAP_CHIMNEY        0x02
#define NVSP_CAP_SRIOV          0x04
#define NVSP_CAP_IEEE8021Q      0x08
#define NVSP_CAP_CORRELATION_ID 0x10
#define NVSP_CAP_TEAMING        0x20
#define NVSP_CAP_VSUBNETID      0x40
#define NVSP_CAP_RSC            0x80

struct nvsp_init {
	__u32 min_protocol_ver;
	__u32 max_protocol_ver;
} VMBUS_PACKED;

struct nvsp_init_complete {
	__u32 negotiated_protocol_ver;
	__u32 max_mdl_chain_len;
	__u32 status;
} VMBUS_PACKED;

struct nvsp_send_ndis_version {
	__u32 ndis_major_ver;
	__u32 ndis_minor_ver;
} VMBUS_PACKED;

/* SEND_RECV_BUF and SEND_SEND_BUF */
struct nvsp_send_buffer {
	__u32 gpadl_handle;
	__u16 id;
	__u16 reserved;
} VMBUS_PACKED;

struct nvsp_receive_buffer_section {
	__u32 offset;
	__u32 sub_alloc_size;
	__u32 num_sub_allocs;
	__u32 end_offset;
} VMBUS_PACKED;

struct nvsp_send_recv_buf_complete {
	__u32 status;
	__u32 num_sections;
	struct nvsp_receive_buffer_section section;   /* Linux accepts exactly one */
} VMBUS_PACKED;

struct nvsp_send_send_buf_complete {
	__u32 status;
	__u32 section_size;
} VMBUS_PACKED;

/* REVOKE_RECV_BUF and REVOKE_SEND_BUF */
struct nvsp_revoke_buffer {
	__u16 id;
	__u16 reserved;
} VMBUS_PACKED;

struct nvsp_send_rndis_packet {
	__u32 channel_type;
	__u32 send_buf_section_index;
	__u32 send_buf_section_size;
} VMBUS_PACKED;

struct nvsp_send_rndis_packet_complete {
	__u32 status;
} VMBUS_PACKED;

struct nvsp_send_ndis_config {
	__u32 mtu;
	__u32 reserved;
	__u64 capability;
} VMBUS_PACKED;

struct nvsp_switch_data_path {
	__u32 active_datapath;
} VMBUS_PACKED;

struct nvsp_subchannel_request {
	__u32 op;
	__u32 num_subchannels;
} VMBUS_PACKED;

struct nvsp_subchannel_complete {
	__u32 status;
	__u32 num_subchannels;
} VMBUS_PACKED;

struct nvsp_message {
	__u32 msg_type;
	union {
		struct nvsp_init init;
		struct nvsp_init_complete init_complete;
		struct nvsp_send_ndis_version send_ndis_ver;
		struct nvsp_send_buffer send_buf;
		struct nvsp_send_recv_buf_complete recv_buf_complete;
		struct nvsp_send_send_buf_complete send_buf_complete;
		struct nvsp_revoke_buffer revoke_buf;
		struct nvsp_send_rndis_packet rndis_pkt;
		struct nvsp_send_rndis_packet_complete rndis_pkt_complete;
		struct nvsp_send_ndis_config ndis_config;
		struct nvsp_switch_data_path switch_data_path;
		struct nvsp_subchannel_request subchannel_request;
		struct nvsp_subchannel_complete subchannel_complete;
		__u8 raw[36];
	} msg;
} VMBUS_PACKED;

/* The guest's receive completion: the only 8-byte NVSP message. */
struct nvsp_rndis_packet_completion {
	__u32 msg_type;
	__u32 status;
} VMBUS_PACKED;

#endif /* MSHVSTACK_VMBUS_NETVSC_H */
