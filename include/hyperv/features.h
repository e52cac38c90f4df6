/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: CPUID feature/privilege bits of the Hyper-V leaves
 * (0x40000000+), partition privilege masks and other hypervisor constants
 * that belong to no narrower header.  Transcribed from the compiled facts in
 * shared/reference/mshv_abi.md.
 */
#ifndef MSHVSTACK_HYPERV_FEATURES_H
#define MSHVSTACK_HYPERV_FEATURES_H

#include <linux/types.h>

#define HV_ANY_VP                                                0xFFFFFFFFU

#define HV_CLOCK_HZ                                              0x989680

#define HV_CPU_MANAGEMENT                                        0x1000

#define HV_CRASH_CTL_CRASH_NOTIFY_MSG                            0x4000000000000000ULL
#define HV_CRASH_CTL_CRASH_NOTIFY                                0x8000000000000000ULL

#define HV_CRASHDUMP_NONE                                        0
#define HV_CRASHDUMP_SUSPEND_ALL_VPS                             1
#define HV_CRASHDUMP_PREPARE_FOR_STATE_SAVE                      2
#define HV_CRASHDUMP_STATE_SAVED                                 3
#define HV_CRASHDUMP_ENTRY                                       4

#define HV_CREATE_PARTITIONS                                     1
#define HV_CREATE_PORT                                           0x40

#define HV_DEBUGGING                                             0x800

#define HV_DEPRECATING_AEOI_RECOMMENDED                          0x200

#define HV_DEVICE_DOMAIN_ID_DEFAULT                              0
#define HV_DEVICE_TYPE_LOGICAL                                   0
#define HV_DEVICE_DOMAIN_TYPE_S1                                 1
#define HV_DEVICE_INTERRUPT_TARGET_MULTICAST                     1
#define HV_DEVICE_IOMMU_ENABLED                                  1
#define HV_DEVICE_TYPE_PCI                                       1
#define HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET                 2
#define HV_DEVICE_TYPE_IOAPIC                                    2
#define HV_DEVICE_TYPE_ACPI                                      3
#define HV_DEVICE_DOMAIN_ID_NULL                                 0xFFFFFFFFU

#define HV_DYNAMIC_PROCESSOR_FEATURE_PROPERTY                    0x15

#define HV_ENABLE_EXTENDED_HYPERCALLS                            0x100000

#define HV_EXPOSE_INVARIANT_TSC                                  1

#define HV_EXT_MEMORY_HEAT_HINT_TYPE_COLD_DISCARD                2
#define HV_EXT_CAPABILITY_MEMORY_COLD_DISCARD_HINT               0x100
#define HV_EXT_CALL_QUERY_CAPABILITIES                           0x8001
#define HV_EXT_CALL_MEMORY_HEAT_HINT                             0x8003

#define HV_EXTMEM_HEAT_HINT_COLD                                 0
#define HV_EXTMEM_HEAT_HINT_HOT                                  1
#define HV_EXTMEM_HEAT_HINT_COLD_DISCARD                         2
#define HV_EXTMEM_HEAT_HINT_MAX                                  3

#define HV_FEATURE_FREQUENCY_MSRS_AVAILABLE                      0x100
#define HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE                     0x400
#define HV_FEATURE_DEBUG_MSRS_AVAILABLE                          0x800
#define HV_FEATURE_EXT_GVA_RANGES_FLUSH                          0x4000

#define HV_FLUSH_ALL_PROCESSORS                                  1
#define HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES                      2
#define HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY                        4
#define HV_FLUSH_USE_EXTENDED_RANGE_FORMAT                       8

#define HV_GENERIC_SET_SPARSE_4K                                 0
#define HV_GENERIC_SET_ALL                                       1
#define HV_GENERIC_SET_SHIFT                                     6
#define HV_GENERIC_SET_MASK                                      0x3F

#define HV_HYP_PAGE_SHIFT                                        0xC
#define HV_HYP_LARGE_PAGE_SHIFT                                  0x15
#define HV_HYP_PAGE_SIZE                                         0x1000
#define HV_HYP_PAGE_MASK                                         0xFFFFFFFFFFFFF000ULL

#define HV_IOMMU_CAP_PRESENT                                     1
#define HV_IOMMU_CAP_S2                                          2
#define HV_IOMMU_CAP_S1                                          4
#define HV_IOMMU_CAP_S1_5LVL                                     8
#define HV_IOMMU_CAP_PASID                                       0x10
#define HV_IOMMU_CAP_ATS                                         0x20
#define HV_IOMMU_CAP_PRI                                         0x40

