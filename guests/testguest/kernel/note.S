/* ELF note "snapvisor", type 1: asks the snapvisor VMM to start every vCPU at
 * e_entry in 64-bit mode (PVM hosts cannot run an INIT/SIPI real-mode trampoline).
 * The descriptor is a u32 version of this request. */
	.section .note.snapvisor, "a"
	.balign 4
	.long 2f - 1f /* namesz, with the NUL */
	.long 4f - 3f /* descsz */
	.long 1       /* type */
1:	.asciz "snapvisor"
2:	.balign 4
3:	.long 1
4:
