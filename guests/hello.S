/*
 * hello: the built-in demo guest.  link-address: 0x200000  Entered in 64-bit long mode (the loader
 * sets up paging and a GDT) at _start.  Programs the 16550 UART, prints a
 * greeting, and reports its exit code through the debug-exit port.
 */
	.code64
	.set	COM1, 0x3f8
	.set	DEBUG_EXIT, 0xf4
	.globl	_start
_start:
	mov	$0x80000, %rsp
	/* 115200 8N1, FIFO on */
	mov	$COM1 + 3, %dx
	mov	$0x80, %al
	out	%al, %dx		/* DLAB */
	mov	$COM1, %dx
	mov	$1, %al
	out	%al, %dx		/* divisor low */
	mov	$COM1 + 1, %dx
	xor	%al, %al
	out	%al, %dx		/* divisor high */
	mov	$COM1 + 3, %dx
	mov	$0x03, %al
	out	%al, %dx		/* 8N1 */
	mov	$COM1 + 2, %dx
	mov	$0x07, %al
	out	%al, %dx		/* FIFO */

	lea	greeting(%rip), %rsi
1:	lodsb
	test	%al, %al
	jz	2f
	call	putc
	jmp	1b

2:	mov	$DEBUG_EXIT, %dx
	xor	%eax, %eax		/* exit code 0 */
	out	%al, %dx
	cli
3:	hlt
	jmp	3b

/* putc: wait for THR empty, then write %al */
putc:
	mov	%al, %bl
	mov	$COM1 + 5, %dx
4:	in	%dx, %al
	test	$0x20, %al
	jz	4b
	mov	$COM1, %dx
	mov	%bl, %al
	out	%al, %dx
	ret

greeting:
	.asciz	"Hello from an mshvstack guest: long mode, 16550 UART, debug-exit port.\n"