#define HV_IPI_LOW_VECTOR                                        0x10
#define HV_IPI_HIGH_VECTOR                                       0xFF

#define HV_ISOLATED_PAGE_SIZE_4KB                                0
#define HV_ISOLATED_PAGE_TYPE_NORMAL                             0
#define HV_ISOLATED_PAGE_SIZE_2MB                                1
#define HV_ISOLATED_PAGE_TYPE_VMSA                               1
#define HV_ISOLATED_PAGE_TYPE_ZERO                               2
#define HV_ISOLATED_PAGE_TYPE_UNMEASURED                         3
#define HV_ISOLATED_PAGE_TYPE_SECRETS                            4
#define HV_ISOLATED_PAGE_TYPE_CPUID                              5
#define HV_ISOLATED_PAGE_TYPE_COUNT                              6

#define HV_ISOLATION                                             0x400000

#define HV_LINUX_VENDOR_ID                                       0x8100

#define HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU                       0xA

#define HV_MAX_CONTIGUOUS_ALLOCATION_PAGES                       8
#define HV_MAX_SPARSE_VCPU_BANKS                                 0x40
#define HV_MAX_FLUSH_REP_COUNT                                   0x1FE
#define HV_MAX_MODIFY_GPA_REP_COUNT                              0x1FE
#define HV_MAX_VP_INDEX                                          0x7FF
#define HV_MAX_FLUSH_PAGES                                       0x800

#define HV_MAXIMUM_PROCESSORS                                    0x800

#define HV_MEMORY_HINT_MAX_GPA_PAGE_RANGES                       0x1FF

#define HV_NORMAL_VTL                                            0

#define HV_PARAVISOR_PRESENT                                     1

#define HV_PFN_RANGE_PGBITS                                      0x18
#define HV_PFN_RNG_PAGEBITS                                      0x18

#define HV_POST_MESSAGES                                         0x10

#define HV_PSP_CPUID_LEAF_COUNT_MAX                              0x40

#define HV_READ_WRITE_GPA_MAX_SIZE                               0x10

#define HV_ROOT_SCHEDULER_MAX_VPS_PER_CHILD_PARTITION            0x400

#define HV_SHARED_GPA_BOUNDARY_ACTIVE                            0x20
#define HV_SHARED_GPA_BOUNDARY_BITS                              0xFC0

#define HV_SIGNAL_EVENTS                                         0x20

#define HV_SLEEP_STATE_S1                                        1
#define HV_SLEEP_STATE_S2                                        2
#define HV_SLEEP_STATE_S3                                        3
#define HV_SLEEP_STATE_S4                                        4
#define HV_SLEEP_STATE_S5                                        5
#define HV_SLEEP_STATE_LOCK                                      6

#define HV_SNP_STATUS_NONE                                       0
#define HV_SNP_STATUS_AVAILABLE                                  1
#define HV_SNP_STATUS_INCOMPATIBLE                               2
#define HV_SNP_STATUS_PSP_UNAVAILABLE                            3
#define HV_SNP_STATUS_PSP_INIT_FAILED                            4
#define HV_SNP_STATUS_PSP_BAD_FW_VERSION                         5
#define HV_SNP_STATUS_BAD_CONFIGURATION                          6
#define HV_SNP_STATUS_PSP_FW_UPDATE_IN_PROGRESS                  7
#define HV_SNP_STATUS_PSP_RB_INIT_FAILED                         8
#define HV_SNP_STATUS_PSP_PLATFORM_STATUS_FAILED                 9
#define HV_SNP_STATUS_PSP_INIT_LATE_FAILED                       0xA

#define HV_SOURCE_SHADOW_NONE                                    0
#define HV_SOURCE_SHADOW_BRIDGE_BUS_RANGE                        1

#define HV_STATS_AREA_SELF                                       0
#define HV_STATS_AREA_PARENT                                     1
#define HV_STATS_OBJECT_HYPERVISOR                               1
#define HV_STATS_AREA_INTERNAL                                   2
#define HV_STATS_OBJECT_LOGICAL_PROCESSOR                        2
#define HV_STATS_AREA_COUNT                                      3
#define HV_STATS_OBJECT_PARTITION                                0x10001
#define HV_STATS_OBJECT_VP                                       0x10002

