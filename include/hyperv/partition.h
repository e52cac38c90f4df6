/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: partition-level hypervisor constants: creation flags, partition
 * properties, intercept types and access masks, interrupt types, GPA map
 * flags, GVA translation flags/results, VP state types, dispatch values.
 * Transcribed from the compiled facts in shared/reference/mshv_abi.md.
 */
#ifndef MSHVSTACK_HYPERV_PARTITION_H
#define MSHVSTACK_HYPERV_PARTITION_H

#include <linux/types.h>

#define HV_ACCESS_GPA_SUCCESS                                    0
#define HV_ACCESS_GPA_UNMAPPED                                   1
#define HV_ACCESS_GPA_READ_INTERCEPT                             2
#define HV_ACCESS_PARTITION_ID                                   2
#define HV_ACCESS_GPA_WRITE_INTERCEPT                            3
#define HV_ACCESS_GPA_ILLEGAL_OVERLAY_ACCESS                     4
#define HV_ACCESS_MEMORY_POOL                                    4
#define HV_ACCESS_STATS                                          0x100
#define HV_ACCESS_FREQUENCY_MSRS                                 0x800
#define HV_ACCESS_REENLIGHTENMENT                                0x2000
#define HV_ACCESS_TSC_INVARIANT                                  0x8000

#define HV_ADJUST_MESSAGE_BUFFERS                                8

#define HV_COMPATIBILITY_21_H2                                   0x609

#define HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND              1
#define HV_DISPATCH_VP_FLAG_ENABLE_CALLER_INTERRUPTS             2
#define HV_DISPATCH_VP_FLAG_SET_CALLER_SPEC_CTRL                 4
#define HV_DISPATCH_VP_FLAG_SKIP_VP_SPEC_FLUSH                   8
#define HV_DISPATCH_VP_FLAG_SKIP_CALLER_SPEC_FLUSH               0x10
#define HV_DISPATCH_VP_FLAG_SKIP_CALLER_USER_SPEC_FLUSH          0x20
#define HV_DISPATCH_VP_FLAG_SCAN_INTERRUPT_INJECTION             0x40

#define HV_GET_SET_VP_STATE_SYNTHETIC_TIMERS                     4
#define HV_GET_SET_VP_STATE_LAPIC_STATE                          0x80000000U
#define HV_GET_SET_VP_STATE_TYPE_PFN                             0x80000000U
#define HV_GET_SET_VP_STATE_XSAVE                                0x80000001U
#define HV_GET_SET_VP_STATE_SIM_PAGE                             0x80000002U
#define HV_GET_SET_VP_STATE_SIEF_PAGE                            0x80000003U

#define HV_GPA_PAGE_RANGE_PAGE_SIZE_2MB                          0
#define HV_GPA_PAGE_RANGE_PAGE_SIZE_1GB                          1
#define HV_GPA_ATTRIBUTE_INTERCEPT_MAX_RANGES                    0x1D

#define HV_INTERCEPT_ACCESS_MASK_NONE                            0
#define HV_INTERCEPT_ACCESS_READ                                 0
#define HV_INTERCEPT_TYPE_X64_IO_PORT                            0
#define HV_INTERCEPT_ACCESS_MASK_READ                            1
#define HV_INTERCEPT_ACCESS_WRITE                                1
#define HV_INTERCEPT_TYPE_X64_MSR                                1
#define HV_INTERCEPT_ACCESS_EXECUTE                              2
#define HV_INTERCEPT_ACCESS_MASK_WRITE                           2
#define HV_INTERCEPT_TYPE_X64_CPUID                              2
#define HV_INTERCEPT_TYPE_EXCEPTION                              3
#define HV_INTERCEPT_ACCESS_MASK_EXECUTE                         4
#define HV_INTERCEPT_TYPE_RESERVED0                              4
#define HV_INTERCEPT_TYPE_MMIO                                   5
#define HV_INTERCEPT_TYPE_X64_GLOBAL_CPUID                       6
#define HV_INTERCEPT_TYPE_X64_APIC_SMI                           7
#define HV_INTERCEPT_TYPE_HYPERCALL                              8
#define HV_INTERCEPT_TYPE_X64_APIC_INIT_SIPI                     9
#define HV_INTERCEPT_MC_UPDATE_PATCH_LEVEL_MSR_READ              0xA
#define HV_INTERCEPT_TYPE_X64_APIC_WRITE                         0xB
#define HV_INTERCEPT_TYPE_X64_MSR_INDEX                          0xC
#define HV_INTERCEPT_TYPE_MAX                                    0xD
#define HV_INTERCEPT_TYPE_INVALID                                0xFFFFFFFFU

