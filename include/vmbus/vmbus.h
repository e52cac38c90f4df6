/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: VMBus wire formats — channel-management messages, ring control
 * page, packet descriptors, pipe and integration-component framing.
 * Written from shared/reference/vmbus_protocol.md; all wire structs are
 * packed little-endian.  GUIDs are 16-byte arrays in Microsoft byte order
 * (Python: uuid.UUID(...).bytes_le).
 */
#ifndef MSHVSTACK_VMBUS_VMBUS_H
#define MSHVSTACK_VMBUS_VMBUS_H

#include <linux/types.h>

#define VMBUS_PACKED __attribute__((packed))

/* ---- transport identifiers ---- */
#define VMBUS_MESSAGE_SINT              2
#define VMBUS_MESSAGE_CONNECTION_ID     1
#define VMBUS_MESSAGE_CONNECTION_ID_4   4
#define VMBUS_EVENT_CONNECTION_ID       2
#define VMBUS_MONITOR_CONNECTION_ID     3
#define VMBUS_SYNIC_MESSAGE_TYPE        1
#define VMBUS_CONNECTION_ID_MASK        0x00FFFFFF
#define VMBUS_MAX_CHANNELS              2047
#define VMBUS_MESSAGE_MAX_PAYLOAD       240
#define VMBUS_PAGE_SIZE                 4096
#define VMBUS_VP_INDEX_DISABLE_INTERRUPT 0xFFFFFFFFU

/* ---- protocol versions (major << 16 | minor) ---- */
#define VMBUS_VERSION_WS2008            0x0000000D
#define VMBUS_VERSION_WIN7              0x00010001
#define VMBUS_VERSION_WIN8              0x00020004
#define VMBUS_VERSION_WIN8_1            0x00030000
#define VMBUS_VERSION_WIN10             0x00040000
#define VMBUS_VERSION_WIN10_V4_1        0x00040001
#define VMBUS_VERSION_WIN10_V5          0x00050000
#define VMBUS_VERSION_WIN10_V5_1        0x00050001
#define VMBUS_VERSION_WIN10_V5_2        0x00050002
#define VMBUS_VERSION_WIN10_V5_3        0x00050003

/* ---- channel-management message types ---- */
#define CHANNELMSG_INVALID                  0
#define CHANNELMSG_OFFERCHANNEL             1
#define CHANNELMSG_RESCIND_CHANNELOFFER     2
#define CHANNELMSG_REQUESTOFFERS            3
#define CHANNELMSG_ALLOFFERS_DELIVERED      4
#define CHANNELMSG_OPENCHANNEL              5
#define CHANNELMSG_OPENCHANNEL_RESULT       6
#define CHANNELMSG_CLOSECHANNEL             7
#define CHANNELMSG_GPADL_HEADER             8
#define CHANNELMSG_GPADL_BODY               9
#define CHANNELMSG_GPADL_CREATED            10
#define CHANNELMSG_GPADL_TEARDOWN           11
#define CHANNELMSG_GPADL_TORNDOWN           12
#define CHANNELMSG_RELID_RELEASED           13
#define CHANNELMSG_INITIATE_CONTACT         14
#define CHANNELMSG_VERSION_RESPONSE         15
#define CHANNELMSG_UNLOAD                   16
#define CHANNELMSG_UNLOAD_RESPONSE          17
#define CHANNELMSG_18                       18
#define CHANNELMSG_19                       19
#define CHANNELMSG_20                       20
#define CHANNELMSG_TL_CONNECT_REQUEST       21
#define CHANNELMSG_MODIFYCHANNEL            22
#define CHANNELMSG_TL_CONNECT_RESULT        23
#define CHANNELMSG_MODIFYCHANNEL_RESPONSE   24
#define CHANNELMSG_COUNT                    25