#define HV_SUBNODE_ANY                                           0
#define HV_SUBNODE_SOCKET                                        1
#define HV_SUBNODE_CLUSTER                                       2
#define HV_SUBNODE_L3                                            3
#define HV_SUBNODE_COUNT                                         4
#define HV_SUBNODE_INVALID                                       ((__u64)-1)

#define HV_SVM_ENL_EXITCODE_TRAP_AFTER_FLUSH                     1
#define HV_SVM_EXITCODE_ENL                                      0xF0000000U

#define HV_SYSTEM_PROPERTY_SLEEP_STATE                           3
#define HV_SYSTEM_PROPERTY_SCHEDULER_TYPE                        0xF
#define HV_SYSTEM_PROPERTY_CRASHDUMPAREA                         0x2F

#define HV_UNSUPPORTED_FEATURE_INTERCEPT                         1
#define HV_UNSUPPORTED_FEATURE_TASK_SWITCH_TSS                   2

#define HV_VCPUS_PER_SPARSE_BANK                                 0x40

#define HV_VMCB_NESTED_ENLIGHTENMENTS                            0x1F

#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_NONE                      0
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_IO_BITMAP                 1
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_MSR_BITMAP                2
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_GRP2              4
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_GRP1              8
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_PROC              0x10
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_EVENT             0x20
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_ENTRY             0x40
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_EXCPN             0x80
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CRDR                      0x100
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_CONTROL_XLAT              0x200
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_GUEST_BASIC               0x400
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_GUEST_GRP1                0x800
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_GUEST_GRP2                0x1000
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_HOST_POINTER              0x2000
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_HOST_GRP1                 0x4000
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_ENLIGHTENMENTSCONTROL     0x8000
#define HV_VMX_ENLIGHTENED_CLEAN_FIELD_ALL                       0xFFFF
#define HV_VMX_SYNTHETIC_EXIT_REASON_TRAP_AFTER_FLUSH            0x10000031

#define HV_VTL_MASK                                              0xF

#define HV_X64_APIC_ACCESS_RECOMMENDED                           8

#define HV_X64_AS_SWITCH_RECOMMENDED                             1

#define HV_X64_CLUSTER_IPI_RECOMMENDED                           0x400

#define HV_X64_CPU_DYNAMIC_PARTITIONING_AVAILABLE                8

#define HV_X64_CREATE_ROOT_VIRTUAL_PROCESSOR                     2

#define HV_X64_DYNAMIC_PROCESSOR_FEATURE_MAX_ENCRYPTED_PARTITIONS 0xD
#define HV_X64_DYNAMIC_PROCESSOR_FEATURE_SNP_STATUS              0x10

#define HV_X64_ENLIGHTENED_VMCS_VERSION                          0xFF
#define HV_X64_ENLIGHTENED_VMCS_RECOMMENDED                      0x4000

#define HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED                    0x800

#define HV_X64_GUEST_DEBUGGING_AVAILABLE                         2
#define HV_X64_GUEST_IDLE_STATE_AVAILABLE                        0x20

#define HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE                     0x10
#define HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE                    0x8000

#define HV_X64_HYPERV_NESTED                                     0x1000

#define HV_X64_LOCAL_TLB_FLUSH_RECOMMENDED                       2

#define HV_X64_MWAIT_AVAILABLE                                   1

#define HV_X64_NESTED_EVMCS1_PERF_GLOBAL_CTRL                    1
#define HV_X64_NESTED_DIRECT_FLUSH                               0x20000
#define HV_X64_NESTED_GUEST_MAPPING_FLUSH                        0x40000
#define HV_X64_NESTED_MSR_BITMAP                                 0x80000
#define HV_X64_NESTED_ENLIGHTENED_TLB                            0x400000

#define HV_X64_NO_NONARCH_CORESHARING                            0x40000

#define HV_X64_PERF_MONITOR_AVAILABLE                            4

#define HV_X64_PERFORMANCE_COUNTER_SYNC                          4

#define HV_X64_RELAXED_TIMING_RECOMMENDED                        0x20

#define HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED                      4

#define HV_X64_RESERVED_IDENTITY_BIT                             0x80000000U

#define HV_X64_START_LOGICAL_PROCESSOR                           1

#define HV_X64_SYSTEM_RESET_RECOMMENDED                          0x10

#define HV_X64_USE_MMIO_HYPERCALLS                               0x200000

#endif /* MSHVSTACK_HYPERV_FEATURES_H */
