/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: x64 VP registers as the Microsoft hypervisor names and lays them
 * out (hv_register_name values, register value/assoc, segment and table
 * registers, the shared VP register page).  Transcribed from the compiled
 * facts in shared/reference/mshv_abi.md; not copied from any header.
 *
 * Bitfields live in a named member `bits` of each union: cffi lays out
 * bitfields of anonymous structs nested in unions wrongly (cffi-notes.md).
 */
#ifndef MSHVSTACK_HYPERV_REGISTERS_H
#define MSHVSTACK_HYPERV_REGISTERS_H

#include <linux/types.h>

/* ---- hv_register_name ---- */
#define HV_REGISTER_CPU_MANAGEMENT_FEATURES_INFO                 0x204
#define HV_REGISTER_CPU_MANAGEMENT_VERSION                       0x90007

#define HV_REGISTER_DEBUG_DEVICE_OPTIONS                         0x260

#define HV_REGISTER_DELIVERABILITY_NOTIFICATIONS                 0x10006

#define HV_REGISTER_DISPATCH_SUSPEND                             3

#define HV_REGISTER_EOM                                          0xA0014

#define HV_REGISTER_EXPLICIT_SUSPEND                             0

#define HV_REGISTER_FEATURES_INFO                                0x201

#define HV_REGISTER_GUEST_CRASH_P0                               0x210
#define HV_REGISTER_GUEST_CRASH_P1                               0x211
#define HV_REGISTER_GUEST_CRASH_P2                               0x212
#define HV_REGISTER_GUEST_CRASH_P3                               0x213
#define HV_REGISTER_GUEST_CRASH_P4                               0x214
#define HV_REGISTER_GUEST_CRASH_CTL                              0x215
#define HV_REGISTER_GUEST_IDLE                                   0x250
#define HV_REGISTER_GUEST_OS_ID                                  0x90002

#define HV_REGISTER_HARDWARE_FEATURES_INFO                       0x203

#define HV_REGISTER_HYPERVISOR_VERSION                           0x100

#define HV_REGISTER_IMPLEMENTATION_LIMITS_INFO                   0x202

#define HV_REGISTER_INSTRUCTION_EMULATION_HINTS                  2

#define HV_REGISTER_INTERCEPT_SUSPEND                            1

#define HV_REGISTER_INTERNAL_ACTIVITY_STATE                      4

#define HV_REGISTER_INTERRUPT_CLOCK_FREQUENCY                    0x241
#define HV_REGISTER_INTERRUPT_STATE                              0x10003

#define HV_REGISTER_IPT_FEATURES_INFO                            0x208

#define HV_REGISTER_ISOLATION_CAPABILITIES                       0xD0100

#define HV_REGISTER_MEMORY_ZEROING_CONTROL                       0x270

#define HV_REGISTER_NESTED_VIRT_FEATURES_INFO                    0x207
#define HV_REGISTER_NESTED_VP_INDEX                              0x91003
#define HV_REGISTER_NESTED_SINT0                                 0xA1000
#define HV_REGISTER_NESTED_SINT1                                 0xA1001
#define HV_REGISTER_NESTED_SINT2                                 0xA1002
#define HV_REGISTER_NESTED_SINT3                                 0xA1003
#define HV_REGISTER_NESTED_SINT4                                 0xA1004
#define HV_REGISTER_NESTED_SINT5                                 0xA1005
#define HV_REGISTER_NESTED_SINT6                                 0xA1006
#define HV_REGISTER_NESTED_SINT7                                 0xA1007
#define HV_REGISTER_NESTED_SINT8                                 0xA1008
#define HV_REGISTER_NESTED_SINT9                                 0xA1009
#define HV_REGISTER_NESTED_SINT10                                0xA100A
#define HV_REGISTER_NESTED_SINT11                                0xA100B
#define HV_REGISTER_NESTED_SINT12                                0xA100C
#define HV_REGISTER_NESTED_SINT13                                0xA100D
#define HV_REGISTER_NESTED_SINT14                                0xA100E
#define HV_REGISTER_NESTED_SINT15                                0xA100F
#define HV_REGISTER_NESTED_SCONTROL                              0xA1010
#define HV_REGISTER_NESTED_SVERSION                              0xA1011
#define HV_REGISTER_NESTED_SIFP                                  0xA1012
#define HV_REGISTER_NESTED_SIPP                                  0xA1013
#define HV_REGISTER_NESTED_EOM                                   0xA1014
#define HV_REGISTER_NESTED_SIRBP                                 0xA1015

