/* SPDX-License-Identifier: MIT */
/* mshvstack: the whole hypervisor ABI in one include. */
#ifndef MSHVSTACK_HYPERV_HYPERV_H
#define MSHVSTACK_HYPERV_HYPERV_H
#include "registers.h"
#include "message.h"
#include "partition.h"
#include "msr.h"
#include "features.h"
#include "hvcall.h"
#endif
