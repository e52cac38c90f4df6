/*
 * iotest: exercises MMIO instruction forms and string port I/O.  link-address: 0x200000
 * Entered in long mode at _start.  The machine maps a scratch MMIO device at
 * 0xd0000000 (32 bytes, reads return what was written).
 */
	.code64
	.set	COM1, 0x3f8
	.set	DEBUG_EXIT, 0xf4
	.set	SCRATCH, 0xd0000000
	.globl	_start
_start:
	mov	$0x80000, %rsp
	mov	$SCRATCH, %rbx
	movl	$0x12345678, (%rbx)		/* mov imm32 -> mem */
	movw	$0xabcd, 4(%rbx)		/* 16-bit store */
	movb	$0x7f, 6(%rbx)			/* 8-bit store */
	mov	(%rbx), %eax			/* 32-bit load */
	cmp	$0x12345678, %eax
	jne	fail
	movzwl	4(%rbx), %ecx			/* zero-extending load */
	cmp	$0xabcd, %ecx
	jne	fail
	movsbq	6(%rbx), %rdx			/* sign-extending load */
	cmp	$0x7f, %rdx
	jne	fail
	orl	$0x80000000, (%rbx)		/* read-modify-write */
	mov	(%rbx), %eax
	cmp	$0x92345678, %eax
	jne	fail
	testl	$0x80000000, (%rbx)		/* test with memory */
	jz	fail
	mov	$0x1122334455667788, %rax
	mov	%rax, 8(%rbx)			/* 64-bit store */
	mov	8(%rbx), %r9
	cmp	%rax, %r9
	jne	fail

	lea	message(%rip), %rsi		/* rep outsb to the UART */
	mov	$message_end - message, %ecx
	mov	$COM1, %dx
	cld
	rep outsb

	mov	$DEBUG_EXIT, %dx
	xor	%eax, %eax
	out	%al, %dx
	hlt
fail:
	mov	$DEBUG_EXIT, %dx
	mov	$1, %eax
	out	%al, %dx
	hlt

message:
	.ascii	"MMIO forms and rep outsb OK\n"
message_end:
