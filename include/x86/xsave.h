/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: the x86 XSAVE area's legacy region and header (Intel SDM vol. 1,
 * 13.4.1 and 13.4.2; the 64-bit FXSAVE layout of 10.5.1), as MSHV_VP_STATE_XSAVE
 * carries them in the compacted format.
 */
#ifndef MSHVSTACK_X86_XSAVE_H
#define MSHVSTACK_X86_XSAVE_H

#include <linux/types.h>

#define X86_XSTATE_X87           (1ULL << 0)
#define X86_XSTATE_SSE           (1ULL << 1)
#define X86_XCOMP_BV_COMPACTED   (1ULL << 63)
#define X86_MXCSR_RESET          0x1F80
#define X86_MXCSR_MASK           0xFFFF
#define X86_FCW_RESET            0x0040

/* One x87 register slot: the 80-bit value, then padding. */
struct x86_fxsave_st {
	__u64 mantissa;
	__u16 sign_exponent;
	__u16 reserved[3];
};

struct x86_fxsave {
	__u16 fcw;
	__u16 fsw;
	__u8  ftw;                      /* abridged: bit i set = physical register i is not empty */
	__u8  reserved1;
	__u16 fop;
	__u64 fip;
	__u64 fdp;
	__u32 mxcsr;
	__u32 mxcsr_mask;
	struct x86_fxsave_st st[8];     /* ST(0)..ST(7) */
	__u8  xmm[16][16];
	__u8  reserved2[96];
};

struct x86_xsave_header {
	__u64 xstate_bv;
	__u64 xcomp_bv;
	__u64 reserved[6];
};

struct x86_xsave_area {
	struct x86_fxsave legacy;
	struct x86_xsave_header header;
};

#endif
