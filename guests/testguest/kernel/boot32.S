/* Multiboot (v1) header and the 32-bit entry QEMU's -kernel uses.
 *
 * QEMU refuses 64-bit ELF files through Multiboot unless the header carries the
 * a.out-kludge address fields (flag bit 16): then it loads the file bytes from
 * load_addr to load_end_addr, zeroes up to bss_end_addr and enters entry_addr in
 * 32-bit protected mode, paging off, EAX = magic, EBX = multiboot info.
 * This code runs only there (the snapvisor VMM enters start64 directly), so it
 * lives in its own section and is checked as 32-bit code by the tests. */

#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00010002 /* bit 1: memory map wanted, bit 16: address fields */

	.section .multiboot, "a"
	.balign 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header      /* header_addr */
	.long __image_start  /* load_addr */
	.long __load_end     /* load_end_addr */
	.long __image_end    /* bss_end_addr */
	.long mb_entry32     /* entry_addr */

	.section .boot32, "ax"
	.code32
	.globl mb_entry32
mb_entry32:
	cli
	mov %ebx, %esi  /* multiboot info, survives into long mode */

	/* Identity-map the first 1 GiB with 2 MiB pages: enough to reach the image and
	 * the multiboot info QEMU places right after it. kmain replaces these tables. */
	mov $boot_pd, %edi
	mov $0x83, %eax /* present, writable, 2 MiB */
	mov $512, %ecx
1:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x200000, %eax
	add $8, %edi
	loop 1b
	movl $boot_pd + 3, boot_pdpt
	movl $boot_pdpt + 3, boot_pml4

	mov %cr4, %eax
	or $0x20, %eax  /* PAE */
	mov %eax, %cr4
	mov $boot_pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx /* EFER */
	rdmsr
	or $0x100, %eax /* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax /* PG | PE */
	mov %eax, %cr0

	lgdt gdt_ptr
	ljmp $0x08, $mb_entry64

	/* Throw-away tables for the switch; page aligned, zeroed by the loader. */
	.section .bss
	.balign 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
