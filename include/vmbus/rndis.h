/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: RNDIS messages as netvsc carries them inside NVSP, the OIDs
 * Linux's hv_netvsc asks for, status indications, per-packet info and the
 * NDIS offload object, written from shared/reference/netvsc.md section 3.
 * Messages are packed little-endian; the NDIS offload object has natural
 * C alignment (it is not packed on the wire either).
 */
#ifndef MSHVSTACK_VMBUS_RNDIS_H
#define MSHVSTACK_VMBUS_RNDIS_H

#include <linux/types.h>
#include "vmbus.h"

/* ---- message types (a completion is the request's type | RNDIS_COMPLETION) ---- */
#define RNDIS_MSG_PACKET            0x00000001
#define RNDIS_MSG_INIT              0x00000002
#define RNDIS_MSG_HALT              0x00000003
#define RNDIS_MSG_QUERY             0x00000004
#define RNDIS_MSG_SET               0x00000005
#define RNDIS_MSG_RESET             0x00000006
#define RNDIS_MSG_INDICATE          0x00000007
#define RNDIS_MSG_KEEPALIVE         0x00000008
#define RNDIS_COMPLETION            0x80000000U
#define RNDIS_MSG_INIT_C            0x80000002U
#define RNDIS_MSG_QUERY_C           0x80000004U
#define RNDIS_MSG_SET_C             0x80000005U
#define RNDIS_MSG_RESET_C           0x80000006U
#define RNDIS_MSG_KEEPALIVE_C       0x80000008U

/* ---- status codes ---- */
#define RNDIS_STATUS_SUCCESS            0x00000000U
#define RNDIS_STATUS_FAILURE            0xC0000001U
#define RNDIS_STATUS_INVALID_DATA       0xC0010015U
#define RNDIS_STATUS_NOT_SUPPORTED      0xC00000BBU
#define RNDIS_STATUS_BUFFER_OVERFLOW    0x80000005U
#define RNDIS_STATUS_MEDIA_CONNECT      0x4001000BU
#define RNDIS_STATUS_MEDIA_DISCONNECT   0x4001000CU
#define RNDIS_STATUS_LINK_SPEED_CHANGE  0x40010013U
#define RNDIS_STATUS_NETWORK_CHANGE     0x40010018U

/* ---- device ---- */
#define RNDIS_MAJOR_VERSION         1
#define RNDIS_MINOR_VERSION         0
#define RNDIS_DF_CONNECTIONLESS     0x00000001
#define RNDIS_MEDIUM_802_3          0
#define NDIS_MEDIA_STATE_CONNECTED      0
#define NDIS_MEDIA_STATE_DISCONNECTED   1

/* ---- OIDs ---- */
#define OID_GEN_SUPPORTED_LIST                  0x00010101U
#define OID_GEN_MAXIMUM_FRAME_SIZE              0x00010106U
#define OID_GEN_LINK_SPEED                      0x00010107U
#define OID_GEN_CURRENT_PACKET_FILTER           0x0001010EU
#define OID_GEN_MEDIA_CONNECT_STATUS            0x00010114U
#define OID_GEN_RECEIVE_SCALE_CAPABILITIES      0x00010203U
#define OID_GEN_RECEIVE_SCALE_PARAMETERS        0x00010204U
#define OID_GEN_FRIENDLY_NAME                   0x00020216U
#define OID_GEN_RNDIS_CONFIG_PARAMETER          0x0001021BU
#define OID_802_3_PERMANENT_ADDRESS             0x01010101U
#define OID_802_3_CURRENT_ADDRESS               0x01010102U
#define OID_TCP_OFFLOAD_PARAMETERS              0xFC01020CU
#define OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES   0xFC01020DU

/* ---- packet filter bits ---- */
#define NDIS_PACKET_TYPE_DIRECTED       0x00000001
#define NDIS_PACKET_TYPE_MULTICAST      0x00000002
#define NDIS_PACKET_TYPE_ALL_MULTICAST  0x00000004
#define NDIS_PACKET_TYPE_BROADCAST      0x00000008
#define NDIS_PACKET_TYPE_PROMISCUOUS    0x00000020

/* ---- NDIS objects ---- */
#define NDIS_OBJECT_TYPE_OFFLOAD            0xA7
#define NDIS_OBJECT_TYPE_DEFAULT            0x80
#define NDIS_OFFLOAD_REVISION_1             1
#define NDIS_OFFLOAD_REVISION_3             3
#define NDIS_OFFLOAD_SIZE_6_0               112
#define NDIS_OFFLOAD_SIZE_6_1               144

/* ---- per-packet info types ---- */
#define RNDIS_PPI_TCPIP_CHKSUM      0
#define RNDIS_PPI_TCP_LARGESEND     2
#define RNDIS_PPI_IEEE_8021Q        6
#define RNDIS_PPI_NBL_HASH_VALUE    8
#define RNDIS_PPI_INTERNAL          0x80000000U
/* receive checksum-info bits (TCPIP_CHKSUM on the host->guest path) */
#define RNDIS_RX_CSUM_TCP_SUCCEEDED 0x08
#define RNDIS_RX_CSUM_UDP_SUCCEEDED 0x10
#define RNDIS_RX_CSUM_IP_SUCCEEDED  0x20

struct rndis_msg_header {
	__u32 msg_type;
	__u32 msg_len;
} VMBUS_PACKED;

