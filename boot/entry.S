/*
 * Vireo boot: the PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info), the
 * switch to long mode through early identity page tables, and the jump into Rust.
 *
 * Early page tables identity-map the first 4 GiB with 2 MiB pages so that the Rust bring-up can
 * read the PVH start info, the memory map and the ACPI tables; `mem::paging` replaces them with
 * tables built from the memory map (RAM write-back, MMIO uncached, the stack guard unmapped).
 */

/* XEN_ELFNOTE_PHYS32_ENTRY: QEMU's PVH loader reads the 32-bit entry point from this note. */
.section .note.pvh, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

.section .text.boot, "ax"
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* keep the hvm_start_info address across BSS clearing */

    /* Clear BSS (page tables and stacks live there, so before anything uses them). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx                   /* BSS is page aligned and a whole number of pages */
    xorl %eax, %eax
    rep stosl

    movl $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories; 2048 x 2 MiB identity pages. */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl $boot_pdpt, %edx
    movl $4, %ecx
1:  movl %eax, (%edx)
    addl $4096, %eax
    addl $8, %edx
    loop 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present | writable | 2 MiB page */
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax                  /* bits 32+ of the physical address */
    movl %eax, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    /* CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10). */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.LME (bit 8). */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr

    /* CR0: PG (31), WP (16), MP (1), PE (0); clear EM (2) and TS (3) so SSE works. */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 1) | (1 << 0)), %eax
    movl %eax, %cr0

    lgdt boot_gdt_pointer
    ljmp $0x08, $long_mode_entry

.code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs

    /* XSAVE, when CPUID.1:ECX[26] says so: CR4.OSXSAVE (18) and XCR0 = x87 | SSE. */
    movl %esi, %r12d
    movl $1, %eax
    cpuid
    btl $26, %ecx
    jnc 3f
    movq %cr4, %rax
    orq $(1 << 18), %rax
    movq %rax, %cr4
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl $0x3, %eax
    xsetbv
3:
    /* Rust runs on the kernel stack, whose lowest page `mem::paging` unmaps as a guard. */
    movabsq $kernel_stack_top, %rsp
    xorl %ebp, %ebp
    movl %r12d, %edi                /* argument: physical address of hvm_start_info */
    call kernel_entry
4:  cli
    hlt
    jmp 4b

.section .rodata
    .balign 16
boot_gdt:
    .quad 0                         /* null */
    .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF        /* 0x10: data */
boot_gdt_end:
boot_gdt_pointer:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .bss
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 4096
boot_stack_top:
.global kernel_stack_guard
kernel_stack_guard:
    .skip 4096
.global kernel_stack_bottom
kernel_stack_bottom:
    .skip 256 * 1024
.global kernel_stack_top
kernel_stack_top:
