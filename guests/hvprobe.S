/*
 * hvprobe: a long-mode guest that exercises the simulated hypervisor's
 * guest-facing interface.  Entered in 64-bit mode at 0x2000 with paging set
 * up by the host.  Reports each result with an OUT to a distinct port.
 */
	.code64
	.globl _start
_start:
	mov	$0x40000000, %eax	/* CPUID: hypervisor vendor leaf */
	cpuid
	mov	%ebx, %eax
	out	%eax, $0x10		/* "Micr" */

	mov	$0x40000000, %ecx	/* HV_X64_MSR_GUEST_OS_ID */
	mov	$1, %eax
	mov	$0x81000000, %edx
	wrmsr
	mov	$0x40000001, %ecx	/* HV_X64_MSR_HYPERCALL: page at 0x5000 */
	mov	$0x5001, %eax
	xor	%edx, %edx
	wrmsr
	mov	$0x40000002, %ecx	/* HV_X64_MSR_VP_INDEX */
	rdmsr
	out	%eax, $0x11

	mov	$0x5c, %ecx		/* HvPostMessage, input at 0x6000 */
	mov	$0x6000, %edx
	xor	%r8d, %r8d
	mov	$0x5000, %rax
	call	*%rax
	out	%eax, $0x12		/* status */

	mov	$0xd0000000, %rbx	/* MMIO: nothing mapped there */
	mov	(%rbx), %eax
	out	%eax, $0x13

	mov	$0x40000083, %ecx	/* SIMP at 0x7000 */
	mov	$0x7001, %eax
	xor	%edx, %edx
	wrmsr
	mov	$0x40000092, %ecx	/* SINT2 -> vector 0x50 */
	mov	$0x50, %eax
	wrmsr
	mov	$0x40000080, %ecx	/* SCONTROL enable */
	mov	$1, %eax
	wrmsr
	out	%al, $0x16		/* ready for a message */
	sti
	hlt
	cli
	out	%al, $0x14		/* back from the interrupt */
	hlt

	.balign 16
sint_handler:
	mov	0x7200, %eax		/* SINT2 slot: message type */
	out	%eax, $0x15
	movl	$0, 0x7200		/* free the slot */
	mov	$0x40000084, %ecx	/* EOM */
	xor	%eax, %eax
	xor	%edx, %edx
	wrmsr
	mov	$0x40000070, %ecx	/* HV_X64_MSR_EOI: end of interrupt */
	wrmsr
	iretq
