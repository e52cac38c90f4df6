/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: synthetic (Hyper-V) MSR numbers and their bit fields.
 * Transcribed from the compiled facts in shared/reference/mshv_abi.md.
 */
#ifndef MSHVSTACK_HYPERV_MSR_H
#define MSHVSTACK_HYPERV_MSR_H

#define HV_MSR_VP_RUNTIME_AVAILABLE                              1
#define HV_MSR_TIME_REF_COUNT_AVAILABLE                          2
#define HV_MSR_SYNIC_AVAILABLE                                   4
#define HV_MSR_SYNTIMER_AVAILABLE                                8
#define HV_MSR_APIC_ACCESS_AVAILABLE                             0x10
#define HV_MSR_HYPERCALL_AVAILABLE                               0x20
#define HV_MSR_VP_INDEX_AVAILABLE                                0x40
#define HV_MSR_RESET_AVAILABLE                                   0x80
#define HV_MSR_STAT_PAGES_AVAILABLE                              0x100
#define HV_MSR_REFERENCE_TSC_AVAILABLE                           0x200
#define HV_MSR_GUEST_IDLE_AVAILABLE                              0x400
#define HV_MSR_VP_INDEX                                          0x40000002
#define HV_MSR_TIME_REF_COUNT                                    0x40000020
#define HV_MSR_REFERENCE_TSC                                     0x40000021
#define HV_MSR_SCONTROL                                          0x40000080
#define HV_MSR_SVERSION                                          0x40000081
#define HV_MSR_SIEFP                                             0x40000082
#define HV_MSR_SIMP                                              0x40000083
#define HV_MSR_EOM                                               0x40000084
#define HV_MSR_SIRBP                                             0x40000085
#define HV_MSR_SINT0                                             0x40000090
#define HV_MSR_STIMER0_CONFIG                                    0x400000B0
#define HV_MSR_STIMER0_COUNT                                     0x400000B1
#define HV_MSR_CRASH_P0                                          0x40000100
#define HV_MSR_CRASH_P1                                          0x40000101
#define HV_MSR_CRASH_P2                                          0x40000102
#define HV_MSR_CRASH_P3                                          0x40000103
#define HV_MSR_CRASH_P4                                          0x40000104
#define HV_MSR_CRASH_CTL                                         0x40000105
#define HV_MSR_NESTED_SCONTROL                                   0x40001080
#define HV_MSR_NESTED_SVERSION                                   0x40001081
#define HV_MSR_NESTED_SIEFP                                      0x40001082
#define HV_MSR_NESTED_SIMP                                       0x40001083
#define HV_MSR_NESTED_EOM                                        0x40001084
#define HV_MSR_NESTED_SINT0                                      0x40001090

/* The reference TSC page the hypervisor maintains (TLFS 12.7). */
struct hv_reference_tsc_page {
	__u32 tsc_sequence;
	__u32 reserved1;
	__u64 tsc_scale;
	__s64 tsc_offset;
};
/* A sequence of 0 tells the guest the page is not valid: use the MSR. */
#define HV_REFERENCE_TSC_SEQUENCE_INVALID                        0

/* Synthetic timer configuration MSR (HV_X64_MSR_STIMERn_CONFIG). */
#define HV_STIMER_CONFIG_ENABLE                                  0x1
#define HV_STIMER_CONFIG_PERIODIC                                0x2
#define HV_STIMER_CONFIG_LAZY                                    0x4
#define HV_STIMER_CONFIG_AUTO_ENABLE                             0x8
#define HV_STIMER_CONFIG_APIC_VECTOR_SHIFT                       4
#define HV_STIMER_CONFIG_APIC_VECTOR_MASK                        0xFF0
#define HV_STIMER_CONFIG_DIRECT_MODE                             0x1000
#define HV_STIMER_CONFIG_SINTX_SHIFT                             16
#define HV_STIMER_CONFIG_SINTX_MASK                              0xF0000

