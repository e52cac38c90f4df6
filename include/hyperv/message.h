/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: synthetic messages (SynIC message slots, the intercept messages
 * MSHV_RUN_VP returns, every x64 intercept payload) and the SynIC pages.
 * Transcribed from the compiled facts in shared/reference/mshv_abi.md.
 */
#ifndef MSHVSTACK_HYPERV_MESSAGE_H
#define MSHVSTACK_HYPERV_MESSAGE_H

#include <linux/types.h>
#include "registers.h"

/* ---- message types, SynIC constants ---- */
#define HVMSG_ARM64_RESET_INTERCEPT                              0x8001000CU

#define HVMSG_ASYNC_CALL_COMPLETION                              0x80000070U

#define HVMSG_EVENTLOG_BUFFERCOMPLETE                            0x80000040U

#define HVMSG_GPA_INTERCEPT                                      0x80000001U
#define HVMSG_GPA_ATTRIBUTE_INTERCEPT                            0x80000004U

#define HVMSG_HYPERCALL_INTERCEPT                                0x80000050U

#define HVMSG_INVALID_VP_REGISTER_VALUE                          0x80000020U

#define HVMSG_NONE                                               0

#define HVMSG_OPAQUE_INTERCEPT                                   0x8000003FU

#define HVMSG_SCHEDULER_VP_SIGNAL_BITSET                         0x80000100U
#define HVMSG_SCHEDULER_VP_SIGNAL_PAIR                           0x80000101U

#define HVMSG_SYNIC_EVENT_INTERCEPT                              0x80000060U
#define HVMSG_SYNIC_SINT_INTERCEPT                               0x80000061U
#define HVMSG_SYNIC_SINT_DELIVERABLE                             0x80000062U

#define HVMSG_TIMER_EXPIRED                                      0x80000010U

#define HVMSG_UNACCEPTED_GPA                                     0x80000003U

#define HVMSG_UNMAPPED_GPA                                       0x80000000U

#define HVMSG_UNRECOVERABLE_EXCEPTION                            0x80000021U

#define HVMSG_UNSUPPORTED_FEATURE                                0x80000022U

#define HVMSG_X64_IO_PORT_INTERCEPT                              0x80010000U
#define HVMSG_X64_MSR_INTERCEPT                                  0x80010001U
#define HVMSG_X64_CPUID_INTERCEPT                                0x80010002U
#define HVMSG_X64_EXCEPTION_INTERCEPT                            0x80010003U
#define HVMSG_X64_APIC_EOI                                       0x80010004U
#define HVMSG_X64_LEGACY_FP_ERROR                                0x80010005U
#define HVMSG_X64_IOMMU_PRQ                                      0x80010006U
#define HVMSG_X64_HALT                                           0x80010007U
#define HVMSG_X64_INTERRUPTION_DELIVERABLE                       0x80010008U
#define HVMSG_X64_SIPI_INTERCEPT                                 0x80010009U
#define HVMSG_X64_SEV_VMGEXIT_INTERCEPT                          0x80010013U

#define HV_CONNECT_PORT                                          0x80

#define HV_DOORBELL_FLAG_TRIGGER_SIZE_ANY                        0
#define HV_DOORBELL_FLAG_TRIGGER_SIZE_BYTE                       1
#define HV_DOORBELL_FLAG_TRIGGER_SIZE_WORD                       2
#define HV_DOORBELL_FLAG_TRIGGER_SIZE_DWORD                      3
#define HV_DOORBELL_FLAG_TRIGGER_SIZE_QWORD                      4
#define HV_DOORBELL_FLAG_TRIGGER_SIZE_MASK                       7
#define HV_DOORBELL_FLAG_TRIGGER_ANY_VALUE                       0x80000000U

#define HV_EVENT_FLAGS_UL_COUNT                                  0x20
#define HV_EVENT_FLAGS32_COUNT                                   0x40
#define HV_EVENT_FLAGS_BYTE_COUNT                                0x100
#define HV_EVENT_FLAGS_COUNT                                     0x800

