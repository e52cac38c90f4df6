/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: synthetic SCSI (storvsc/storvsp) wire formats, written from
 * shared/reference/vmbus_protocol.md section 7.
 */
#ifndef MSHVSTACK_VMBUS_STORVSP_H
#define MSHVSTACK_VMBUS_STORVSP_H

#include <linux/types.h>
#include "vmbus.h"

#define VSTOR_OPERATION_COMPLETE_IO             1
#define VSTOR_OPERATION_REMOVE_DEVICE           2
#define VSTOR_OPERATION_EXECUTE_SRB             3
#define VSTOR_OPERATION_RESET_LUN               4
#define VSTOR_OPERATION_RESET_ADAPTER           5
#define VSTOR_OPERATION_RESET_BUS               6
#define VSTOR_OPERATION_BEGIN_INITIALIZATION    7
#define VSTOR_OPERATION_END_INITIALIZATION      8
#define VSTOR_OPERATION_QUERY_PROTOCOL_VERSION  9
#define VSTOR_OPERATION_QUERY_PROPERTIES        10
#define VSTOR_OPERATION_ENUMERATE_BUS           11
#define VSTOR_OPERATION_FCHBA_DATA              12
#define VSTOR_OPERATION_CREATE_SUB_CHANNELS     13

#define VSTOR_PROTOCOL_WIN6         0x0200
#define VSTOR_PROTOCOL_WIN7         0x0402
#define VSTOR_PROTOCOL_WIN8         0x0501
#define VSTOR_PROTOCOL_WIN8_1       0x0600
#define VSTOR_PROTOCOL_WIN10        0x0602

#define VSTOR_STATUS_SUCCESS            0x00000000U
#define VSTOR_STATUS_REVISION_MISMATCH  0xC0000059U
#define VSTOR_STATUS_INVALID_PARAMETER  0xC000000DU
#define VSTOR_STATUS_IO_DEVICE_ERROR    0xC0000185U
#define VSTOR_STATUS_DEVICE_DOES_NOT_EXIST 0xC00000C0U

#define SRB_STATUS_SUCCESS          0x01
#define SRB_STATUS_ERROR            0x04
#define SRB_STATUS_INVALID_REQUEST  0x06
#define SRB_STATUS_DATA_OVERRUN     0x12
#define SRB_STATUS_INVALID_LUN      0x20
#define SRB_STATUS_AUTOSENSE_VALID  0x80

#define VMSCSI_DATA_OUT     0
#define VMSCSI_DATA_IN      1
#define VMSCSI_NO_DATA      2
#define VMSCSI_SENSE_SIZE   20
#define VMSCSI_CDB_SIZE     16

#define SCSI_STATUS_GOOD            0x00
#define SCSI_STATUS_CHECK_CONDITION 0x02

struct vmscsi_request {
	__u16 length;
	__u8  srb_status;
	__u8  scsi_status;
	__u8  port_number;
	__u8  path_id;
	__u8  target_id;
	__u8  lun;
	__u8  cdb_length;
	__u8  sense_info_length;
	__u8  data_in;
	__u8  reserved;
	__u32 data_transfer_length;
	union {
		__u8 cdb[VMSCSI_CDB_SIZE];
		__u8 sense_data[VMSCSI_SENSE_SIZE];
	};
	__u16 reserve;
	__u8  queue_tag;
	__u8  queue_action;
	__u32 srb_flags;
	__u32 time_out_value;
	__u32 queue_sort_key;
} VMBUS_PACKED;

struct vmstorage_channel_properties {
	__u32 reserved;
	__u16 max_channel_cnt;
	__u16 reserved1;
	__u32 flags;
	__u32 max_transfer_bytes;
	__u64 reserved2;
} VMBUS_PACKED;

struct vmstorage_protocol_version {
	__u16 major_minor;
	__u16 revision;
} VMBUS_PACKED;

struct vstor_packet {
	__u32 operation;
	__u32 flags;
	__u32 status;
	union {
		struct vmscsi_request vm_srb;
		struct vmstorage_channel_properties storage_channel_properties;
		struct vmstorage_protocol_version version;
		__u16 sub_channel_count;
		__u8  buffer[0x34];
	};
} VMBUS_PACKED;

#endif /* MSHVSTACK_VMBUS_STORVSP_H */
