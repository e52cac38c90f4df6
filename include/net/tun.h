/* SPDX-License-Identifier: MIT */
/*
 * mshvstack: what attaching to a TAP device needs (Linux's <linux/if_tun.h>
 * UAPI): the TUNSETIFF ioctl and the part of struct ifreq it reads.
 */
#ifndef MSHVSTACK_NET_TUN_H
#define MSHVSTACK_NET_TUN_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define TUN_IFNAMSIZ    16
#define TUN_IFF_TAP     0x0002
#define TUN_IFF_NO_PI   0x1000
#define TUNSETIFF       _IOW('T', 202, int)

/* struct ifreq as TUNSETIFF reads it: the name, then the flags in its union (40 bytes in all). */
struct tun_ifreq {
	char  ifr_name[TUN_IFNAMSIZ];
	__s16 ifr_flags;
	__u8  ifr_pad[22];
};

#endif /* MSHVSTACK_NET_TUN_H */