#define HV_MESSAGE_MAX_PARTITION_VP_PAIR_COUNT                   0x13
#define HV_MESSAGE_PAYLOAD_QWORD_COUNT                           0x1E
#define HV_MESSAGE_PAYLOAD_BYTE_COUNT                            0xF0
#define HV_MESSAGE_SIZE                                          0x100

#define HV_PORT_TYPE_MESSAGE                                     1
#define HV_PORT_TYPE_EVENT                                       2
#define HV_PORT_TYPE_MONITOR                                     3
#define HV_PORT_TYPE_DOORBELL                                    4

#define HV_STIMER_DIRECT_MODE_AVAILABLE                          0x80000

#define HV_SYNIC_INTERCEPTION_SINT_INDEX                         0
#define HV_SYNIC_CONTROL_ENABLE                                  1
#define HV_SYNIC_IOMMU_FAULT_SINT_INDEX                          1
#define HV_SYNIC_SIEFP_ENABLE                                    1
#define HV_SYNIC_SIMP_ENABLE                                     1
#define HV_SYNIC_VERSION_1                                       1
#define HV_SYNIC_VMBUS_SINT_INDEX                                2
#define HV_SYNIC_STIMER_COUNT                                    4
#define HV_SYNIC_DOORBELL_SINT_INDEX                             5
#define HV_SYNIC_FIRST_UNUSED_SINT_INDEX                         5
#define HV_SYNIC_FIRST_VALID_VECTOR                              0x10
#define HV_SYNIC_SINT_COUNT                                      0x10
#define HV_SYNIC_EVENT_RING_MESSAGE_COUNT                        0x3F
#define HV_SYNIC_SINT_VECTOR_MASK                                0xFF
#define HV_SYNIC_SINT_MASKED                                     0x10000
#define HV_SYNIC_SINT_AUTO_EOI                                   0x20000

union hv_message_flags {
	__u8 asu8;
	struct {
		__u8 msg_pending:1;
		__u8 reserved:7;
	} bits;
};

union hv_port_id {
	__u32 asu32;
	struct {
		__u32 id:24;
		__u32 reserved:8;
	} u;
};

struct hv_message_header {
	__u32 message_type;             /* HVMSG_* */
	__u8  payload_size;
	union hv_message_flags message_flags;
	__u8  reserved[2];
	union {
		__u64 sender;
		union hv_port_id port;
	};
};

struct hv_message {
	struct hv_message_header header;
	union {
		__u64 payload[HV_MESSAGE_PAYLOAD_QWORD_COUNT];
	} u;
};

/* SIMP page: one 256-byte slot per SINT. */
struct hv_message_page {
	struct hv_message sint_message[HV_SYNIC_SINT_COUNT];
};

/* SIEFP page: one 2048-bit event-flag set per SINT. */
union hv_synic_event_flags {
	__u8  flags8[HV_EVENT_FLAGS_BYTE_COUNT];
	__u32 flags32[HV_EVENT_FLAGS32_COUNT];
};

struct hv_synic_event_flags_page {
	union hv_synic_event_flags sintevent_flags[HV_SYNIC_SINT_COUNT];
};

struct hv_synic_event_ring {
	__u8  signal_masked;
	__u8  ring_full;
	__u16 reserved_z;
	__u32 data[HV_SYNIC_EVENT_RING_MESSAGE_COUNT];
};

union hv_synic_sint {
	__u64 as_uint64;
	struct {
		__u64 vector:8;
		__u64 reserved1:8;
		__u64 masked:1;
		__u64 auto_eoi:1;
		__u64 polling:1;
		__u64 as_intercept:1;
		__u64 proxy:1;
		__u64 reserved2:43;
	} bits;
};

union hv_synic_simp {
	__u64 as_uint64;
	struct {
		__u64 simp_enabled:1;
		__u64 preserved:11;
		__u64 base_simp_gpa:52;
	} bits;
};

union hv_synic_siefp {
	__u64 as_uint64;
	struct {
		__u64 siefp_enabled:1;
		__u64 preserved:11;
		__u64 base_siefp_gpa:52;
	} bits;
};