#define HV_REGISTER_PENDING_INTERRUPTION                         0x10002
#define HV_REGISTER_PENDING_EVENT0                               0x10004
#define HV_REGISTER_PENDING_EVENT1                               0x10005

#define HV_REGISTER_POWER_STATE_CONFIG_C1                        0x220
#define HV_REGISTER_POWER_STATE_TRIGGER_C1                       0x221
#define HV_REGISTER_POWER_STATE_CONFIG_C2                        0x222
#define HV_REGISTER_POWER_STATE_TRIGGER_C2                       0x223
#define HV_REGISTER_POWER_STATE_CONFIG_C3                        0x224
#define HV_REGISTER_POWER_STATE_TRIGGER_C3                       0x225

#define HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO                 0x200

#define HV_REGISTER_PROCESSOR_CLOCK_FREQUENCY                    0x240

#define HV_REGISTER_REFERENCE_TSC                                0x90017

#define HV_REGISTER_SCONTROL                                     0xA0010

#define HV_REGISTER_SIEFP                                        0xA0012

#define HV_REGISTER_SIMP                                         0xA0013

#define HV_REGISTER_SINT0                                        0xA0000

#define HV_REGISTER_SINT1                                        0xA0001

#define HV_REGISTER_SINT10                                       0xA000A

#define HV_REGISTER_SINT11                                       0xA000B

#define HV_REGISTER_SINT12                                       0xA000C

#define HV_REGISTER_SINT13                                       0xA000D

#define HV_REGISTER_SINT14                                       0xA000E

#define HV_REGISTER_SINT15                                       0xA000F

#define HV_REGISTER_SINT2                                        0xA0002

#define HV_REGISTER_SINT3                                        0xA0003

#define HV_REGISTER_SINT4                                        0xA0004

#define HV_REGISTER_SINT5                                        0xA0005

#define HV_REGISTER_SINT6                                        0xA0006

#define HV_REGISTER_SINT7                                        0xA0007

#define HV_REGISTER_SINT8                                        0xA0008

#define HV_REGISTER_SINT9                                        0xA0009

#define HV_REGISTER_SIRBP                                        0xA0015

#define HV_REGISTER_SKIP_LEVEL_FEATURES_INFO                     0x206

#define HV_REGISTER_STATS_PARTITION_RETAIL                       0x90020
#define HV_REGISTER_STATS_PARTITION_INTERNAL                     0x90021
#define HV_REGISTER_STATS_VP_RETAIL                              0x90022
#define HV_REGISTER_STATS_VP_INTERNAL                            0x90023

#define HV_REGISTER_STIME_UNHALTED_TIMER_CONFIG                  0xB0100
#define HV_REGISTER_STIME_UNHALTED_TIMER_COUNT                   0xB0101

#define HV_REGISTER_STIMER0_CONFIG                               0xB0000
#define HV_REGISTER_STIMER0_COUNT                                0xB0001

#define HV_REGISTER_STIMER1_CONFIG                               0xB0002
#define HV_REGISTER_STIMER1_COUNT                                0xB0003

#define HV_REGISTER_STIMER2_CONFIG                               0xB0004
#define HV_REGISTER_STIMER2_COUNT                                0xB0005

#define HV_REGISTER_STIMER3_CONFIG                               0xB0006
#define HV_REGISTER_STIMER3_COUNT                                0xB0007

#define HV_REGISTER_SVERSION                                     0xA0011

#define HV_REGISTER_SVM_FEATURES_INFO                            0x205

#define HV_REGISTER_TIME_REF_COUNT                               0x90004

#define HV_REGISTER_VP_RUNTIME                                   0x90000
#define HV_REGISTER_VP_INDEX                                     0x90003
#define HV_REGISTER_VP_ASSIST_PAGE                               0x90013
#define HV_REGISTER_VP_ROOT_SIGNAL_COUNT                         0x90014

