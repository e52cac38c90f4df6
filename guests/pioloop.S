/*
 * pioloop: a port-I/O-heavy guest for benchmarks.  link-address: 0x200000
 * Writes 100000 bytes to port 0x80 (POST code port), then exits with 0.
 */
	.code64
	.globl	_start
_start:
	mov	$100000, %ecx
1:	mov	%cl, %al
	out	%al, $0x80
	dec	%ecx
	jnz	1b
	xor	%eax, %eax
	out	%al, $0xf4
	hlt
