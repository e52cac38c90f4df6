/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * mshvstack's transcription of the /dev/mshv user ABI (Linux mshv_root, plus
 * the mshv_vtl requests that share the header), written from the compiled
 * facts in shared/reference/mshv_abi.md.  Every ioctl number is produced by
 * the kernel's own _IO/_IOW/_IOR/_IOWR macros so the compiler computes it.
 */
#ifndef MSHVSTACK_UAPI_LINUX_MSHV_H
#define MSHVSTACK_UAPI_LINUX_MSHV_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define MSHV_IOCTL                      0xB8

/* ---- capabilities (mshv_vtl MSHV_CHECK_EXTENSION) ---- */
#define MSHV_CAP_CORE_API_STABLE        0
#define MSHV_CAP_REGISTER_PAGE          1
#define MSHV_CAP_VTL_RETURN_ACTION      2
#define MSHV_CAP_DR6_SHARED             3

/* ---- partition creation: flag bit numbers (pass 1 << bit) ---- */
#define MSHV_PT_BIT_LAPIC                       0
#define MSHV_PT_BIT_X2APIC                      1
#define MSHV_PT_BIT_GPA_SUPER_PAGES             2
#define MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES      3   /* selects the v2 struct */
#define MSHV_PT_BIT_NESTED_VIRTUALIZATION       4
#define MSHV_PT_BIT_SMT_ENABLED_GUEST           5
#define MSHV_PT_BIT_COUNT                       6
#define MSHV_PT_FLAGS_MASK              ((1 << MSHV_PT_BIT_COUNT) - 1)

#define MSHV_PT_ISOLATION_NONE          0
#define MSHV_PT_ISOLATION_COUNT         1

#define MSHV_NUM_CPU_FEATURES_BANKS     2

/* Created partition: v1 argument. */
struct mshv_create_partition {
	__u64 pt_flags;
	__u64 pt_isolation;
};

/*
 * v2 argument, chosen by MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES with the same
 * ioctl number.  Upstream marks it __packed; the natural layout has no holes,
 * so it is declared plainly here (only the alignment differs: 8 vs 1).
 */
struct mshv_create_partition_v2 {
	__u64 pt_flags;
	__u64 pt_isolation;
	__u16 pt_num_cpu_fbanks;        /* must be MSHV_NUM_CPU_FEATURES_BANKS */
	__u8  pt_rsvd[6];               /* MBZ */
	__u64 pt_cpu_fbanks[MSHV_NUM_CPU_FEATURES_BANKS];  /* features to disable */
	__u64 pt_rsvd1[2];              /* MBZ */
	__u64 pt_disabled_xsave;        /* xsave features to disable */
};

/* ---- guest memory ---- */
#define MSHV_SET_MEM_BIT_WRITABLE       0
#define MSHV_SET_MEM_BIT_EXECUTABLE     1
#define MSHV_SET_MEM_BIT_UNMAP          2
#define MSHV_SET_MEM_BIT_COUNT          3
#define MSHV_SET_MEM_FLAGS_MASK         ((1 << MSHV_SET_MEM_BIT_COUNT) - 1)

#define MSHV_HV_PAGE_SIZE               0x1000

struct mshv_user_mem_region {
	__u64 size;             /* bytes, host-page aligned, non-zero */
	__u64 guest_pfn;
	__u64 userspace_addr;   /* host-page aligned */
	__u8  flags;            /* MSHV_SET_MEM_BIT_* */
	__u8  rsvd[7];          /* MBZ */
};

/* ---- irqfd ---- */
#define MSHV_IRQFD_BIT_DEASSIGN         0
#define MSHV_IRQFD_BIT_RESAMPLE         1
#define MSHV_IRQFD_BIT_COUNT            2
#define MSHV_IRQFD_FLAGS_MASK           ((1 << MSHV_IRQFD_BIT_COUNT) - 1)

struct mshv_user_irqfd {
	__s32 fd;
	__s32 resamplefd;
	__u32 gsi;
	__u32 flags;            /* MSHV_IRQFD_BIT_* */
};

/* ---- ioeventfd ---- */
#define MSHV_IOEVENTFD_BIT_DATAMATCH    0
#define MSHV_IOEVENTFD_BIT_PIO          1
#define MSHV_IOEVENTFD_BIT_DEASSIGN     2
#define MSHV_IOEVENTFD_BIT_COUNT        3
#define MSHV_IOEVENTFD_FLAGS_MASK       ((1 << MSHV_IOEVENTFD_BIT_COUNT) - 1)