#define HV_REGISTER_VSM_CODE_PAGE_OFFSETS                        0xD0002
#define HV_REGISTER_VSM_VP_STATUS                                0xD0003
#define HV_REGISTER_VSM_PARTITION_STATUS                         0xD0004
#define HV_REGISTER_VSM_VINA                                     0xD0005
#define HV_REGISTER_VSM_CAPABILITIES                             0xD0006
#define HV_REGISTER_VSM_PARTITION_CONFIG                         0xD0007
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL0                    0xD0010
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL1                    0xD0011
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL2                    0xD0012
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL3                    0xD0013
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL4                    0xD0014
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL5                    0xD0015
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL6                    0xD0016
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL7                    0xD0017
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL8                    0xD0018
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL9                    0xD0019
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL10                   0xD001A
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL11                   0xD001B
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL12                   0xD001C
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL13                   0xD001D
#define HV_REGISTER_VSM_VP_SECURE_CONFIG_VTL14                   0xD001E
#define HV_REGISTER_VSM_VP_WAIT_FOR_TLB_LOCK                     0xD0020

#define HV_X64_REGISTER_CLASS_GENERAL                            0
#define HV_X64_REGISTER_CLASS_IP                                 1
#define HV_X64_REGISTER_CLASS_XMM                                2
#define HV_X64_REGISTER_CLASS_SEGMENT                            3
#define HV_X64_REGISTER_CLASS_FLAGS                              4
#define HV_X64_REGISTER_DELIVERABILITY_NOTIFICATIONS             0x10006
#define HV_X64_REGISTER_PENDING_DEBUG_EXCEPTION                  0x10007
#define HV_X64_REGISTER_RAX                                      0x20000
#define HV_X64_REGISTER_RCX                                      0x20001
#define HV_X64_REGISTER_RDX                                      0x20002
#define HV_X64_REGISTER_RBX                                      0x20003
#define HV_X64_REGISTER_RSP                                      0x20004
#define HV_X64_REGISTER_RBP                                      0x20005
#define HV_X64_REGISTER_RSI                                      0x20006
#define HV_X64_REGISTER_RDI                                      0x20007
#define HV_X64_REGISTER_R8                                       0x20008
#define HV_X64_REGISTER_R9                                       0x20009
#define HV_X64_REGISTER_R10                                      0x2000A
#define HV_X64_REGISTER_R11                                      0x2000B
#define HV_X64_REGISTER_R12                                      0x2000C
#define HV_X64_REGISTER_R13                                      0x2000D
#define HV_X64_REGISTER_R14                                      0x2000E
#define HV_X64_REGISTER_R15                                      0x2000F
#define HV_X64_REGISTER_RIP                                      0x20010
#define HV_X64_REGISTER_RFLAGS                                   0x20011
#define HV_X64_REGISTER_XMM0                                     0x30000
#define HV_X64_REGISTER_XMM1                                     0x30001
#define HV_X64_REGISTER_XMM2                                     0x30002
#define HV_X64_REGISTER_XMM3                                     0x30003
#define HV_X64_REGISTER_XMM4                                     0x30004
#define HV_X64_REGISTER_XMM5                                     0x30005
#define HV_X64_REGISTER_XMM6                                     0x30006
#define HV_X64_REGISTER_XMM7                                     0x30007
#define HV_X64_REGISTER_XMM8                                     0x30008
#define HV_X64_REGISTER_XMM9                                     0x30009
#define HV_X64_REGISTER_XMM10                                    0x3000A
#define HV_X64_REGISTER_XMM11                                    0x3000B
#define HV_X64_REGISTER_XMM12                                    0x3000C
#define HV_X64_REGISTER_XMM13                                    0x3000D
#define HV_X64_REGISTER_XMM14                                    0x3000E
#define HV_X64_REGISTER_XMM15                                    0x3000F
#define HV_X64_REGISTER_FP_MMX0                                  0x30010
#define HV_X64_REGISTER_FP_MMX1                                  0x30011
#define HV_X64_REGISTER_FP_MMX2                                  0x30012
#define HV_X64_REGISTER_FP_MMX3                                  0x30013
#define HV_X64_REGISTER_FP_MMX4                                  0x30014
#define HV_X64_REGISTER_FP_MMX5                                  0x30015
#define HV_X64_REGISTER_FP_MMX6                                  0x30016
#define HV_X64_REGISTER_FP_MMX7                                  0x30017
#define HV_X64_REGISTER_FP_CONTROL_STATUS                        0x30018
#define HV_X64_REGISTER_XMM_CONTROL_STATUS                       0x30019
#define HV_X64_REGISTER_CR0                                      0x40000
#define HV_X64_REGISTER_CR2                                      0x40001
#define HV_X64_REGISTER_CR3                                      0x40002
#define HV_X64_REGISTER_CR4                                      0x40003
#define HV_X64_REGISTER_CR8                                      0x40004
#define HV_X64_REGISTER_XFEM                                     0x40005
#define HV_X64_REGISTER_INTERMEDIATE_CR0                         0x41000
#define HV_X64_REGISTER_INTERMEDIATE_CR3                         0x41002
#define HV_X64_REGISTER_INTERMEDIATE_CR4                         0x41003
#define HV_X64_REGISTER_INTERMEDIATE_CR8                         0x41004
#define HV_X64_REGISTER_DR0                                      0x50000
#define HV_X64_REGISTER_DR1                                      0x50001
#define HV_X64_REGISTER_DR2                                      0x50002
#define HV_X64_REGISTER_DR3                                      0x50003
#define HV_X64_REGISTER_DR6                                      0x50004
#define HV_X64_REGISTER_DR7                                      0x50005
#define HV_X64_REGISTER_ES                                       0x60000
#define HV_X64_REGISTER_CS                                       0x60001
#define HV_X64_REGISTER_SS                                       0x60002
#define HV_X64_REGISTER_DS                                       0x60003
#define HV_X64_REGISTER_FS                                       0x60004
#define HV_X64_REGISTER_GS                                       0x60005
#define HV_X64_REGISTER_LDTR                                     0x60006
#define HV_X64_REGISTER_TR                                       0x60007
#define HV_X64_REGISTER_IDTR                                     0x70000
#define HV_X64_REGISTER_GDTR                                     0x70001
#define HV_X64_REGISTER_TSC                                      0x80000
#define HV_X64_REGISTER_EFER                                     0x80001
#define HV_X64_REGISTER_KERNEL_GS_BASE                           0x80002
#define HV_X64_REGISTER_APIC_BASE                                0x80003
#define HV_X64_REGISTER_PAT                                      0x80004
#define HV_X64_REGISTER_SYSENTER_CS                              0x80005
#define HV_X64_REGISTER_SYSENTER_EIP                             0x80006
#define HV_X64_REGISTER_SYSENTER_ESP                             0x80007
#define HV_X64_REGISTER_STAR                                     0x80008
#define HV_X64_REGISTER_LSTAR                                    0x80009
#define HV_X64_REGISTER_CSTAR                                    0x8000A
#define HV_X64_REGISTER_SFMASK                                   0x8000B
#define HV_X64_REGISTER_INITIAL_APIC_ID                          0x8000C
#define HV_X64_REGISTER_MSR_MTRR_CAP                             0x8000D
#define HV_X64_REGISTER_MSR_MTRR_DEF_TYPE                        0x8000E
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE0                      0x80010
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE1                      0x80011
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE2                      0x80012
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE3                      0x80013
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE4                      0x80014
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE5                      0x80015
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE6                      0x80016
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE7                      0x80017
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE8                      0x80018
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASE9                      0x80019
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASEA                      0x8001A
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASEB                      0x8001B
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASEC                      0x8001C
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASED                      0x8001D
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASEE                      0x8001E
#define HV_X64_REGISTER_MSR_MTRR_PHYS_BASEF                      0x8001F
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK0                      0x80040
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK1                      0x80041
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK2                      0x80042
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK3                      0x80043
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK4                      0x80044
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK5                      0x80045
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK6                      0x80046
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK7                      0x80047
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK8                      0x80048
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASK9                      0x80049
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKA                      0x8004A
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKB                      0x8004B
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKC                      0x8004C
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKD                      0x8004D
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKE                      0x8004E
#define HV_X64_REGISTER_MSR_MTRR_PHYS_MASKF                      0x8004F
#define HV_X64_REGISTER_MSR_MTRR_FIX64K00000                     0x80070
#define HV_X64_REGISTER_MSR_MTRR_FIX16K80000                     0x80071
#define HV_X64_REGISTER_MSR_MTRR_FIX16KA0000                     0x80072
#define HV_X64_REGISTER_MSR_MTRR_FIX4KC0000                      0x80073
#define HV_X64_REGISTER_MSR_MTRR_FIX4KC8000                      0x80074
#define HV_X64_REGISTER_MSR_MTRR_FIX4KD0000                      0x80075
#define HV_X64_REGISTER_MSR_MTRR_FIX4KD8000                      0x80076
#define HV_X64_REGISTER_MSR_MTRR_FIX4KE0000                      0x80077
#define HV_X64_REGISTER_MSR_MTRR_FIX4KE8000                      0x80078
#define HV_X64_REGISTER_MSR_MTRR_FIX4KF0000                      0x80079
#define HV_X64_REGISTER_MSR_MTRR_FIX4KF8000                      0x8007A
#define HV_X64_REGISTER_TSC_AUX                                  0x8007B
#define HV_X64_REGISTER_BNDCFGS                                  0x8007C
#define HV_X64_REGISTER_DEBUG_CTL                                0x8007D
#define HV_X64_REGISTER_AVAILABLE0008007E                        0x8007E
#define HV_X64_REGISTER_AVAILABLE0008007F                        0x8007F
#define HV_X64_REGISTER_SGX_LAUNCH_CONTROL0                      0x80080
#define HV_X64_REGISTER_SGX_LAUNCH_CONTROL1                      0x80081
#define HV_X64_REGISTER_SGX_LAUNCH_CONTROL2                      0x80082
#define HV_X64_REGISTER_SGX_LAUNCH_CONTROL3                      0x80083
#define HV_X64_REGISTER_SPEC_CTRL                                0x80084
#define HV_X64_REGISTER_PRED_CMD                                 0x80085
#define HV_X64_REGISTER_VIRT_SPEC_CTRL                           0x80086
#define HV_X64_REGISTER_U_XSS                                    0x8008B
#define HV_X64_REGISTER_U_CET                                    0x8008C
#define HV_X64_REGISTER_S_CET                                    0x8008D
#define HV_X64_REGISTER_SSP                                      0x8008E
#define HV_X64_REGISTER_PL0_SSP                                  0x8008F
#define HV_X64_REGISTER_PL1_SSP                                  0x80090
#define HV_X64_REGISTER_PL2_SSP                                  0x80091
#define HV_X64_REGISTER_PL3_SSP                                  0x80092
#define HV_X64_REGISTER_INTERRUPT_SSP_TABLE_ADDR                 0x80093
#define HV_X64_REGISTER_TSC_ADJUST                               0x80096
#define HV_X64_REGISTER_MSR_IA32_MISC_ENABLE                     0x800A0
#define HV_X64_REGISTER_IA32_FEATURE_CONTROL                     0x800A1
#define HV_X64_REGISTER_IA32_VMX_BASIC                           0x800A2
#define HV_X64_REGISTER_IA32_VMX_PINBASED_CTLS                   0x800A3
#define HV_X64_REGISTER_IA32_VMX_PROCBASED_CTLS                  0x800A4
#define HV_X64_REGISTER_IA32_VMX_EXIT_CTLS                       0x800A5
#define HV_X64_REGISTER_IA32_VMX_ENTRY_CTLS                      0x800A6
#define HV_X64_REGISTER_IA32_VMX_MISC                            0x800A7
#define HV_X64_REGISTER_IA32_VMX_CR0_FIXED0                      0x800A8
#define HV_X64_REGISTER_IA32_VMX_CR0_FIXED1                      0x800A9
#define HV_X64_REGISTER_IA32_VMX_CR4_FIXED0                      0x800AA
#define HV_X64_REGISTER_IA32_VMX_CR4_FIXED1                      0x800AB
#define HV_X64_REGISTER_IA32_VMX_VMCS_ENUM                       0x800AC
#define HV_X64_REGISTER_IA32_VMX_PROCBASED_CTLS2                 0x800AD
#define HV_X64_REGISTER_IA32_VMX_EPT_VPID_CAP                    0x800AE
#define HV_X64_REGISTER_IA32_VMX_TRUE_PINBASED_CTLS              0x800AF
#define HV_X64_REGISTER_IA32_VMX_TRUE_PROCBASED_CTLS             0x800B0
#define HV_X64_REGISTER_IA32_VMX_TRUE_EXIT_CTLS                  0x800B1
#define HV_X64_REGISTER_IA32_VMX_TRUE_ENTRY_CTLS                 0x800B2
#define HV_X64_REGISTER_PERF_GLOBAL_CTRL                         0x81000
#define HV_X64_REGISTER_PERF_GLOBAL_STATUS                       0x81001
#define HV_X64_REGISTER_PERF_GLOBAL_IN_USE                       0x81002
#define HV_X64_REGISTER_FIXED_CTR_CTRL                           0x81003
#define HV_X64_REGISTER_DS_AREA                                  0x81004
#define HV_X64_REGISTER_PEBS_ENABLE                              0x81005
#define HV_X64_REGISTER_PEBS_LD_LAT                              0x81006
#define HV_X64_REGISTER_PEBS_FRONTEND                            0x81007
#define HV_X64_REGISTER_RTIT_CTL                                 0x81008
#define HV_X64_REGISTER_RTIT_STATUS                              0x81009
#define HV_X64_REGISTER_RTIT_OUTPUT_BASE                         0x8100A
#define HV_X64_REGISTER_RTIT_OUTPUT_MASK_PTRS                    0x8100B
#define HV_X64_REGISTER_RTIT_CR3_MATCH                           0x8100C
#define HV_X64_REGISTER_PERF_EVT_SEL0                            0x81100
#define HV_X64_REGISTER_PMC0                                     0x81200
#define HV_X64_REGISTER_FIXED_CTR0                               0x81300
#define HV_X64_REGISTER_RTIT_ADDR0A                              0x81400
#define HV_X64_REGISTER_LBR_TOS                                  0x82000
#define HV_X64_REGISTER_LBR_SELECT                               0x82001
#define HV_X64_REGISTER_LER_FROM_LIP                             0x82002
#define HV_X64_REGISTER_LER_TO_LIP                               0x82003
#define HV_X64_REGISTER_LBR_FROM0                                0x82100
#define HV_X64_REGISTER_LBR_TO0                                  0x82200
#define HV_X64_REGISTER_LBR_INFO0                                0x83300
#define HV_X64_REGISTER_APIC_ID                                  0x84802
#define HV_X64_REGISTER_APIC_VERSION                             0x84803
#define HV_X64_REGISTER_HYPERCALL                                0x90001
#define HV_X64_REGISTER_SYNTHETIC_EOI                            0x90010
#define HV_X64_REGISTER_SYNTHETIC_ICR                            0x90011
#define HV_X64_REGISTER_SYNTHETIC_TPR                            0x90012
#define HV_X64_REGISTER_GHCB                                     0x90019
#define HV_X64_REGISTER_REG_PAGE                                 0x9001C
#define HV_X64_REGISTER_EMULATED_TIMER_PERIOD                    0x90030
#define HV_X64_REGISTER_EMULATED_TIMER_CONTROL                   0x90031
#define HV_X64_REGISTER_PM_TIMER_ASSIST                          0x90032
#define HV_X64_REGISTER_SEV_CONTROL                              0x90040
#define HV_X64_REGISTER_SEV_GHCB_GPA                             0x90041
#define HV_X64_REGISTER_SEV_DOORBELL_GPA                         0x90042
#define HV_X64_REGISTER_CR_INTERCEPT_CONTROL                     0xE0000
#define HV_X64_REGISTER_CR_INTERCEPT_CR0_MASK                    0xE0001
#define HV_X64_REGISTER_CR_INTERCEPT_CR4_MASK                    0xE0002
#define HV_X64_REGISTER_CR_INTERCEPT_IA32_MISC_ENABLE_MASK       0xE0003

