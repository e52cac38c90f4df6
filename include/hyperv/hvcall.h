/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: hypercall codes, status codes, the control word, and the input
 * and output blocks of every hypercall on the MSHV_ROOT_HVCALL allowlist,
 * plus the guest-side HvPostMessage / HvSignalEvent and the kernel-side
 * calls the simulator models.  Transcribed from the compiled facts in
 * shared/reference/mshv_abi.md and the VMBus notes (vmbus_protocol.md).
 */
#ifndef MSHVSTACK_HYPERV_HVCALL_H
#define MSHVSTACK_HYPERV_HVCALL_H

#include <linux/types.h>
#include "registers.h"
#include "message.h"
#include "partition.h"

/* ---- codes, status, control word ---- */
#define HVCALL_ACQUIRE_SPARSE_SPA_PAGE_HOST_ACCESS               0xD7

#define HVCALL_ADD_LOGICAL_PROCESSOR                             0x76

#define HVCALL_ASSERT_VIRTUAL_INTERRUPT                          0x94

#define HVCALL_ATTACH_DEVICE_DOMAIN                              0xB2

#define HVCALL_CLEAR_VIRTUAL_INTERRUPT                           0x56

#define HVCALL_COMPLETE_ISOLATED_IMPORT                          0xF1

#define HVCALL_CONFIGURE_DEVICE_DOMAIN                           0xCE

#define HVCALL_CONNECT_PORT                                      0x96

#define HVCALL_CREATE_PARTITION                                  0x40
#define HVCALL_CREATE_VP                                         0x4E
#define HVCALL_CREATE_PORT                                       0x95
#define HVCALL_CREATE_DEVICE_DOMAIN                              0xB1

#define HVCALL_DELETE_PARTITION                                  0x43
#define HVCALL_DELETE_VP                                         0x4F
#define HVCALL_DELETE_PORT                                       0x58
#define HVCALL_DELETE_DEVICE_DOMAIN                              0xC5

#define HVCALL_DEPOSIT_MEMORY                                    0x48

#define HVCALL_DETACH_DEVICE_DOMAIN                              0xC4

#define HVCALL_DISABLE_HYP_EX                                    0x10F

#define HVCALL_DISCONNECT_PORT                                   0x5B

#define HVCALL_DISPATCH_VP                                       0xC2

#define HVCALL_ENABLE_VP_VTL                                     0xF

#define HVCALL_ENTER_SLEEP_STATE                                 0x84

#define HVCALL_FINALIZE_PARTITION                                0x42

#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE                       2
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST                        3
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX                    0x13
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX                     0x14
#define HVCALL_FLUSH_GUEST_PHYSICAL_ADDRESS_SPACE                0xAF
#define HVCALL_FLUSH_GUEST_PHYSICAL_ADDRESS_LIST                 0xB0
#define HVCALL_FLUSH_DEVICE_DOMAIN                               0xD0

#define HVCALL_GET_LOGICAL_PROCESSOR_RUN_TIME                    4
#define HVCALL_GET_PARTITION_PROPERTY                            0x44
#define HVCALL_GET_PARTITION_ID                                  0x46
#define HVCALL_GET_VP_REGISTERS                                  0x50
#define HVCALL_GET_SYSTEM_PROPERTY                               0x7B
#define HVCALL_GET_VP_INDEX_FROM_APIC_ID                         0x9A
#define HVCALL_GET_GPA_PAGES_ACCESS_STATES                       0xC9
#define HVCALL_GET_VP_STATE                                      0xE3
#define HVCALL_GET_VP_CPUID_VALUES                               0xF4
#define HVCALL_GET_PARTITION_PROPERTY_EX                         0x101
#define HVCALL_GET_IOMMU_CAPABILITIES                            0x125
#define HVCALL_GET_LOGICAL_DEVICE_PROPERTY                       0x127

#define HVCALL_IMPORT_ISOLATED_PAGES                             0xEF

#define HVCALL_INITIALIZE_PARTITION                              0x41