#define HV_INTERRUPT_TRIGGER_MODE_EDGE                           0
#define HV_INTERRUPT_SOURCE_MSI                                  1
#define HV_INTERRUPT_TRIGGER_MODE_LEVEL                          1
#define HV_INTERRUPT_SOURCE_IOAPIC                               2
#define HV_INTERRUPT_VECTOR_NONE                                 0xFFFFFFFFU

#define HV_ISOLATION_TYPE_NONE                                   0
#define HV_ISOLATION_TYPE_VBS                                    1
#define HV_ISOLATION_TYPE_SNP                                    2
#define HV_ISOLATION_TYPE_TDX                                    3
#define HV_ISOLATION_TYPE                                        0xF

#define HV_MAP_GPA_PERMISSIONS_NONE                              0
#define HV_MAP_GPA_READABLE                                      1
#define HV_MAP_GPA_WRITABLE                                      2
#define HV_MAP_GPA_KERNEL_EXECUTABLE                             4
#define HV_MAP_GPA_USER_EXECUTABLE                               8
#define HV_MAP_GPA_EXECUTABLE                                    0xC
#define HV_MAP_GPA_PERMISSIONS_MASK                              0xF
#define HV_MAP_GPA_ADJUSTABLE                                    0x8000
#define HV_MAP_GPA_NO_ACCESS                                     0x10000
#define HV_MAP_GPA_NOT_CACHED                                    0x200000
#define HV_MAP_GPA_LARGE_PAGE                                    0x80000000U

#define HV_MODIFY_SPA_PAGE_HOST_ACCESS_MAKE_EXCLUSIVE            1
#define HV_MODIFY_SPA_PAGE_HOST_ACCESS_MAKE_SHARED               2
#define HV_MODIFY_SPA_PAGE_HOST_ACCESS_LARGE_PAGE                4
#define HV_MODIFY_SPA_PAGE_HOST_ACCESS_HUGE_PAGE                 8

#define HV_PARTITION_ALL_LOGICAL_PROCESSORS_STARTED              4

#define HV_PARTITION_CREATION_FLAG_SMT_ENABLED_GUEST             1
#define HV_PARTITION_CREATION_FLAG_NESTED_VIRTUALIZATION_CAPABLE 2
#define HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED       0x10
#define HV_PARTITION_CREATION_FLAG_EXO_PARTITION                 0x100
#define HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED                 0x2000
#define HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED 0x80000
#define HV_PARTITION_CREATION_FLAG_X2APIC_CAPABLE                0x400000

#define HV_PARTITION_EVENT_ROOT_CRASHDUMP                        2

#define HV_PARTITION_ID_INVALID                                  0
#define HV_PARTITION_ID_SELF                                     ((__u64)-1)

#define HV_PARTITION_ISOLATION_HOST_TYPE_NONE                    0
#define HV_PARTITION_ISOLATION_INVALID                           0
#define HV_PARTITION_ISOLATION_TYPE_NONE                         0
#define HV_PARTITION_ISOLATION_HOST_TYPE_HARDWARE                1
#define HV_PARTITION_ISOLATION_INSECURE_CLEAN                    1
#define HV_PARTITION_ISOLATION_HOST_TYPE_RESERVED                2
#define HV_PARTITION_ISOLATION_INSECURE_DIRTY                    2
#define HV_PARTITION_ISOLATION_TYPE_SNP                          2
#define HV_PARTITION_ISOLATION_SECURE                            3
#define HV_PARTITION_ISOLATION_TYPE_TDX                          3
#define HV_PARTITION_ISOLATION_SECURE_DIRTY                      4
#define HV_PARTITION_ISOLATION_SECURE_TERMINATING                5

#define HV_PARTITION_PROCESSOR_FEATURES_BANKS                    2
#define HV_PARTITION_PROCESSOR_FEATURES_RESERVEDBANK1_BITFIELD_COUNT 4
#define HV_PARTITION_PROCESSOR_XSAVE_FEATURES_RESERVED_BITFIELD_COUNT 0x18