/* Segment attribute bits (hv_x64_segment_register.attributes). */
#define HV_X64_SEGMENT_ATTR_TYPE_MASK   0x000F
#define HV_X64_SEGMENT_ATTR_S           0x0010
#define HV_X64_SEGMENT_ATTR_DPL_SHIFT   5
#define HV_X64_SEGMENT_ATTR_PRESENT     0x0080
#define HV_X64_SEGMENT_ATTR_AVL         0x1000
#define HV_X64_SEGMENT_ATTR_LONG        0x2000
#define HV_X64_SEGMENT_ATTR_DEFAULT     0x4000
#define HV_X64_SEGMENT_ATTR_GRANULARITY 0x8000

struct hv_u128 {
	__u64 low_part;
	__u64 high_part;
};

struct hv_x64_segment_register {
	__u64 base;
	__u32 limit;
	__u16 selector;
	union {
		__u16 attributes;
		struct {
			__u16 segment_type:4;
			__u16 non_system_segment:1;
			__u16 descriptor_privilege_level:2;
			__u16 present:1;
			__u16 reserved:4;
			__u16 available:1;
			__u16 _long:1;
			__u16 _default:1;
			__u16 granularity:1;
		} bits;
	};
};

struct hv_x64_table_register {
	__u16 pad[3];
	__u16 limit;
	__u64 base;
};

