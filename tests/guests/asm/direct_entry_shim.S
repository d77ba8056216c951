/*
 * Test-only shim that lets QEMU exercise a guest's Linux-style 64-bit entry the way Kiln
 * enters it, before Kiln exists or where /dev/kvm cannot run it.
 *
 * QEMU boots this shim through PVH (-kernel). Two generic loaders place the guest:
 *   -device loader,file=GUEST          (its PT_LOAD segments at their physical addresses)
 *   -device loader,file=GUEST,addr=GUEST_RAW_COPY,force-raw=on   (the file, for e_entry)
 * The shim then recreates Kiln's boot state from arch/src/x86_64/layout.rs:
 *   command line at 0x20000, boot_params at 0x7000 with hdr.cmd_line_ptr, GDT at 0x500
 *   (0x08 = 64-bit code, 0x10 = data), identity page tables at 0x9000/0xa000/0xb000 mapping
 *   the first 1 GiB with 2 MiB pages, long mode, RSP = 0x8ff0, RSI = 0x7000, interrupts off,
 * and jumps to the guest's e_entry.
 */

#define GDT_START 0x500
#define IDT_START 0x520
#define ZERO_PAGE_START 0x7000
#define ZERO_PAGE_CMD_LINE_PTR 0x228
#define BOOT_STACK_POINTER 0x8ff0
#define PML4_START 0x9000
#define PDPTE_START 0xa000
#define PDE_START 0xb000
#define CMDLINE_START 0x20000
#define CMDLINE_MAX_SIZE 2048
#define GUEST_RAW_COPY 0x3000000
#define ELF_ENTRY_OFFSET 24

#define PVH_START_MAGIC 0x336ec578
#define PVH_CMDLINE_PADDR 24

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100

    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 8
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .quad shim_start32

    .section .note.GNU-stack, "", @progbits

    .text
    .code32
    .globl shim_start32
shim_start32:
    cli
    /* Command line first: it may live anywhere low that the steps below overwrite. */
    xorl %esi, %esi
    cmpl $PVH_START_MAGIC, (%ebx)
    jne 1f
    movl PVH_CMDLINE_PADDR(%ebx), %esi
1:  movl $CMDLINE_START, %edi
    movl $(CMDLINE_MAX_SIZE - 1), %ecx
    testl %esi, %esi
    jz 3f
2:  movb (%esi), %al
    testb %al, %al
    jz 3f
    movb %al, (%edi)
    incl %esi
    incl %edi
    decl %ecx
    jnz 2b
3:  movb $0, (%edi)

    /* boot_params: zeroed, with the command line pointer. */
    movl $ZERO_PAGE_START, %edi
    movl $1024, %ecx
    xorl %eax, %eax
    cld
    rep stosl
    movl $CMDLINE_START, ZERO_PAGE_START + ZERO_PAGE_CMD_LINE_PTR

    /* GDT and an empty IDT where Kiln puts them. */
    movl $GDT_START, %edi
    movl $0, (%edi)
    movl $0, 4(%edi)
    movl $0x0000ffff, 8(%edi)
    movl $0x00af9b00, 12(%edi)      /* 0x08: 64-bit code */
    movl $0x0000ffff, 16(%edi)
    movl $0x00cf9300, 20(%edi)      /* 0x10: data */
    movl $0, IDT_START
    movl $0, IDT_START + 4

    /* Identity map of the first 1 GiB with 2 MiB pages. */
    movl $PML4_START, %edi
    movl $(3 * 1024), %ecx
    xorl %eax, %eax
    rep stosl
    movl $(PDPTE_START | 3), PML4_START
    movl $(PDE_START | 3), PDPTE_START
    movl $PDE_START, %edi
    movl $0x83, %eax
    movl $512, %ecx
4:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 4b

    /* Long mode on those tables. */
    movl $0x20, %eax                /* CR4.PAE */
    movl %eax, %cr4
    movl $PML4_START, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $0x80000011, %eax          /* CR0: PG | ET | PE */
    movl %eax, %cr0
    lgdt kiln_gdt_ptr
    lidt kiln_idt_ptr
    ljmp $0x08, $shim_start64

    .code64
shim_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $BOOT_STACK_POINTER, %esp
    movl $BOOT_STACK_POINTER, %ebp
    movl $ZERO_PAGE_START, %esi
    movq GUEST_RAW_COPY + ELF_ENTRY_OFFSET, %rax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %edi, %edi
    jmp *%rax

    .data
    .p2align 3
kiln_gdt_ptr:
    .word 3 * 8 - 1
    .quad GDT_START
kiln_idt_ptr:
    .word 7
    .quad IDT_START