#define HV_PARTITION_PROPERTY_EX_MAX_VAR_SIZE                    0xFE8
#define HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS                    0x10000
#define HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES            0x10001
#define HV_PARTITION_PROPERTY_SUSPEND                            0x20000
#define HV_PARTITION_PROPERTY_CPU_RESERVE                        0x20001
#define HV_PARTITION_PROPERTY_CPU_CAP                            0x20002
#define HV_PARTITION_PROPERTY_CPU_WEIGHT                         0x20003
#define HV_PARTITION_PROPERTY_CPU_GROUP_ID                       0x20004
#define HV_PARTITION_PROPERTY_INTEGRATED_SCHEDULER_ENABLED       0x20005
#define HV_PARTITION_PROPERTY_TIME_FREEZE                        0x30003
#define HV_PARTITION_PROPERTY_REFERENCE_TIME                     0x30005
#define HV_PARTITION_PROPERTY_DEBUG_CHANNEL_ID                   0x40000
#define HV_PARTITION_PROPERTY_VIRTUAL_TLB_PAGE_COUNT             0x50000
#define HV_PARTITION_PROPERTY_VSM_CONFIG                         0x50001
#define HV_PARTITION_PROPERTY_ZERO_MEMORY_ON_RESET               0x50002
#define HV_PARTITION_PROPERTY_PROCESSORS_PER_SOCKET              0x50003
#define HV_PARTITION_PROPERTY_NESTED_TLB_SIZE                    0x50004
#define HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING           0x50005
#define HV_PARTITION_PROPERTY_VSM_PERMISSIONS_DIRTY_SINCE_LAST_QUERY 0x50006
#define HV_PARTITION_PROPERTY_SGX_LAUNCH_CONTROL_CONFIG          0x50007
#define HV_PARTITION_PROPERTY_DEFAULT_SGX_LAUNCH_CONTROL0        0x50008
#define HV_PARTITION_PROPERTY_DEFAULT_SGX_LAUNCH_CONTROL1        0x50009
#define HV_PARTITION_PROPERTY_DEFAULT_SGX_LAUNCH_CONTROL2        0x5000A
#define HV_PARTITION_PROPERTY_DEFAULT_SGX_LAUNCH_CONTROL3        0x5000B
#define HV_PARTITION_PROPERTY_ISOLATION_STATE                    0x5000C
#define HV_PARTITION_PROPERTY_ISOLATION_CONTROL                  0x5000D
#define HV_PARTITION_PROPERTY_ALLOCATION_ID                      0x5000E
#define HV_PARTITION_PROPERTY_MONITORING_ID                      0x5000F
#define HV_PARTITION_PROPERTY_IMPLEMENTED_PHYSICAL_ADDRESS_BITS  0x50010
#define HV_PARTITION_PROPERTY_NON_ARCHITECTURAL_CORE_SHARING     0x50011
#define HV_PARTITION_PROPERTY_HYPERCALL_DOORBELL_PAGE            0x50012
#define HV_PARTITION_PROPERTY_ISOLATION_POLICY                   0x50014
#define HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION           0x50017
#define HV_PARTITION_PROPERTY_SEV_VMGEXIT_OFFLOADS               0x50022
#define HV_PARTITION_PROPERTY_PARTITION_DIAG_BUFFER_CONFIG       0x50026
#define HV_PARTITION_PROPERTY_GICD_BASE_ADDRESS                  0x50028
#define HV_PARTITION_PROPERTY_GITS_TRANSLATER_BASE_ADDRESS       0x50029
#define HV_PARTITION_PROPERTY_GIC_LPI_INT_ID_BITS                0x5002A
#define HV_PARTITION_PROPERTY_GIC_PPI_OVERFLOW_INTERRUPT_FROM_CNTV 0x5002B
#define HV_PARTITION_PROPERTY_GIC_PPI_OVERFLOW_INTERRUPT_FROM_CNTP 0x5002C
#define HV_PARTITION_PROPERTY_GIC_PPI_PERFORMANCE_MONITORS_INTERRUPT 0x5002D
#define HV_PARTITION_PROPERTY_GIC_PPI_PMBIRQ                     0x5002E
#define HV_PARTITION_PROPERTY_PROCESSOR_VENDOR                   0x60000
#define HV_PARTITION_PROPERTY_PROCESSOR_FEATURES_DEPRECATED      0x60001
#define HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES           0x60002
#define HV_PARTITION_PROPERTY_PROCESSOR_CL_FLUSH_SIZE            0x60003
#define HV_PARTITION_PROPERTY_ENLIGHTENMENT_MODIFICATIONS        0x60004
#define HV_PARTITION_PROPERTY_COMPATIBILITY_VERSION              0x60005
#define HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH             0x60006
#define HV_PARTITION_PROPERTY_XSAVE_STATES                       0x60007
#define HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE                0x60008
#define HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY          0x60009
#define HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0                0x6000A
#define HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1                0x6000B
#define HV_PARTITION_PROPERTY_GUEST_OS_ID                        0x70000
#define HV_PARTITION_PROPERTY_PROCESSOR_VIRTUALIZATION_FEATURES  0x80000
#define HV_PARTITION_PROPERTY_VMM_CAPABILITIES                   0x90007
#define HV_PARTITION_PROPERTY_ASSIGNABLE_SYNTHETIC_PROC_FEATURES 0x90009

#define HV_PARTITION_SYNTHETIC_PROCESSOR_FEATURES_BANKS          1
#define HV_PARTITION_SYNTHETIC_PROCESSOR_FEATURES_RESERVED_BITFIELD_COUNT 0xA