union hv_x64_fp_register {
	struct hv_u128 as_uint128;
	struct {
		__u64 mantissa;
		__u64 biased_exponent:15;
		__u64 sign:1;
		__u64 reserved:48;
	} bits;
};

union hv_x64_fp_control_status_register {
	struct hv_u128 as_uint128;
	struct {
		__u16 fp_control;
		__u16 fp_status;
		__u8  fp_tag;
		__u8  reserved;
		__u16 last_fp_op;
		__u64 last_fp_rip;
	};
};

union hv_x64_xmm_control_status_register {
	struct hv_u128 as_uint128;
	struct {
		__u64 last_fp_rdp;
		__u32 xmm_status_control;
		__u32 xmm_status_control_mask;
	};
};

union hv_explicit_suspend_register {
	__u64 as_uint64;
	struct { __u64 suspended:1; __u64 reserved:63; } bits;
};

union hv_intercept_suspend_register {
	__u64 as_uint64;
	struct { __u64 suspended:1; __u64 reserved:63; } bits;
};

union hv_dispatch_suspend_register {
	__u64 as_uint64;
	struct { __u64 suspended:1; __u64 reserved:63; } bits;
};

/* Pending-interruption interruption_type values. */
#define HV_X64_PENDING_INTERRUPT        0
#define HV_X64_PENDING_NMI              2
#define HV_X64_PENDING_EXCEPTION        3