/* ---- offer channel flags ---- */
#define VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE    0x0001
#define VMBUS_CHANNEL_SERVER_SUPPORTS_TRANSFER_PAGES 0x0002
#define VMBUS_CHANNEL_SERVER_SUPPORTS_GPADLS        0x0004
#define VMBUS_CHANNEL_NAMED_PIPE_MODE               0x0010
#define VMBUS_CHANNEL_LOOPBACK_OFFER                0x0100
#define VMBUS_CHANNEL_PARENT_OFFER                  0x0200
#define VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION 0x0400
#define VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER          0x2000
#define VMBUS_PIPE_MODE_BYTE                        0
#define VMBUS_PIPE_MODE_MESSAGE                     4

struct vmbus_channel_message_header {
	__u32 msgtype;
	__u32 padding;
} VMBUS_PACKED;

struct vmbus_channel_offer_channel {
	struct vmbus_channel_message_header header;
	__u8  if_type[16];
	__u8  if_instance[16];
	__u64 reserved1;
	__u64 reserved2;
	__u16 chn_flags;
	__u16 mmio_megabytes;
	union {
		__u8 user_defined[120];
		struct {
			__u32 pipe_mode;
			__u8  user_data[116];
		} VMBUS_PACKED pipe;
	};
	__u16 sub_channel_index;
	__u16 reserved3;
	__u32 child_relid;
	__u8  monitorid;
	__u8  monitor_allocated;
	__u16 is_dedicated_interrupt;
	__u32 connection_id;
} VMBUS_PACKED;

struct vmbus_channel_rescind_offer {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
} VMBUS_PACKED;

struct vmbus_channel_open_channel {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 openid;
	__u32 ringbuffer_gpadlhandle;
	__u32 target_vp;
	__u32 downstream_ringbuffer_pageoffset;
	__u8  userdata[120];
} VMBUS_PACKED;

struct vmbus_channel_open_result {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 openid;
	__u32 status;
} VMBUS_PACKED;

struct vmbus_channel_close_channel {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
} VMBUS_PACKED;

struct vmbus_gpa_range {
	__u32 byte_count;
	__u32 byte_offset;
	__u64 pfn_array[];
} VMBUS_PACKED;

struct vmbus_channel_gpadl_header {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 gpadl;
	__u16 range_buflen;
	__u16 rangecount;
	__u8  range[];
} VMBUS_PACKED;

struct vmbus_channel_gpadl_body {
	struct vmbus_channel_message_header header;
	__u32 msgnumber;
	__u32 gpadl;
	__u64 pfn[];
} VMBUS_PACKED;

struct vmbus_channel_gpadl_created {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 gpadl;
	__u32 creation_status;
} VMBUS_PACKED;

struct vmbus_channel_gpadl_teardown {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 gpadl;
} VMBUS_PACKED;

struct vmbus_channel_gpadl_torndown {
	struct vmbus_channel_message_header header;
	__u32 gpadl;
} VMBUS_PACKED;

struct vmbus_channel_relid_released {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
} VMBUS_PACKED;

struct vmbus_channel_initiate_contact {
	struct vmbus_channel_message_header header;
	__u32 vmbus_version_requested;
	__u32 target_vcpu;
	union {
		__u64 interrupt_page;
		struct {
			__u8  msg_sint;
			__u8  msg_vtl;
			__u8  reserved[2];
			__u32 feature_flags;
		} VMBUS_PACKED target;
	};
	__u64 monitor_page1;
	__u64 monitor_page2;
} VMBUS_PACKED;

struct vmbus_channel_version_response {
	struct vmbus_channel_message_header header;
	__u8  version_supported;
	__u8  connection_state;
	__u16 padding;
	__u32 msg_conn_id;
} VMBUS_PACKED;

struct vmbus_channel_modifychannel {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 target_vp;
} VMBUS_PACKED;

struct vmbus_channel_modifychannel_response {
	struct vmbus_channel_message_header header;
	__u32 child_relid;
	__u32 status;
} VMBUS_PACKED;