struct rndis_initialize_request {
	__u32 req_id;
	__u32 major_ver;
	__u32 minor_ver;
	__u32 max_xfer_size;
} VMBUS_PACKED;

struct rndis_initialize_complete {
	__u32 req_id;
	__u32 status;
	__u32 major_ver;
	__u32 minor_ver;
	__u32 dev_flags;
	__u32 medium;
	__u32 max_pkt_per_msg;
	__u32 max_xfer_size;
	__u32 pkt_alignment_factor;
	__u32 af_list_offset;
	__u32 af_list_size;
} VMBUS_PACKED;

struct rndis_halt_request {
	__u32 req_id;
} VMBUS_PACKED;

/* QUERY and SET requests share one layout; info_buf_offset counts from the request body. */
struct rndis_oid_request {
	__u32 req_id;
	__u32 oid;
	__u32 info_buflen;
	__u32 info_buf_offset;
	__u32 dev_vc_handle;
} VMBUS_PACKED;

struct rndis_query_complete {
	__u32 req_id;
	__u32 status;
	__u32 info_buflen;
	__u32 info_buf_offset;
} VMBUS_PACKED;

struct rndis_set_complete {
	__u32 req_id;
	__u32 status;
} VMBUS_PACKED;

struct rndis_keepalive_request {
	__u32 req_id;
} VMBUS_PACKED;

struct rndis_keepalive_complete {
	__u32 req_id;
	__u32 status;
} VMBUS_PACKED;

struct rndis_reset_complete {
	__u32 status;
	__u32 addressing_reset;
} VMBUS_PACKED;

struct rndis_indicate_status {
	__u32 status;
	__u32 status_buflen;
	__u32 status_buf_offset;
} VMBUS_PACKED;

struct rndis_packet {
	__u32 data_offset;
	__u32 data_len;
	__u32 oob_data_offset;
	__u32 oob_data_len;
	__u32 num_oob_data_elements;
	__u32 per_pkt_info_offset;
	__u32 per_pkt_info_len;
	__u32 vc_handle;
	__u32 reserved;
} VMBUS_PACKED;

struct rndis_per_packet_info {
	__u32 size;
	__u32 type;
	__u32 ppi_offset;
} VMBUS_PACKED;

/* The value of a 32-bit OID (frame size, media state, link speed, packet filter). */
struct rndis_oid_u32 {
	__u32 value;
} VMBUS_PACKED;

/* A whole RNDIS PACKET message header as the host writes it into a receive section. */
struct rndis_packet_message {
	struct rndis_msg_header header;
	struct rndis_packet packet;
} VMBUS_PACKED;

/* ---- NDIS offload capabilities (natural alignment: 156 bytes at revision 3) ---- */
struct ndis_object_header {
	__u8  type;
	__u8  revision;
	__u16 size;
};

struct ndis_csum_offload {
	__u32 ip4_txenc;
	__u32 ip4_txcsum;
	__u32 ip4_rxenc;
	__u32 ip4_rxcsum;
	__u32 ip6_txenc;
	__u32 ip6_txcsum;
	__u32 ip6_rxenc;
	__u32 ip6_rxcsum;
};

struct ndis_lsov1_offload {
	__u32 encap;
	__u32 maxsize;
	__u32 minsegs;
	__u32 opts;
};

struct ndis_ipsecv1_offload {
	__u32 encap;
	__u32 ah_esp;
	__u32 xport_tun;
	__u32 ip4_opts;
	__u32 flags;
	__u32 ip4_ah;
	__u32 ip4_esp;
};

struct ndis_lsov2_offload {
	__u32 ip4_encap;
	__u32 ip4_maxsz;
	__u32 ip4_minsg;
	__u32 ip6_encap;
	__u32 ip6_maxsz;
	__u32 ip6_minsg;
	__u32 ip6_opts;
};

struct ndis_ipsecv2_offload {
	__u32 encap;
	__u8  ip6;
	__u8  ip4opt;
	__u8  ip6ext;
	__u8  ip_ah;
	__u8  ip_esp;
	__u8  ah_esp;
	__u8  xport;
	__u8  tun;
	__u8  xport_tun;
	__u8  lso;
	__u8  extseq;
	__u32 udp_esp;
	__u32 auth;
	__u32 crypto;
	__u32 sa_caps;
};

struct ndis_rsc_offload {
	__u8 ip4;
	__u8 ip6;
};

struct ndis_encap_offload {
	__u32 flags;
	__u32 maxhdr;
};

struct ndis_offload {
	struct ndis_object_header header;
	struct ndis_csum_offload csum;
	struct ndis_lsov1_offload lsov1;
	struct ndis_ipsecv1_offload ipsecv1;
	struct ndis_lsov2_offload lsov2;
	__u32 flags;
	struct ndis_ipsecv2_offload ipsecv2;
	struct ndis_rsc_offload rsc;
	struct ndis_encap_offload encap_gre;
};

/* The same with one per-packet-info record: the receive checksum result (TCPIP_CHKSUM). */
struct rndis_packet_message_csum {
	struct rndis_msg_header header;
	struct rndis_packet packet;
	struct rndis_per_packet_info ppi;
	__u32 csum_info;
} VMBUS_PACKED;

#endif /* MSHVSTACK_VMBUS_RNDIS_H */