union hv_x64_pending_interruption_register {
	__u64 as_uint64;
	struct {
		__u32 interruption_pending:1;
		__u32 interruption_type:3;
		__u32 deliver_error_code:1;
		__u32 instruction_length:4;
		__u32 nested_event:1;
		__u32 reserved:6;
		__u32 interruption_vector:16;
		__u32 error_code;
	} bits;
};

union hv_x64_interrupt_state_register {
	__u64 as_uint64;
	struct {
		__u64 interrupt_shadow:1;
		__u64 nmi_masked:1;
		__u64 reserved:62;
	} bits;
};

/*
 * HV_REGISTER_DELIVERABILITY_NOTIFICATIONS (TLFS; OpenVMM's
 * HvDeliverabilityNotificationsRegister): ask for an exit when the VP can
 * take an NMI, an interrupt above a priority, or a message in any of the
 * given SINTs (HVMSG_X64_INTERRUPTION_DELIVERABLE, HVMSG_SYNIC_SINT_DELIVERABLE).
 */
union hv_deliverability_notifications_register {
	__u64 as_uint64;
	struct {
		__u64 nmi_notification:1;
		__u64 interrupt_notification:1;
		__u64 interrupt_priority:4;
		__u64 reserved:42;
		__u64 sints:16;
	} bits;
};