/* ---- ring buffers ---- */
#define VMBUS_RING_FEAT_PENDING_SEND_SZ 0x1
#define VMBUS_RING_DATA_OFFSET          4096
#define VMBUS_RING_INDEX_ALIGN          8   /* indices, packet lengths and the data area: multiples of it */

struct vmbus_ring_control {
	__u32 write_index;
	__u32 read_index;
	__u32 interrupt_mask;
	__u32 pending_send_sz;
	__u32 reserved1[12];
	__u32 feature_bits;
} VMBUS_PACKED;

/* Follows every packet in the data area (the next packet starts after it):
 * the write_index at which the packet started, in the upper half.  Readers
 * skip it; nobody validates it. */
struct vmbus_ring_trailer {
	__u32 reserved;
	__u32 start_index;
} VMBUS_PACKED;

/* ---- packets ---- */
#define VMBUS_PACKET_INVALID                0x0
#define VMBUS_PACKET_SYNCH                  0x1
#define VMBUS_PACKET_ADD_XFER_PAGESET       0x2
#define VMBUS_PACKET_RM_XFER_PAGESET        0x3
#define VMBUS_PACKET_ESTABLISH_GPADL        0x4
#define VMBUS_PACKET_TEARDOWN_GPADL         0x5
#define VMBUS_PACKET_DATA_INBAND            0x6
#define VMBUS_PACKET_DATA_USING_XFER_PAGES  0x7
#define VMBUS_PACKET_DATA_USING_GPADL       0x8
#define VMBUS_PACKET_DATA_USING_GPA_DIRECT  0x9
#define VMBUS_PACKET_CANCEL_REQUEST         0xA
#define VMBUS_PACKET_COMP                   0xB
#define VMBUS_PACKET_DATA_USING_ADDITIONAL  0xC
#define VMBUS_PACKET_ADDITIONAL_DATA        0xD
#define VMBUS_PACKET_FLAG_COMPLETION_REQUESTED 0x1

struct vmpacket_descriptor {
	__u16 type;
	__u16 offset8;
	__u16 len8;
	__u16 flags;
	__u64 trans_id;
} VMBUS_PACKED;

struct vmdata_gpa_direct_header {
	struct vmpacket_descriptor d;
	__u32 reserved;
	__u32 range_count;
} VMBUS_PACKED;

struct vmtransfer_page_range {
	__u32 byte_count;
	__u32 byte_offset;
} VMBUS_PACKED;

struct vmtransfer_page_packet_header {
	struct vmpacket_descriptor d;
	__u16 xfer_pageset_id;
	__u8  sender_owns_set;
	__u8  reserved;
	__u32 range_count;
	struct vmtransfer_page_range ranges[];
} VMBUS_PACKED;

/* ---- pipe framing (named-pipe mode channels: ICs) ---- */
#define VMBUS_PIPE_TYPE_DATA                1
#define VMBUS_PIPE_TYPE_PARTIAL             2
#define VMBUS_PIPE_TYPE_SETUP_GPA_DIRECT    3
#define VMBUS_PIPE_TYPE_TEARDOWN_GPA_DIRECT 4

struct vmbus_pipe_header {
	__u32 packet_type;
	__u32 data_size;
} VMBUS_PACKED;

/* ---- integration components ---- */
#define ICMSGTYPE_NEGOTIATE     0
#define ICMSGTYPE_HEARTBEAT     1
#define ICMSGTYPE_KVPEXCHANGE   2
#define ICMSGTYPE_SHUTDOWN      3
#define ICMSGTYPE_TIMESYNC      4
#define ICMSGTYPE_VSS           5
#define ICMSGHDRFLAG_TRANSACTION 0x1
#define ICMSGHDRFLAG_REQUEST    0x2
#define ICMSGHDRFLAG_RESPONSE   0x4
#define IC_STATUS_OK            0x00000000
#define IC_STATUS_E_FAIL        0x80004005
#define IC_STATUS_S_CONT        0x80070103
#define IC_SHUTDOWN_FLAG_FORCE  0x1
#define IC_SHUTDOWN_FLAG_RESTART 0x2
#define IC_SHUTDOWN_FLAG_HIBERNATE 0x4
#define IC_SHUTDOWN_REASON_PLANNED 0x80000000U
#define IC_TIMESYNC_FLAG_PROBE  0
#define IC_TIMESYNC_FLAG_SYNC   1
#define IC_TIMESYNC_FLAG_SAMPLE 2
#define IC_WLTIMEDELTA          116444736000000000ULL