struct mshv_user_ioeventfd {
	__u64 datamatch;
	__u64 addr;             /* MMIO guest physical address */
	__u32 len;              /* 0 (any), 1, 2, 4 or 8 */
	__s32 fd;
	__u32 flags;            /* MSHV_IOEVENTFD_BIT_* */
	__u8  rsvd[4];          /* MBZ */
};

/* ---- MSI routing ---- */
struct mshv_user_irq_entry {
	__u32 gsi;
	__u32 address_lo;
	__u32 address_hi;       /* must be 0 */
	__u32 data;
};

struct mshv_user_irq_table {
	__u32 nr;               /* <= 4096 */
	__u32 rsvd;             /* MBZ */
	struct mshv_user_irq_entry entries[];
};

/* ---- GPA access (dirty/accessed) bitmap ---- */
#define MSHV_GPAP_ACCESS_TYPE_ACCESSED  0
#define MSHV_GPAP_ACCESS_TYPE_DIRTY     1
#define MSHV_GPAP_ACCESS_TYPE_COUNT     2

#define MSHV_GPAP_ACCESS_OP_NOOP        0
#define MSHV_GPAP_ACCESS_OP_CLEAR       1
#define MSHV_GPAP_ACCESS_OP_SET         2
#define MSHV_GPAP_ACCESS_OP_COUNT       3

struct mshv_gpap_access_bitmap {
	__u8  access_type;      /* MSHV_GPAP_ACCESS_TYPE_* */
	__u8  access_op;        /* MSHV_GPAP_ACCESS_OP_* */
	__u8  rsvd[6];          /* MBZ */
	__u64 page_count;
	__u64 gpap_base;
	__u64 bitmap_ptr;       /* ceil(page_count / 8) bytes written here */
};

/* ---- hypercall passthrough ---- */
struct mshv_root_hvcall {
	__u16 code;             /* HVCALL_* on the driver's allowlist */
	__u16 reps;             /* in: rep count; out: reps completed */
	__u16 in_sz;            /* 8..4096, includes rep elements */
	__u16 out_sz;
	__u16 status;           /* in: MBZ; out: HV_STATUS_* */
	__u8  rsvd[6];          /* MBZ */
	__u64 in_ptr;
	__u64 out_ptr;
};

/* ---- VP execution ---- */
#define MSHV_RUN_VP_BUF_SZ              256
#define MSHV_MAX_RUN_MSG_SIZE           256

struct mshv_run_vp {
	__u8 msg_buf[MSHV_RUN_VP_BUF_SZ];  /* one struct hv_message */
};

#define MSHV_VP_MMAP_OFFSET_REGISTERS           0
#define MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE   1
#define MSHV_VP_MMAP_OFFSET_GHCB                2
#define MSHV_VP_MMAP_OFFSET_COUNT               3

#define MSHV_VP_STATE_LAPIC             0
#define MSHV_VP_STATE_XSAVE             1
#define MSHV_VP_STATE_SIMP              2
#define MSHV_VP_STATE_SIEFP             3
#define MSHV_VP_STATE_SYNTHETIC_TIMERS  4
#define MSHV_VP_STATE_COUNT             5

struct mshv_get_set_vp_state {
	__u8  type;             /* MSHV_VP_STATE_* */
	__u8  rsvd[3];          /* MBZ */
	__u32 buf_sz;           /* driver writes the required size here */
	__u64 buf_ptr;          /* page aligned */
};

struct mshv_create_vp {
	__u32 vp_index;
};

/* ---- /dev/mshv ---- */
#define MSHV_CREATE_PARTITION   _IOW(MSHV_IOCTL, 0x00, struct mshv_create_partition)
/* On /dev/mshv, partition fds and VP fds. */
#define MSHV_ROOT_HVCALL        _IOWR(MSHV_IOCTL, 0x07, struct mshv_root_hvcall)