union hv_synic_scontrol {
	__u64 as_uint64;
	struct {
		__u64 enable:1;
		__u64 reserved:63;
	} bits;
};

/* ---- kernel-side payloads ---- */
struct hv_timer_message_payload {
	__u32 timer_index;
	__u32 reserved;
	__u64 expiration_time;
	__u64 delivery_time;
};

struct hv_notification_message_payload {
	__u32 sint_index;
};

struct hv_async_completion_message_payload {
	__u64 partition_id;
	__u32 status;
	__u32 completion_count;
	__u64 sub_status;
};

struct hv_opaque_intercept_message {
	__u32 vp_index;
};

/* ---- x64 intercept payloads (offsets relative to hv_message.u.payload) ---- */
union hv_x64_vp_execution_state {
	__u16 as_uint16;
	struct {
		__u16 cpl:2;
		__u16 cr0_pe:1;
		__u16 cr0_am:1;
		__u16 efer_lma:1;
		__u16 debug_active:1;
		__u16 interruption_pending:1;
		__u16 vtl:4;
		__u16 enclave_mode:1;
		__u16 interrupt_shadow:1;
		__u16 virtualization_fault_active:1;
		__u16 reserved:2;
	} bits;
};

struct hv_x64_intercept_message_header {
	__u32 vp_index;
	__u8  instruction_length:4;
	__u8  cr8:4;
	__u8  intercept_access_type;    /* HV_INTERCEPT_ACCESS_* */
	union hv_x64_vp_execution_state execution_state;
	struct hv_x64_segment_register cs_segment;
	__u64 rip;
	__u64 rflags;
};

union hv_x64_memory_access_info {
	__u8 as_uint8;
	struct {
		__u8 gva_valid:1;
		__u8 gva_gpa_valid:1;
		__u8 hypercall_output_pending:1;
		__u8 tlb_locked_no_overlay:1;
		__u8 reserved:4;
	} bits;
};

/* HVMSG_UNMAPPED_GPA, HVMSG_GPA_INTERCEPT */
struct hv_x64_memory_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u32 cache_type;
	__u8  instruction_byte_count;
	union hv_x64_memory_access_info memory_access_info;
	__u8  tpr_priority;
	__u8  reserved1;
	__u64 guest_virtual_address;
	__u64 guest_physical_address;
	__u8  instruction_bytes[16];
};

union hv_x64_io_port_access_info {
	__u8 as_uint8;
	struct {
		__u8 access_size:3;
		__u8 string_op:1;
		__u8 rep_prefix:1;
		__u8 reserved:3;
	} bits;
};

/* HVMSG_X64_IO_PORT_INTERCEPT */
struct hv_x64_io_port_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u16 port_number;
	union hv_x64_io_port_access_info access_info;
	__u8  instruction_byte_count;
	__u32 reserved;
	__u64 rax;
	__u8  instruction_bytes[16];
	struct hv_x64_segment_register ds_segment;
	struct hv_x64_segment_register es_segment;
	__u64 rcx;
	__u64 rsi;
	__u64 rdi;
};

/* HVMSG_X64_CPUID_INTERCEPT */
struct hv_x64_cpuid_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u64 rax;
	__u64 rcx;
	__u64 rdx;
	__u64 rbx;
	__u64 default_result_rax;
	__u64 default_result_rcx;
	__u64 default_result_rdx;
	__u64 default_result_rbx;
};

/* HVMSG_X64_MSR_INTERCEPT */
struct hv_x64_msr_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u32 msr_number;
	__u32 reserved;
	__u64 rdx;
	__u64 rax;
};

union hv_x64_exception_info {
	__u8 as_uint8;
	struct {
		__u8 error_code_valid:1;
		__u8 software_exception:1;
		__u8 reserved:6;
	} bits;
};