union hv_x64_pending_exception_event {
	__u64 as_uint64[2];
	struct {
		__u32 event_pending:1;
		__u32 event_type:3;
		__u32 reserved0:4;
		__u32 deliver_error_code:1;
		__u32 reserved1:7;
		__u32 vector:16;
		__u32 error_code;
		__u64 exception_parameter;
	} bits;
};

union hv_arm64_pending_synthetic_exception_event {
	__u64 as_uint64[2];
};

union hv_x64_xsave_xfem_register {
	__u64 as_uint64;
	struct {
		__u64 legacy_x87:1;
		__u64 legacy_sse:1;
		__u64 avx:1;
		__u64 reserved:61;
	} bits;
};

union hv_register_value {
	struct hv_u128 reg128;
	__u64 reg64;
	__u32 reg32;
	__u16 reg16;
	__u8  reg8;
	union hv_x64_fp_register fp;
	union hv_x64_fp_control_status_register fp_control_status;
	union hv_x64_xmm_control_status_register xmm_control_status;
	struct hv_x64_segment_register segment;
	struct hv_x64_table_register table;
	union hv_explicit_suspend_register explicit_suspend;
	union hv_intercept_suspend_register intercept_suspend;
	union hv_dispatch_suspend_register dispatch_suspend;
	union hv_x64_interrupt_state_register interrupt_state;
	union hv_x64_pending_interruption_register pending_interruption;
	union hv_x64_pending_exception_event pending_exception_event;
	union hv_arm64_pending_synthetic_exception_event pending_synthetic_exception_event;
};