#define HVCALL_INSTALL_INTERCEPT                                 0x4D

#define HVCALL_ISSUE_SNP_PSP_GUEST_REQUEST                       0xF2

#define HVCALL_MAP_GPA_PAGES                                     0x4B
#define HVCALL_MAP_STATS_PAGE                                    0x6C
#define HVCALL_MAP_DEVICE_INTERRUPT                              0x7C
#define HVCALL_MAP_VP_STATE_PAGE                                 0xE1
#define HVCALL_MAP_STATS_PAGE2                                   0x131

#define HVCALL_MMIO_READ                                         0x106
#define HVCALL_MMIO_WRITE                                        0x107

#define HVCALL_MODIFY_SPARSE_GPA_PAGE_HOST_VISIBILITY            0xDB

#define HVCALL_NOTIFY_LONG_SPIN_WAIT                             8
#define HVCALL_NOTIFY_PARTITION_EVENT                            0x87
#define HVCALL_NOTIFY_PORT_RING_EMPTY                            0x8B

#define HVCALL_POST_MESSAGE                                      0x5C
#define HVCALL_POST_DEBUG_DATA                                   0x69
#define HVCALL_POST_MESSAGE_DIRECT                               0xC1

#define HVCALL_READ_GPA                                          0x53

#define HVCALL_REGISTER_INTERCEPT_RESULT                         0x91

#define HVCALL_RELEASE_SPARSE_SPA_PAGE_HOST_ACCESS               0xD8

#define HVCALL_RESET_DEBUG_SESSION                               0x6B

#define HVCALL_RETARGET_INTERRUPT                                0x7E

#define HVCALL_RETRIEVE_DEBUG_DATA                               0x6A

#define HVCALL_SEND_IPI                                          0xB
#define HVCALL_SEND_IPI_EX                                       0x15

#define HVCALL_SET_PARTITION_PROPERTY                            0x45
#define HVCALL_SET_VP_REGISTERS                                  0x51
#define HVCALL_SET_SYSTEM_PROPERTY                               0x6F
#define HVCALL_SET_VP_STATE                                      0xE4

#define HVCALL_SIGNAL_EVENT                                      0x5D
#define HVCALL_SIGNAL_EVENT_DIRECT                               0xC0

#define HVCALL_START_VP                                          0x99

#define HVCALL_TRANSLATE_VIRTUAL_ADDRESS                         0x52

#define HVCALL_UNMAP_GPA_PAGES                                   0x4C
#define HVCALL_UNMAP_STATS_PAGE                                  0x6D
#define HVCALL_UNMAP_DEVICE_INTERRUPT                            0x7D
#define HVCALL_UNMAP_VP_STATE_PAGE                               0xE2

#define HVCALL_WITHDRAW_MEMORY                                   0x49

#define HVCALL_WRITE_GPA                                         0x54

#define HV_EXTCALL_QUERY_CAPABILITIES                            0x8001
#define HV_EXTCALL_MEMORY_HEAT_HINT                              0x8003

#define HV_HYPERCALL_INTERCEPT_MAX_XMM_REGISTERS                 6
#define HV_HYPERCALL_MAX_XMM_REGISTERS                           6
#define HV_HYPERCALL_VARHEAD_OFFSET                              0x11
#define HV_HYPERCALL_REP_COMP_OFFSET                             0x20
#define HV_HYPERCALL_REP_START_OFFSET                            0x30
#define HV_HYPERCALL_MMIO_MAX_DATA_LENGTH                        0x40
#define HV_HYPERCALL_RESULT_MASK                                 0xFFFF
#define HV_HYPERCALL_FAST_BIT                                    0x10000
#define HV_HYPERCALL_VARHEAD_MASK                                0x7FE0000
#define HV_HYPERCALL_NESTED                                      0x80000000U
#define HV_HYPERCALL_RSVD0_MASK                                  0xF8000000U
#define HV_HYPERCALL_REP_COMP_1                                  0x100000000ULL
#define HV_HYPERCALL_REP_COMP_MASK                               0xFFF00000000ULL
#define HV_HYPERCALL_RSVD1_MASK                                  0xF00000000000ULL
#define HV_HYPERCALL_REP_START_MASK                              0xFFF000000000000ULL
#define HV_HYPERCALL_RSVD2_MASK                                  0xF000000000000000ULL
#define HV_HYPERCALL_RSVD_MASK                                   0xF000F000F8000000ULL