/* ---- partition fd ---- */
#define MSHV_INITIALIZE_PARTITION       _IO(MSHV_IOCTL, 0x00)
#define MSHV_CREATE_VP                  _IOW(MSHV_IOCTL, 0x01, struct mshv_create_vp)
#define MSHV_SET_GUEST_MEMORY           _IOW(MSHV_IOCTL, 0x02, struct mshv_user_mem_region)
#define MSHV_IRQFD                      _IOW(MSHV_IOCTL, 0x03, struct mshv_user_irqfd)
#define MSHV_IOEVENTFD                  _IOW(MSHV_IOCTL, 0x04, struct mshv_user_ioeventfd)
#define MSHV_SET_MSI_ROUTING            _IOW(MSHV_IOCTL, 0x05, struct mshv_user_irq_table)
#define MSHV_GET_GPAP_ACCESS_BITMAP     _IOWR(MSHV_IOCTL, 0x06, struct mshv_gpap_access_bitmap)

/* ---- VP fd ---- */
#define MSHV_RUN_VP                     _IOR(MSHV_IOCTL, 0x00, struct mshv_run_vp)
#define MSHV_GET_VP_STATE               _IOWR(MSHV_IOCTL, 0x01, struct mshv_get_set_vp_state)
#define MSHV_SET_VP_STATE               _IOWR(MSHV_IOCTL, 0x02, struct mshv_get_set_vp_state)

/* =====================================================================
 * mshv_vtl (CONFIG_MSHV_VTL, a VTL2 paravisor driver) shares this header.
 * The root driver never accepts these; they are here so the whole header
 * is covered and numbers never collide unnoticed.
 * ===================================================================== */
struct mshv_vp_registers {
	__u32 count;
	__u32 reserved;
	__u64 regs_ptr;         /* struct hv_register_assoc[count] */
};

struct mshv_vtl_set_eventfd {
	__s32 fd;
	__u32 flag;
};

struct mshv_vtl_signal_event {
	__u32 connection_id;
	__u32 flag;
};

struct mshv_vtl_sint_post_msg {
	__u64 message_type;
	__u32 connection_id;
	__u32 payload_size;
	__u64 payload_ptr;
};

struct mshv_vtl_ram_disposition {
	__u64 start_pfn;
	__u64 last_pfn;
};

struct mshv_vtl_set_poll_file {
	__u32 cpu;
	__u32 fd;
};

struct mshv_vtl_hvcall_setup {
	__u64 bitmap_array_size;
	__u64 allow_bitmap_ptr;
};

struct mshv_vtl_hvcall {
	__u64 control;
	__u64 input_size;
	__u64 input_ptr;
	__u64 status;
	__u64 output_size;
	__u64 output_ptr;
};

struct mshv_sint_mask {
	__u8 mask;
	__u8 reserved[7];
};

#define MSHV_CHECK_EXTENSION            _IOW(MSHV_IOCTL, 0x00, __u32)
#define MSHV_CREATE_VTL                 _IOR(MSHV_IOCTL, 0x1D, char)
#define MSHV_ADD_VTL0_MEMORY            _IOW(MSHV_IOCTL, 0x21, struct mshv_vtl_ram_disposition)
#define MSHV_SET_POLL_FILE              _IOW(MSHV_IOCTL, 0x25, struct mshv_vtl_set_poll_file)
#define MSHV_RETURN_TO_LOWER_VTL        _IO(MSHV_IOCTL, 0x27)
#define MSHV_GET_VP_REGISTERS           _IOWR(MSHV_IOCTL, 0x05, struct mshv_vp_registers)
#define MSHV_SET_VP_REGISTERS           _IOW(MSHV_IOCTL, 0x06, struct mshv_vp_registers)
#define MSHV_SINT_SIGNAL_EVENT          _IOW(MSHV_IOCTL, 0x22, struct mshv_vtl_signal_event)
#define MSHV_SINT_POST_MESSAGE          _IOW(MSHV_IOCTL, 0x23, struct mshv_vtl_sint_post_msg)
#define MSHV_SINT_SET_EVENTFD           _IOW(MSHV_IOCTL, 0x24, struct mshv_vtl_set_eventfd)
#define MSHV_SINT_PAUSE_MESSAGE_STREAM  _IOW(MSHV_IOCTL, 0x25, struct mshv_sint_mask)
#define MSHV_HVCALL_SETUP               _IOW(MSHV_IOCTL, 0x1E, struct mshv_vtl_hvcall_setup)
#define MSHV_HVCALL                     _IOWR(MSHV_IOCTL, 0x1F, struct mshv_vtl_hvcall)

#endif /* MSHVSTACK_UAPI_LINUX_MSHV_H */