#define HV_X64_MSR_HYPERCALL_ENABLE                              1
#define HV_X64_MSR_TSC_REFERENCE_ENABLE                          1
#define HV_X64_MSR_VP_ASSIST_PAGE_ENABLE                         1
#define HV_X64_MSR_CRASH_PARAMS                                  5
#define HV_X64_MSR_HYPERCALL_PAGE_ADDRESS_SHIFT                  0xC
#define HV_X64_MSR_TSC_REFERENCE_ADDRESS_SHIFT                   0xC
#define HV_X64_MSR_VP_ASSIST_PAGE_ADDRESS_SHIFT                  0xC
#define HV_X64_MSR_GUEST_OS_ID                                   0x40000000
#define HV_X64_MSR_HYPERCALL                                     0x40000001
#define HV_X64_MSR_VP_INDEX                                      0x40000002
#define HV_X64_MSR_RESET                                         0x40000003
#define HV_X64_MSR_VP_RUNTIME                                    0x40000010
#define HV_X64_MSR_TIME_REF_COUNT                                0x40000020
#define HV_X64_MSR_REFERENCE_TSC                                 0x40000021
#define HV_X64_MSR_TSC_FREQUENCY                                 0x40000022
#define HV_X64_MSR_APIC_FREQUENCY                                0x40000023
#define HV_X64_MSR_EOI                                           0x40000070
#define HV_X64_MSR_ICR                                           0x40000071
#define HV_X64_MSR_TPR                                           0x40000072
#define HV_X64_MSR_VP_ASSIST_PAGE                                0x40000073
#define HV_X64_MSR_SCONTROL                                      0x40000080
#define HV_X64_MSR_SVERSION                                      0x40000081
#define HV_X64_MSR_SIEFP                                         0x40000082
#define HV_X64_MSR_SIMP                                          0x40000083
#define HV_X64_MSR_EOM                                           0x40000084
#define HV_X64_MSR_SIRBP                                         0x40000085
#define HV_X64_MSR_SINT0                                         0x40000090
#define HV_X64_MSR_SINT1                                         0x40000091
#define HV_X64_MSR_SINT2                                         0x40000092
#define HV_X64_MSR_SINT3                                         0x40000093
#define HV_X64_MSR_SINT4                                         0x40000094
#define HV_X64_MSR_SINT5                                         0x40000095
#define HV_X64_MSR_SINT6                                         0x40000096
#define HV_X64_MSR_SINT7                                         0x40000097
#define HV_X64_MSR_SINT8                                         0x40000098
#define HV_X64_MSR_SINT9                                         0x40000099
#define HV_X64_MSR_SINT10                                        0x4000009A
#define HV_X64_MSR_SINT11                                        0x4000009B
#define HV_X64_MSR_SINT12                                        0x4000009C
#define HV_X64_MSR_SINT13                                        0x4000009D
#define HV_X64_MSR_SINT14                                        0x4000009E
#define HV_X64_MSR_SINT15                                        0x4000009F
#define HV_X64_MSR_STIMER0_CONFIG                                0x400000B0
#define HV_X64_MSR_STIMER0_COUNT                                 0x400000B1
#define HV_X64_MSR_STIMER1_CONFIG                                0x400000B2
#define HV_X64_MSR_STIMER1_COUNT                                 0x400000B3
#define HV_X64_MSR_STIMER2_CONFIG                                0x400000B4
#define HV_X64_MSR_STIMER2_COUNT                                 0x400000B5
#define HV_X64_MSR_STIMER3_CONFIG                                0x400000B6
#define HV_X64_MSR_STIMER3_COUNT                                 0x400000B7
#define HV_X64_MSR_GUEST_IDLE                                    0x400000F0
#define HV_X64_MSR_CRASH_P0                                      0x40000100
#define HV_X64_MSR_CRASH_P1                                      0x40000101
#define HV_X64_MSR_CRASH_P2                                      0x40000102
#define HV_X64_MSR_CRASH_P3                                      0x40000103
#define HV_X64_MSR_CRASH_P4                                      0x40000104
#define HV_X64_MSR_CRASH_CTL                                     0x40000105
#define HV_X64_MSR_REENLIGHTENMENT_CONTROL                       0x40000106
#define HV_X64_MSR_TSC_EMULATION_CONTROL                         0x40000107
#define HV_X64_MSR_TSC_EMULATION_STATUS                          0x40000108
#define HV_X64_MSR_TSC_INVARIANT_CONTROL                         0x40000118
#define HV_X64_MSR_NESTED_SCONTROL                               0x40001080
#define HV_X64_MSR_NESTED_SVERSION                               0x40001081
#define HV_X64_MSR_NESTED_SIEFP                                  0x40001082
#define HV_X64_MSR_NESTED_SIMP                                   0x40001083
#define HV_X64_MSR_NESTED_EOM                                    0x40001084
#define HV_X64_MSR_NESTED_SINT0                                  0x40001090
#define HV_X64_MSR_HYPERCALL_PAGE_ADDRESS_MASK                   0xFFFFFFFFFFFFF000ULL
#define HV_X64_MSR_VP_ASSIST_PAGE_ADDRESS_MASK                   0xFFFFFFFFFFFFF000ULL

#endif /* MSHVSTACK_HYPERV_MSR_H */