#define HV_STATUS_SUCCESS                                        0
#define HV_STATUS_INVALID_HYPERCALL_CODE                         2
#define HV_STATUS_INVALID_HYPERCALL_INPUT                        3
#define HV_STATUS_INVALID_ALIGNMENT                              4
#define HV_STATUS_INVALID_PARAMETER                              5
#define HV_STATUS_ACCESS_DENIED                                  6
#define HV_STATUS_INVALID_PARTITION_STATE                        7
#define HV_STATUS_OPERATION_DENIED                               8
#define HV_STATUS_UNKNOWN_PROPERTY                               9
#define HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE                    0xA
#define HV_STATUS_INSUFFICIENT_MEMORY                            0xB
#define HV_STATUS_INVALID_PARTITION_ID                           0xD
#define HV_STATUS_INVALID_VP_INDEX                               0xE
#define HV_STATUS_NOT_FOUND                                      0x10
#define HV_STATUS_INVALID_PORT_ID                                0x11
#define HV_STATUS_INVALID_CONNECTION_ID                          0x12
#define HV_STATUS_INSUFFICIENT_BUFFERS                           0x13
#define HV_STATUS_NOT_ACKNOWLEDGED                               0x14
#define HV_STATUS_INVALID_VP_STATE                               0x15
#define HV_STATUS_NO_RESOURCES                                   0x1D
#define HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED                0x20
#define HV_STATUS_INVALID_LP_INDEX                               0x41
#define HV_STATUS_INVALID_REGISTER_VALUE                         0x50
#define HV_STATUS_DEVICE_ALREADY_IN_DOMAIN                       0x66
#define HV_STATUS_OPERATION_FAILED                               0x71
#define HV_STATUS_INSUFFICIENT_ROOT_MEMORY                       0x73
#define HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY                 0x75
#define HV_STATUS_TIME_OUT                                       0x78
#define HV_STATUS_CALL_PENDING                                   0x79
#define HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY            0x83
#define HV_STATUS_VTL_ALREADY_ENABLED                            0x86

/* Value only present in the newest driver's headers (Feb 2026 patch). */
#define HVCALL_SCRUB_PARTITION                                   0x008D

/* Guest-side message posting limit (HvPostMessage payload). */
#define HV_MESSAGE_MAX_PAYLOAD_BYTES                             240

/* ---- partition properties ---- */
struct hv_input_get_partition_property {
	__u64 partition_id;
	__u32 property_code;            /* HV_PARTITION_PROPERTY_* */
	__u32 padding;
};

struct hv_output_get_partition_property {
	__u64 property_value;
};

struct hv_input_set_partition_property {
	__u64 partition_id;
	__u32 property_code;
	__u32 padding;
	__u64 property_value;
};

union hv_partition_property_arg {
	__u64 as_uint64;
	struct {
		union {
			__u32 arg;
			__u32 vp_index;
		};
		__u16 reserved0;
		__u8  reserved1;
		__u8  object_type;
	};
};

struct hv_input_get_partition_property_ex {
	__u64 partition_id;
	__u32 property_code;
	__u32 padding;
	union {
		union hv_partition_property_arg arg_data;
		__u64 arg;
	};
};

union hv_partition_processor_features {
	__u64 as_uint64[2];
};

union hv_partition_processor_xsave_features {
	__u64 as_uint64;
};

struct hv_partition_creation_properties {
	union hv_partition_processor_features disabled_processor_features;
	union hv_partition_processor_xsave_features disabled_processor_xsave_features;
};