#define HV_PARTITION_VMM_CAPABILITIES_BANK_COUNT                 1
#define HV_PARTITION_VMM_CAPABILITIES_RESERVED_BITFIELD_COUNT    0x39

#define HV_SCHEDULER_TYPE_LP                                     1
#define HV_SCHEDULER_TYPE_LP_SMT                                 2
#define HV_SCHEDULER_TYPE_CORE_SMT                               3
#define HV_SCHEDULER_TYPE_ROOT                                   4
#define HV_SCHEDULER_TYPE_MAX                                    5

#define HV_TRANSLATE_GVA_SUCCESS                                 0
#define HV_TRANSLATE_GVA_PAGE_NOT_PRESENT                        1
#define HV_TRANSLATE_GVA_VALIDATE_READ                           1
#define HV_TRANSLATE_GVA_PRIVILEGE_VIOLATION                     2
#define HV_TRANSLATE_GVA_VALIDATE_WRITE                          2
#define HV_TRANSLATE_GVA_INVALIDE_PAGE_TABLE_FLAGS               3
#define HV_TRANSLATE_GVA_GPA_UNMAPPED                            4
#define HV_TRANSLATE_GVA_VALIDATE_EXECUTE                        4
#define HV_TRANSLATE_GVA_GPA_NO_READ_ACCESS                      5
#define HV_TRANSLATE_GVA_GPA_NO_WRITE_ACCESS                     6
#define HV_TRANSLATE_GVA_GPA_ILLEGAL_OVERLAY_ACCESS              7
#define HV_TRANSLATE_GVA_INTERCEPT                               8
#define HV_TRANSLATE_GVA_PRIVILEGE_EXEMPT                        8
#define HV_TRANSLATE_GVA_GPA_UNACCEPTED                          9
#define HV_TRANSLATE_GVA_SET_PAGE_TABLE_BITS                     0x10
#define HV_TRANSLATE_GVA_TLB_FLUSH_INHIBIT                       0x20
#define HV_TRANSLATE_GVA_SUPERVISOR_ACCESS                       0x40
#define HV_TRANSLATE_GVA_USER_ACCESS                             0x80
#define HV_TRANSLATE_GVA_ENFORCE_SMAP                            0x100
#define HV_TRANSLATE_GVA_OVERRIDE_SMAP                           0x200
#define HV_TRANSLATE_GVA_SHADOW_STACK                            0x400

#define HV_UNIMPLEMENTED_MSR_ACTION_FAULT                        0
#define HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO       1
#define HV_UNIMPLEMENTED_MSR_ACTION_COUNT                        2

#define HV_UNMAP_GPA_LARGE_PAGE                                  2

#define HV_VP_DISPATCH_EVENT_INVALID                             0
#define HV_VP_DISPATCH_STATE_INVALID                             0
#define HV_VP_STATE_PAGE_REGISTERS                               0
#define HV_VP_DISPATCH_EVENT_SUSPEND                             1
#define HV_VP_DISPATCH_STATE_BLOCKED                             1
#define HV_VP_REGISTER_PAGE_VERSION_1                            1
#define HV_VP_STATE_PAGE_INTERCEPT_MESSAGE                       1
#define HV_VP_DISPATCH_EVENT_INTERCEPT                           2
#define HV_VP_DISPATCH_STATE_READY                               2
#define HV_VP_STATE_PAGE_GHCB                                    2
#define HV_VP_STATE_PAGE_COUNT                                   3
#define HV_VP_REGISTER_PAGE_MAX_VECTOR_COUNT                     7
#define HV_VP_DISPATCH_INTERRUPT_INJECTION_AVAILABLE             0x200
#define HV_VP_GHCB_ROOT_MAPPING_AVAILABLE                        0x400
#define HV_VP_INDEX_SELF                                         0xFFFFFFFEU

#define HV_X64_INTERRUPT_TYPE_FIXED                              0
#define HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY                     1
#define HV_X64_INTERRUPT_TYPE_SMI                                2
#define HV_X64_INTERRUPT_TYPE_REMOTEREAD                         3
#define HV_X64_INTERRUPT_TYPE_NMI                                4
#define HV_X64_INTERRUPT_TYPE_INIT                               5
#define HV_X64_INTERRUPT_TYPE_SIPI                               6
#define HV_X64_INTERRUPT_TYPE_EXTINT                             7
#define HV_X64_INTERRUPT_TYPE_LOCALINT0                          8
#define HV_X64_INTERRUPT_TYPE_LOCALINT1                          9
#define HV_X64_INTERRUPT_TYPE_MAXIMUM                            0xA


#endif /* MSHVSTACK_HYPERV_PARTITION_H */