/* HVMSG_X64_EXCEPTION_INTERCEPT */
struct hv_x64_exception_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u16 exception_vector;
	union hv_x64_exception_info exception_info;
	__u8  instruction_byte_count;
	__u32 error_code;
	__u64 exception_parameter;
	__u64 reserved;
	__u8  instruction_bytes[16];
	struct hv_x64_segment_register ds_segment;
	struct hv_x64_segment_register ss_segment;
	__u64 rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi;
	__u64 r8, r9, r10, r11, r12, r13, r14, r15;
};

/*
 * HVMSG_HYPERCALL_INTERCEPT.  OpenVMM declares 12 more reserved bytes after
 * the flags word (208 bytes); the fields are identical.
 */
struct hv_x64_hypercall_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u64 rax;
	__u64 rbx;
	__u64 rcx;
	__u64 rdx;
	__u64 r8;
	__u64 rsi;
	__u64 rdi;
	struct hv_u128 xmmregisters[6];
	__u32 isolated:1;
	__u32 reserved:31;
} __attribute__((packed));

/* HVMSG_X64_HALT */
struct hv_x64_halt_message {
	struct hv_x64_intercept_message_header header;
};

/* HVMSG_UNRECOVERABLE_EXCEPTION (triple fault) */
struct hv_x64_unrecoverable_exception_message {
	struct hv_x64_intercept_message_header header;
};

/* HVMSG_X64_APIC_EOI */
struct hv_x64_apic_eoi_message {
	__u32 vp_index;
	__u32 interrupt_vector;
};

/* HVMSG_INVALID_VP_REGISTER_VALUE */
struct hv_x64_invalid_vp_register_message {
	__u32 vp_index;
	__u32 reserved;
};

/* HVMSG_UNSUPPORTED_FEATURE: feature_code = HV_UNSUPPORTED_FEATURE_* */

struct hv_x64_unsupported_feature_message {
	__u32 vp_index;
	__u32 feature_code;
	__u64 feature_parameter;
};

/* HVMSG_X64_INTERRUPTION_DELIVERABLE: deliverable_type = HV_X64_PENDING_* */
struct hv_x64_interruption_deliverable_message {
	struct hv_x64_intercept_message_header header;
	__u32 deliverable_type;
	__u32 rsvd;
};

/* HVMSG_SYNIC_SINT_DELIVERABLE: bit n set = SINT n can take a message. */
struct hv_x64_sint_deliverable_message {
	struct hv_x64_intercept_message_header header;
	__u16 deliverable_sints;
	__u16 rsvd1;
	__u32 rsvd2;
};

/* HVMSG_X64_SIPI_INTERCEPT */
struct hv_x64_sipi_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u32 target_vp_index;
	__u32 interrupt_vector;
};

union hv_x64_register_access_info {
	union hv_register_value source_value;
	__u32 destination_register;
	__u64 source_address;
	__u64 destination_address;
};

struct hv_x64_register_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u8  is_memory_op:1;
	__u8  reserved:7;
	__u8  reserved8;
	__u16 reserved16;
	__u32 register_name;
	union hv_x64_register_access_info access_info;
};

union hv_gpa_page_range {
	__u64 address_space;
	struct {
		__u64 additional_pages:11;
		__u64 largepage:1;
		__u64 basepfn:52;
	} page;
};

struct hv_x64_gpa_attribute_intercept_message {
	__u32 vp_index;
	__u32 range_count:5;
	__u32 adjust:1;
	__u32 host_visibility:2;
	__u32 memory_type:6;
	__u32 reserved:18;
	union hv_gpa_page_range ranges[29];
};

struct hv_x64_vmgexit_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u64 ghcb_msr;
	__u64 ghcb_page_valid:1;
	__u64 reserved_ghcb_page:63;
	__u32 ghcb_usage;
	__u32 rserved_ghcb_page;
	__u16 ghcb_protocol_version;
	__u16 reserved_st[3];
	__u64 sw_exit_code;
	__u64 sw_exit_info1;
	__u64 sw_exit_info2;
	__u64 sw_scratch;
};

#endif /* MSHVSTACK_HYPERV_MESSAGE_H */