union hv_partition_isolation_properties {
	__u64 as_uint64;
	struct {
		__u64 isolation_type:5;
		__u64 isolation_host_type:2;
		__u64 rsvd_z:5;
		__u64 shared_gpa_boundary_page_number:52;
	} bits;
};

struct hv_partition_property_vmm_capabilities {
	__u16 bank_count;
	__u16 reserved[3];
	__u64 as_uint64[1];
};

struct hv_proximity_domain_info {
	__u32 domain_id;
	__u32 flags;
};

/* ---- kernel-side partition/VP management (modelled by the simulator) ---- */
struct hv_input_create_partition {
	__u64 flags;                    /* HV_PARTITION_CREATION_FLAG_* */
	struct hv_proximity_domain_info proximity_domain_info;
	__u32 compatibility_version;
	__u32 padding;
	struct hv_partition_creation_properties partition_creation_properties;
	union hv_partition_isolation_properties isolation_properties;
};

struct hv_output_create_partition {
	__u64 partition_id;
};

struct hv_create_vp {
	__u64 partition_id;
	__u32 vp_index;
	__u8  padding[3];
	__u8  subnode_type;
	__u64 subnode_id;
	struct hv_proximity_domain_info proximity_domain_info;
	__u64 flags;
};

struct hv_deposit_memory {
	__u64 partition_id;
	__u64 gpa_page_list[];
};

struct hv_input_withdraw_memory {
	__u64 partition_id;
	struct hv_proximity_domain_info proximity_domain_info;
};

struct hv_input_map_gpa_pages {
	__u64 target_partition_id;
	__u64 target_gpa_base;
	__u32 map_flags;                /* HV_MAP_GPA_* */
	__u32 padding;
	__u64 source_gpa_page_list[];
};

struct hv_input_unmap_gpa_pages {
	__u64 target_partition_id;
	__u64 target_gpa_base;
	__u32 unmap_flags;
	__u32 padding;
};

struct hv_input_dispatch_vp {
	__u64 partition_id;
	__u32 vp_index;
	__u32 flags;                    /* HV_DISPATCH_VP_FLAG_* */
	__u64 time_slice;
	__u64 spec_ctrl;
};

struct hv_output_dispatch_vp {
	__u32 dispatch_state;           /* HV_VP_DISPATCH_STATE_* */
	__u32 dispatch_event;           /* HV_VP_DISPATCH_EVENT_* */
};

struct hv_input_map_vp_state_page {
	__u64 partition_id;
	__u32 vp_index;
	__u16 type;                     /* HV_VP_STATE_PAGE_* */
	union hv_input_vtl input_vtl;
	union {
		__u8 as_uint8;
		struct {
			__u8 map_location_provided:1;
			__u8 reserved:7;
		} bits;
	} flags;
	__u64 requested_map_location;
};

struct hv_output_map_vp_state_page {
	__u64 map_location;
};

struct hv_input_unmap_vp_state_page {
	__u64 partition_id;
	__u32 vp_index;
	__u16 type;
	union hv_input_vtl input_vtl;
	__u8  reserved0;
};

struct hv_input_get_system_property {
	__u32 property_id;
	__u32 reserved;
	union {
		__u64 as_uint64;
	};
};

struct hv_output_get_system_property {
	union {
		__u32 scheduler_type;   /* HV_SCHEDULER_TYPE_* */
		__u64 as_uint64;
	};
};

struct hv_port_info {
	__u32 port_type;                /* HV_PORT_TYPE_* */
	__u32 padding;
	union {
		struct {
			__u32 target_sint;
			__u32 target_vp;
			__u64 rsvdz;
		} message_port_info;
		struct {
			__u32 target_sint;
			__u32 target_vp;
			__u64 rsvdz;
		} doorbell_port_info;
	};
};

struct hv_connection_info {
	__u32 port_type;
	__u32 padding;
	union {
		struct {
			__u64 rsvdz;
		} message_connection_info;
		struct {
			__u64 gpa;
			__u64 trigger_value;
			__u64 flags;            /* HV_DOORBELL_FLAG_* */
		} doorbell_connection_info;
	};
};