struct hv_register_assoc {
	__u32 name;                     /* HV_X64_REGISTER_* / HV_REGISTER_* */
	__u32 reserved1;
	__u64 reserved2;
	union hv_register_value value;
};

union hv_input_vtl {
	__u8 as_uint8;
	struct {
		__u8 target_vtl:4;
		__u8 use_target_vtl:1;
		__u8 reserved_z:3;
	} bits;
};

/* HVCALL_GET_VP_REGISTERS (rep): names in, hv_register_value out. */
struct hv_input_get_vp_registers {
	__u64 partition_id;
	__u32 vp_index;
	union hv_input_vtl input_vtl;
	__u8  rsvd_z8;
	__u16 rsvd_z16;
	__u32 names[];
};

/* HVCALL_SET_VP_REGISTERS (rep): name/value pairs in. */
struct hv_input_set_vp_registers {
	__u64 partition_id;
	__u32 vp_index;
	union hv_input_vtl input_vtl;
	__u8  rsvd_z8;
	__u16 rsvd_z16;
	struct hv_register_assoc elements[];
};

union hv_vp_register_page_interrupt_vectors {
	__u64 as_uint64;
	struct {
		__u8 vector_count;
		__u8 vector[7];
	};
};

/*
 * The VP register page (mmap offset MSHV_VP_MMAP_OFFSET_REGISTERS).
 *
 * Layout discrepancy (mshv_abi.md 5.2): upstream Linux's header has no
 * padding after rflags, putting xmm0 at 152 and interrupt_vectors at 680.
 * Microsoft's own definitions (OpenVMM HvX64RegisterPage, rust-vmm
 * hv-headers) have 8 reserved bytes there, so XMM is 16-byte aligned at 160
 * and everything after moves up by 8 (interrupt_vectors at 688).  We follow
 * the Microsoft layout, as the VMMs that run on real hardware do; the
 * layout test checks this struct against the rust-vmm variant of the facts.
 */
struct hv_vp_register_page {
	__u16 version;
	__u8  isvalid;
	__u8  rsvdz;
	__u32 dirty;            /* 1 << HV_X64_REGISTER_CLASS_* */
	union {
		struct {
			union {
				struct {
					__u64 rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi;
					__u64 r8, r9, r10, r11, r12, r13, r14, r15;
				};
				__u64 gp_registers[16];
			};
			__u64 rip;
			__u64 rflags;
		};
		__u64 registers[18];
	};
	__u8 reserved[8];
	union {
		struct {
			struct hv_u128 xmm0, xmm1, xmm2, xmm3, xmm4, xmm5;
		};
		struct hv_u128 xmm_registers[6];
	};
	union {
		struct {
			struct hv_x64_segment_register es, cs, ss, ds, fs, gs;
		};
		struct hv_x64_segment_register segment_registers[6];
	};
	/* Read-only through this page. */
	__u64 cr0;
	__u64 cr3;
	__u64 cr4;
	__u64 cr8;
	__u64 efer;
	__u64 dr7;
	union hv_x64_pending_interruption_register pending_interruption;
	union hv_x64_interrupt_state_register interrupt_state;
	__u64 instruction_emulation_hints;
	__u64 xfem;
	__u8  reserved1[0x100];
	union hv_vp_register_page_interrupt_vectors interrupt_vectors;
};

#endif /* MSHVSTACK_HYPERV_REGISTERS_H */