struct ic_version {
	__u16 major;
	__u16 minor;
} VMBUS_PACKED;

struct icmsg_hdr {
	struct ic_version icverframe;
	__u16 icmsgtype;
	struct ic_version icvermsg;
	__u16 icmsgsize;
	__u32 status;
	__u8  ictransaction_id;
	__u8  icflags;
	__u8  reserved[2];
} VMBUS_PACKED;

struct icmsg_negotiate {
	__u16 icframe_vercnt;
	__u16 icmsg_vercnt;
	__u32 reserved;
	struct ic_version icversion_data[];
} VMBUS_PACKED;

struct heartbeat_msg_data {
	__u64 seq_num;
	__u32 reserved[8];
} VMBUS_PACKED;

struct shutdown_msg_data {
	__u32 reason_code;
	__u32 timeout_seconds;
	__u32 flags;
	__u8  display_message[2048];
} VMBUS_PACKED;

struct ictimesync_data {
	__u64 parenttime;
	__u64 childtime;
	__u64 roundtriptime;
	__u8  flags;
} VMBUS_PACKED;

struct ictimesync_ref_data {
	__u64 parenttime;
	__u64 vmreferencetime;
	__u8  flags;
	__u8  leapflags;
	__u8  stratum;
	__u8  reserved[3];
} VMBUS_PACKED;

/* ---- KVP (key-value pair exchange) ---- */
#define KVP_OP_GET              0
#define KVP_OP_SET              1
#define KVP_OP_DELETE           2
#define KVP_OP_ENUMERATE        3
#define KVP_OP_GET_IP_INFO      4
#define KVP_OP_SET_IP_INFO      5
#define KVP_POOL_EXTERNAL       0
#define KVP_POOL_GUEST          1
#define KVP_POOL_AUTO           2
#define KVP_POOL_AUTO_EXTERNAL  3
#define KVP_POOL_COUNT          4
#define KVP_REG_SZ              1
#define KVP_REG_U32             4
#define KVP_REG_U64             8
#define KVP_MAX_KEY_SIZE        512
#define KVP_MAX_VALUE_SIZE      2048

struct hv_kvp_hdr {
	__u8  operation;
	__u8  pool;
	__u16 pad;
} VMBUS_PACKED;

struct hv_kvp_exchg_msg_value {
	__u32 value_type;
	__u32 key_size;
	__u32 value_size;
	__u8  key[KVP_MAX_KEY_SIZE];
	__u8  value[KVP_MAX_VALUE_SIZE];
} VMBUS_PACKED;

struct hv_kvp_msg_enumerate {
	__u32 index;
	struct hv_kvp_exchg_msg_value data;
} VMBUS_PACKED;

struct hv_kvp_msg_delete {
	__u32 key_size;
	__u8  key[KVP_MAX_KEY_SIZE];
} VMBUS_PACKED;

struct hv_kvp_msg {
	struct hv_kvp_hdr kvp_hdr;
	union {
		struct hv_kvp_exchg_msg_value get;
		struct hv_kvp_exchg_msg_value set;
		struct hv_kvp_msg_delete delete_;
		struct hv_kvp_msg_enumerate enumerate;
	} body;
} VMBUS_PACKED;

#endif /* MSHVSTACK_VMBUS_VMBUS_H */