/* ---- VP state (MSHV_GET/SET_VP_STATE underneath) ---- */
struct hv_stimer_state {
	struct {
		__u32 undelivered_msg_pending:1;
		__u32 reserved:31;
	} flags;
	__u32 resvd;
	__u64 config;
	__u64 count;
	__u64 adjustment;
	__u64 undelivered_exp_time;
};

struct hv_synthetic_timers_state {
	struct hv_stimer_state timers[HV_SYNIC_STIMER_COUNT];
	__u64 reserved[5];
};

struct hv_vp_state_data_xsave {
	__u64 flags;
	union hv_x64_xsave_xfem_register states;
};

struct hv_vp_state_data {
	__u32 type;                     /* HV_GET_SET_VP_STATE_* */
	__u32 rsvd;
	struct hv_vp_state_data_xsave xsave;
};

struct hv_input_get_vp_state {
	__u64 partition_id;
	__u32 vp_index;
	__u8  input_vtl;
	__u8  rsvd0;
	__u16 rsvd1;
	struct hv_vp_state_data state_data;
	__u64 output_data_pfns[];
};

union hv_output_get_vp_state {
	struct hv_synthetic_timers_state synthetic_timers_state;
};

union hv_input_set_vp_state_data {
	__u64 pfns;
	__u8  bytes;
};

struct hv_input_set_vp_state {
	__u64 partition_id;
	__u32 vp_index;
	__u8  input_vtl;
	__u8  rsvd0;
	__u16 rsvd1;
	struct hv_vp_state_data state_data;
	union hv_input_set_vp_state_data data[];
};

/* First 176 bytes of the LAPIC state page (MSHV_VP_STATE_LAPIC). */
struct hv_local_interrupt_controller_state {
	__u32 apic_id;
	__u32 apic_version;
	__u32 apic_ldr;
	__u32 apic_dfr;
	__u32 apic_spurious;
	__u32 apic_isr[8];
	__u32 apic_tmr[8];
	__u32 apic_irr[8];
	__u32 apic_esr;
	__u32 apic_icr_high;
	__u32 apic_icr_low;
	__u32 apic_lvt_timer;
	__u32 apic_lvt_thermal;
	__u32 apic_lvt_perfmon;
	__u32 apic_lvt_lint0;
	__u32 apic_lvt_lint1;
	__u32 apic_lvt_error;
	__u32 apic_lvt_cmci;
	__u32 apic_error_status;
	__u32 apic_initial_count;
	__u32 apic_counter_value;
	__u32 apic_divide_configuration;
	__u32 apic_remote_read;
};

/* ---- intercepts ---- */
union hv_intercept_parameters {
	__u64 as_uint64;
	__u16 io_port;                  /* HV_INTERCEPT_TYPE_X64_IO_PORT */
	__u32 cpuid_index;              /* HV_INTERCEPT_TYPE_X64_CPUID */
	__u32 apic_write_mask;          /* HV_INTERCEPT_TYPE_X64_APIC_WRITE */
	__u16 exception_vector;         /* HV_INTERCEPT_TYPE_EXCEPTION */
	__u32 msr_index;                /* HV_INTERCEPT_TYPE_X64_MSR_INDEX */
};

struct hv_input_install_intercept {
	__u64 partition_id;
	__u32 access_type;              /* mask of HV_INTERCEPT_ACCESS_MASK_* */
	__u32 intercept_type;           /* HV_INTERCEPT_TYPE_* */
	union hv_intercept_parameters intercept_parameter;
};

struct hv_register_x64_cpuid_result_parameters {
	struct {
		__u32 eax;
		__u32 ecx;
		__u8  subleaf_specific;
		__u8  always_override;
		__u16 padding;
	} input;
	struct {
		__u32 eax;
		__u32 eax_mask;
		__u32 ebx;
		__u32 ebx_mask;
		__u32 ecx;
		__u32 ecx_mask;
		__u32 edx;
		__u32 edx_mask;
	} result;
};

