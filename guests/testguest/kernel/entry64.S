/* 64-bit entry points, the GDT, interrupt stubs and the drop to ring 3.
 * Ring 0 is emulated instruction by instruction on PVM hosts, so the stubs that
 * run often (timer, syscalls) are kept to a handful of instructions. */
#include "../include/tg.h"

	.code64
	.text

/* ELF e_entry. The VMM enters here on every vCPU (ELF note "snapvisor"), in long
 * mode with RSI = boot_params; its GDT, IDT, page tables and stack are not ours. */
	.globl start64
start64:
	xor %edi, %edi /* BOOT_LINUX64 */
	jmp start64_common

/* Arrival from boot32.S with our GDT loaded and ESI = multiboot info. */
	.globl mb_entry64
mb_entry64:
	mov $SEL_KDATA, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %esi, %esi /* the upper half is undefined after the mode switch */
	mov $1, %edi   /* BOOT_MULTIBOOT */

start64_common:
	cli
	cld
	mov %edi, %r12d
	mov %rsi, %r13
	mov $1, %eax
	cpuid
	shr $24, %ebx /* initial APIC id tells CPUs apart */
	cmp $MAX_CPUS, %ebx
	jae park
	lea 1(%rbx), %eax
	imul $KSTACK_SIZE, %rax
	lea kstacks(%rip), %rsp
	add %rax, %rsp
	mov %ebx, %edi
	mov %r12d, %esi
	mov %r13, %rdx
	call kmain
park:
	cli
	hlt
	jmp park

/* enter_user(rip, rsp, arg): iretq into ring 3 with interrupts on. */
	.globl enter_user
enter_user:
	mov %rdi, %rcx
	mov %rdx, %rdi
	pushq $SEL_UDATA
	pushq %rsi
	pushq $0x202 /* IF */
	pushq $SEL_UCODE
	pushq %rcx
	mov $SEL_UDATA, %ax
	mov %ax, %ds
	mov %ax, %es
	iretq

/* Exceptions and int3 syscalls: push a uniform frame (struct trap_frame). */
	.macro TRAP_NOERR vec
trap\vec:
	pushq $0
	pushq $\vec
	jmp trap_common
	.endm
	.macro TRAP_ERR vec
trap\vec:
	pushq $\vec
	jmp trap_common
	.endm

	TRAP_NOERR 0
	TRAP_NOERR 1
	TRAP_NOERR 2
	TRAP_NOERR 3
	TRAP_NOERR 4
	TRAP_NOERR 5
	TRAP_NOERR 6
	TRAP_NOERR 7
	TRAP_ERR 8
	TRAP_NOERR 9
	TRAP_ERR 10
	TRAP_ERR 11
	TRAP_ERR 12
	TRAP_ERR 13
	TRAP_ERR 14
	TRAP_NOERR 15
	TRAP_NOERR 16
	TRAP_ERR 17
	TRAP_NOERR 18
	TRAP_NOERR 19
	TRAP_NOERR 20
	TRAP_ERR 21
	TRAP_NOERR 22
	TRAP_NOERR 23
	TRAP_NOERR 24
	TRAP_NOERR 25
	TRAP_NOERR 26
	TRAP_NOERR 27
	TRAP_NOERR 28
	TRAP_ERR 29
	TRAP_ERR 30
	TRAP_NOERR 31

/* Only caller-saved registers: trap() is C and preserves the rest. */
trap_common:
	push %rax
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	mov %rsp, %rdi
	call trap
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rax
	add $16, %rsp
	iretq

/* IRQ0 (PIT, vector 32): count, EOI, and now and then a tick line. */
irq0:
	incq tg_ticks(%rip)
	push %rax
	mov $0x20, %al
	out %al, $0x20
	decq tick_countdown(%rip)
	jz 1f
	cmpb $0, net_up(%rip)
	jnz 1f
	pop %rax
	iretq
1:	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	call irq0_work /* the tick line (re-arms tick_countdown), the network poll */
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rax
	iretq

/* Other PIC lines are masked; what arrives anyway is spurious (no EOI). */
irq_ignore:
	iretq

/* LAPIC timer (vector 48) wakes an AP from SYS_WAIT; only an EOI is needed. */
lapic_timer:
	push %rax
	movabs $0xfee000b0, %rax
	movl $0, (%rax)
	pop %rax
	iretq

	.section .rodata
	.balign 8
/* Handler of each IDT vector, 0 = not present. */
	.globl isr_table
isr_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad trap\v
	.endr
	.quad irq0
	.rept 15
	.quad irq_ignore
	.endr
	.quad lapic_timer
	.rept 14
	.quad 0
	.endr
	.quad irq_ignore /* 63: LAPIC spurious vector */

	.data
	.balign 16
/* Flat segments; the TSS descriptors are filled in by tss_init(). */
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff /* 0x10 kernel data */
	.quad 0x00cff2000000ffff /* 0x18 user data, DPL 3 */
	.quad 0x00affa000000ffff /* 0x20 user code, 64-bit, DPL 3 */
	.fill MAX_CPUS * 2, 8, 0 /* 0x28.. TSS descriptors */
gdt_end:
	.balign 8
	.globl gdt_ptr
gdt_ptr: /* lgdt reads 6 bytes in 32-bit mode, 10 in 64-bit mode */
	.word gdt_end - gdt - 1
	.quad gdt

	.globl tick_countdown
tick_countdown:
	.quad 0x7fffffffffffffff /* tg.ticks=0: never */

	.bss
	.balign 4096
	.globl kstacks
kstacks:
	.skip MAX_CPUS * KSTACK_SIZE