struct hv_register_x64_msr_result_parameters {
	__u32 msr_index;
	__u32 access_type;
	__u32 action;
};

union hv_register_intercept_result_parameters {
	struct hv_register_x64_cpuid_result_parameters cpuid;
	struct hv_register_x64_msr_result_parameters msr;
};

struct hv_input_register_intercept_result {
	__u64 partition_id;
	__u32 vp_index;
	__u32 intercept_type;
	union hv_register_intercept_result_parameters parameters;
} __attribute__((packed));

/* ---- interrupts ---- */
union hv_interrupt_control {
	__u64 as_uint64;
	struct {
		__u32 interrupt_type;   /* HV_X64_INTERRUPT_TYPE_* */
		__u32 level_triggered:1;
		__u32 logical_dest_mode:1;
		__u32 rsvd:30;
	} bits;
};

struct hv_input_assert_virtual_interrupt {
	__u64 partition_id;
	union hv_interrupt_control control;
	__u64 dest_addr;                /* APIC id or logical destination */
	__u32 vector;
	__u8  target_vtl;
	__u8  rsvd_z0;
	__u16 rsvd_z1;
};

struct hv_input_clear_virtual_interrupt {
	__u64 partition_id;
};

union hv_msi_entry {
	__u64 as_uint64;
	struct {
		__u32 address;
		__u32 data;
	};
};

/* ---- GVA translation ---- */
struct hv_input_translate_virtual_address {
	__u64 partition_id;
	__u32 vp_index;
	__u32 padding;
	__u64 control_flags;            /* HV_TRANSLATE_GVA_* flags */
	__u64 gva_page;
};

union hv_translate_gva_result {
	__u64 as_uint64;
	struct {
		__u32 result_code;      /* HV_TRANSLATE_GVA_* results */
		__u32 cache_type:8;
		__u32 overlay_page:1;
		__u32 reserved:23;
	} bits;
};

struct hv_output_translate_virtual_address {
	union hv_translate_gva_result translation_result;
	__u64 gpa_page;
};

/* ---- GPA page access state (dirty / accessed tracking) ---- */
union hv_gpa_page_access_state_flags {
	__u64 as_uint64;
	struct {
		__u64 clear_accessed:1;
		__u64 set_accessed:1;
		__u64 clear_dirty:1;
		__u64 set_dirty:1;
		__u64 reserved:60;
	} bits;
};

struct hv_input_get_gpa_pages_access_state {
	__u64 partition_id;
	union hv_gpa_page_access_state_flags flags;
	__u64 hv_gpa_page_number;
};

union hv_gpa_page_access_state {
	__u8 as_uint8;
	struct {
		__u8 accessed:1;
		__u8 dirty:1;
		__u8 reserved:6;
	} bits;
};

/* ---- SynIC delivery from the root ---- */
struct hv_input_signal_event_direct {
	__u64 target_partition;
	__u32 target_vp;
	__u8  target_vtl;
	__u8  target_sint;
	__u16 flag_number;
};

struct hv_output_signal_event_direct {
	__u8 newly_signaled;
	__u8 reserved[7];
};

struct hv_input_post_message_direct {
	__u64 partition_id;
	__u32 vp_index;
	__u8  vtl;
	__u8  padding[3];
	__u32 sint_index;
	__u8  message[HV_MESSAGE_SIZE];  /* a struct hv_message */
	__u32 padding2;
} __attribute__((packed));

/* ---- guest-side SynIC hypercalls (seen in hypercall intercepts) ---- */
struct hv_input_post_message {
	__u32 connectionid;
	__u32 reserved;
	__u32 message_type;
	__u32 payload_size;
	__u64 payload[HV_MESSAGE_PAYLOAD_QWORD_COUNT];
};

/* HvSignalEvent is a fast hypercall: this is the 8-byte input in RDX. */
struct hv_input_signal_event {
	__u32 connectionid;
	__u16 flag_number;
	__u16 rsvdz;
};

/* ---- GPA read/write through the hypervisor ---- */
union hv_access_gpa_control_flags {
	__u64 as_uint64;
	struct {
		__u64 cache_type:8;
		__u64 reserved:56;
	} bits;
};

union hv_access_gpa_result {
	__u64 as_uint64;
	struct {
		__u32 result_code;      /* HV_ACCESS_GPA_* */
		__u32 reserved;
	};
};

struct hv_input_read_gpa {
	__u64 partition_id;
	__u32 vp_index;
	__u32 byte_count;               /* 1..16 */
	__u64 base_gpa;
	union hv_access_gpa_control_flags control_flags;
};

struct hv_output_read_gpa {
	union hv_access_gpa_result access_result;
	__u8 data[16];
};

struct hv_input_write_gpa {
	__u64 partition_id;
	__u32 vp_index;
	__u32 byte_count;
	__u64 base_gpa;
	union hv_access_gpa_control_flags control_flags;
	__u8 data[16];
};

struct hv_output_write_gpa {
	union hv_access_gpa_result access_result;
};

/* ---- CPUID as the VP sees it ---- */
struct hv_cpuid_leaf_info {
	__u32 eax;
	__u32 ecx;
	__u64 xfem;
	__u64 xss;
};

union hv_get_vp_cpuid_values_flags {
	__u32 as_uint32;
	struct {
		__u32 use_vp_xfem_xss:1;
		__u32 apply_registered_values:1;
		__u32 reserved:30;
	} bits;
};

struct hv_input_get_vp_cpuid_values {
	__u64 partition_id;
	__u32 vp_index;
	union hv_get_vp_cpuid_values_flags flags;
	__u32 reserved;
	__u32 padding;
	struct hv_cpuid_leaf_info cpuid_leaf_info[];
};

union hv_output_get_vp_cpuid_values {
	__u32 as_uint32[4];
	struct {
		__u32 eax;
		__u32 ebx;
		__u32 ecx;
		__u32 edx;
	};
};

/* ---- kernel-side structures (root scheduler, statistics, VP assist page) ---- */
struct hv_vp_signal_bitset_scheduler_message {
	__u64 partition_id;
	__u32 overflow_count;
	__u16 vp_count;
	__u16 reserved;
	/* a sparse VP set: format, valid bank mask, then one bank per 64 VPs */
	union {
		struct {
			__u64 format;
			__u64 valid_bank_mask;
			__u64 bank_contents[HV_ROOT_SCHEDULER_MAX_VPS_PER_CHILD_PARTITION / 64];
		} bitset;
		__u64 bitset_buffer[2 + HV_ROOT_SCHEDULER_MAX_VPS_PER_CHILD_PARTITION / 64];
	} vp_bitset;
};

struct hv_vp_signal_pair_scheduler_message {
	__u32 overflow_count;
	__u8  vp_count;
	__u8  reserved1[3];
	__u64 partition_ids[HV_MESSAGE_MAX_PARTITION_VP_PAIR_COUNT];
	__u32 vp_indexes[HV_MESSAGE_MAX_PARTITION_VP_PAIR_COUNT];
	__u8  reserved2[4];
} __attribute__((packed));

union hv_stats_object_identity {
	struct {
		__u64 partition_id;
		__u32 vp_index;
		__u16 flags;
		__u8  reserved;
		__u8  stats_area_type;
	} vp;
	__u8 as_bytes[16];
};

struct hv_stats_page {
	__u64 data[HV_HYP_PAGE_SIZE / 8];
};

struct hv_vp_assist_page {
	__u32 apic_assist;
	__u32 reserved1;
	__u32 vtl_entry_reason;
	__u32 vtl_reserved;
	__u64 vtl_ret_x64rax;
	__u64 vtl_ret_x64rcx;
	__u8  reserved2[80];
	__u8  intercept_message[HV_MESSAGE_SIZE];
	__u8  vtl_ret_actions[256];
};

#endif /* MSHVSTACK_HYPERV_HVCALL_H */
