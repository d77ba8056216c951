/*
 * Kiln micro test guests: one tiny x86-64 ELF per KIND (chosen with -DKIND=n by build.rs).
 *
 * Two ways in, one common 64-bit path:
 *   - e_entry (_start64): Linux-style 64-bit entry as Kiln does it: long mode, paging on with
 *     the first 1 GiB identity-mapped, RSI = boot_params ("zero page").
 *   - the PVH note (pvh_start32): 32-bit protected mode, paging off, EBX = hvm_start_info,
 *     as QEMU's -kernel does it. The stub switches to long mode on the guest's own tables.
 *
 * Ring 0 sets up (GDT + TSS, a 32-entry IDT, its own user-accessible page tables) and drops
 * to ring 3, which parses the command line and runs the memory-bound loops (`mmio-loop`,
 * `touch`): on a PVM host ring-0 code is emulated (~0.7 M instr/s) while ring-3 code runs
 * natively. Ring 3 then returns to ring 0 with a `ud2` at a known address (PVM turns `int n`
 * in guest ring 3 into #UD, so an exception is the one way back that works everywhere) for
 * all port I/O: PVM does not honour IOPL for guest ring 3 (an `in` there raises #GP), so the
 * serial output and the `pio-loop` (unrolled 16 times to keep the emulated loop overhead
 * small) run in ring 0.
 *
 * Parameters come from the kernel command line ("n=1000 m=64 port=0x80 addr=0xd0100000";
 * "hold=1" makes the guest halt for good, interrupts off, instead of ending the VM, so that
 * many VMs can be kept running at once).
 *
 * Ending the VM, first that works wins: an i8042 reset (0xfe to port 0x64: Kiln, QEMU q35),
 * an ACPI GED poweroff (0x34 to MMIO 0xfea00200: QEMU microvm, which has no i8042; QEMU stops
 * the vCPU a little later, so the guest spins a while), then a triple fault.
 *
 * Output on COM1: `hello` prints KILN-GUEST-HELLO; `flood` prints "KILN-GUEST-FLOOD <i>" for
 * i = 1..=n as fast as the UART takes it (n = 2^64-1 floods for good); the loop kinds print
 * "KILN-GUEST-DONE n=<n> m=<m>" when they finished, so a crash (which also ends in a reset)
 * is never mistaken for success. An unexpected exception prints KILN-GUEST-FAULT with the
 * vector, error code and RIP, writes the pvpanic port and ends the VM.
 */

#define KIND_EXIT 0
#define KIND_HELLO 1
#define KIND_PIO_LOOP 2
#define KIND_MMIO_LOOP 3
#define KIND_TOUCH 4
#define KIND_COUNT 5
#define KIND_REP_IO 6
#define KIND_FLOOD 7

#ifndef KIND
#error "build with -DKIND=<0..7>"
#endif

#define COM1_DATA 0x3f8
#define COM1_LSR (COM1_DATA + 5)
#define LSR_THR_EMPTY 0x20
#define I8042_COMMAND 0x64
#define I8042_CMD_RESET 0xfe
#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 1
/* QEMU microvm's ACPI GED sleep control register; SLP_EN | SLP_TYP 5 powers off. */
#define GED_SLEEP_CONTROL 0xfea00200
#define GED_POWEROFF 0x34

/* boot_params.hdr.cmd_line_ptr (Linux x86 boot protocol). */
#define ZERO_PAGE_CMD_LINE_PTR 0x228
/* struct hvm_start_info. */
#define PVH_START_MAGIC 0x336ec578
#define PVH_CMDLINE_PADDR 24

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SELECTOR 0x28
#define TSS_SIZE 104

/* Reserved bit 1 only: IF = 0, IOPL = 0 (PVM would not honour IOPL = 3 anyway). */
#define RFLAGS_USER 0x0002

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define CR4_SMEP (1 << 20)
#define CR4_SMAP (1 << 21)
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100

/* Vectors 0..31 report faults, except the #UD at user_return, which resumes ring 0. */
#define IDT_ENTRIES 32
#define VECTOR_UD 6
#define FAULT_STUB_SIZE 16
#define GATE_INTERRUPT_DPL0 0x8e
/* Iterations to wait for QEMU to act on the GED poweroff before the triple fault. */
#define POWEROFF_SPINS 0x10000

/* Page-table entry bits. */
#define PTE_PRESENT 0x1
#define PTE_WRITABLE 0x2
#define PTE_USER 0x4
#define PTE_HUGE 0x80
#define TABLE_FLAGS (PTE_PRESENT | PTE_WRITABLE | PTE_USER)

/* `touch` writes from 2 MiB up; the image must end below (checked by the linker script). */
#define TOUCH_START 0x200000
/* `count` keeps its counter here, where the host can read it (above the image, below 4 MiB). */
#define COUNT_ADDR 0x300000
/* Our tables map 4 GiB; touching stops below the 32-bit MMIO gap at 0xd0000000. */
#define TOUCH_MAX_MIB ((0xd0000000 - TOUCH_START) >> 20)

#define DEFAULT_N 1000
#define DEFAULT_M 16
#define DEFAULT_PORT 0x80
#define DEFAULT_MMIO_ADDR 0xd0100000
/* pio-loop writes this many times per loop iteration. */
#define PIO_UNROLL 16

/* ------------------------------------------------------------------------------------------ */
/* PVH entry note: QEMU reads an 8-byte descriptor, linux-loader the low 4 bytes.             */
/* ------------------------------------------------------------------------------------------ */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* n_namesz: "Xen\0" */
    .long 8                         /* n_descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .quad pvh_start32

    .section .note.GNU-stack, "", @progbits

    .text

/* ------------------------------------------------------------------------------------------ */
/* Linux-style 64-bit entry (Kiln).                                                           */
/* ------------------------------------------------------------------------------------------ */
    .code64
    .globl _start64
_start64:
    cli
#if KIND == KIND_EXIT
    /* Our tables first: the GED register lies above the 1 GiB Kiln maps. */
    leaq pml4(%rip), %rax
    movq %rax, %cr3
    jmp end_vm
#else
    movl ZERO_PAGE_CMD_LINE_PTR(%rsi), %eax
    movq %rax, cmdline_ptr(%rip)
    jmp common64
#endif

/* ------------------------------------------------------------------------------------------ */
/* PVH entry (QEMU): 32-bit protected mode, paging off, EBX = hvm_start_info.                 */
/* ------------------------------------------------------------------------------------------ */
    .code32
pvh_start32:
    cli
#if KIND == KIND_EXIT
    movb $I8042_CMD_RESET, %al
    outb %al, $I8042_COMMAND
    movb $GED_POWEROFF, GED_SLEEP_CONTROL
    movl $POWEROFF_SPINS, %ecx
2:  pause
    decl %ecx
    jnz 2b
    lidt null_idt_ptr
    int3
1:  hlt
    jmp 1b
#else
    xorl %eax, %eax
    cmpl $PVH_START_MAGIC, (%ebx)
    jne 1f
    movl PVH_CMDLINE_PADDR(%ebx), %eax
1:  movl %eax, cmdline_ptr

    movl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PE | CR0_PG), %eax
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $KERNEL_CS, $common64
#endif

/* ------------------------------------------------------------------------------------------ */
/* Common ring-0 setup, then ring 3.                                                          */
/* ------------------------------------------------------------------------------------------ */
    .code64
common64:
    lgdt gdt_ptr(%rip)
    movw $KERNEL_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq kernel_stack_top(%rip), %rsp
    pushq $KERNEL_CS
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    /* Fill in the TSS descriptor's base (the TSS holds RSP0 for faults taken in ring 3). */
    leaq tss(%rip), %rax
    leaq gdt_tss(%rip), %rdi
    movw %ax, 2(%rdi)
    shrq $16, %rax
    movb %al, 4(%rdi)
    movb %ah, 7(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movw $TSS_SELECTOR, %ax
    ltr %ax

    /* IDT: one reporter per exception vector. */
    leaq idt(%rip), %rdi
    leaq fault_stubs(%rip), %rax
    movl $IDT_ENTRIES, %ecx
    movb $GATE_INTERRUPT_DPL0, %dl
2:  call set_gate
    addq $16, %rdi
    addq $FAULT_STUB_SIZE, %rax
    decl %ecx
    jnz 2b
    lidt idt_ptr(%rip)

    /* Our own page tables: 4 GiB identity-mapped with 2 MiB user-accessible pages. */
    movq %cr4, %rax
    andq $~(CR4_SMEP | CR4_SMAP), %rax
    orq $CR4_PAE, %rax
    movq %rax, %cr4
    leaq pml4(%rip), %rax
    movq %rax, %cr3

    pushq $USER_DS
    leaq user_stack_top(%rip), %rax
    pushq %rax
    pushq $RFLAGS_USER
    pushq $USER_CS
    leaq user_main(%rip), %rax
    pushq %rax
    iretq

/* Writes the 64-bit interrupt gate at RDI for handler RAX with type/attributes DL. */
set_gate:
    movw %ax, (%rdi)
    movw $KERNEL_CS, 2(%rdi)
    movb $0, 4(%rdi)
    movb %dl, 5(%rdi)
    movq %rax, %r8
    shrq $16, %r8
    movw %r8w, 6(%rdi)
    shrq $16, %r8
    movl %r8d, 8(%rdi)
    movl $0, 12(%rdi)
    ret

/* One 16-byte stub per fault vector; each pushes a dummy error code where the CPU has none. */
    .p2align 4
fault_stubs:
    .set vector, 0
    .rept IDT_ENTRIES
    .p2align 4
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp fault_common
    .set vector, vector + 1
    .endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
fault_common:
#if KIND == KIND_COUNT
    /* The #UD at count_report: print the count and go back to ring 3 past the ud2. */
    cmpq $VECTOR_UD, (%rsp)
    jne 5f
    pushq %rax
    leaq count_report(%rip), %rax
    cmpq %rax, 24(%rsp)
    popq %rax
    jne 5f
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %r8
    leaq count_msg(%rip), %rsi
    call puts
    movl $COUNT_ADDR, %eax
    movq (%rax), %rax
    call put_dec
    movb $'\n', %al
    call putc
    popq %r8
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $2, 16(%rsp)
    addq $16, %rsp
    iretq
5:
#endif
    cmpq $VECTOR_UD, (%rsp)
    jne 1f
    leaq user_return(%rip), %rax
    cmpq %rax, 16(%rsp)
    je kernel_resume
1:
    leaq fault_msg(%rip), %rsi
    call puts
    movq (%rsp), %rax
    call put_hex
    leaq fault_error_msg(%rip), %rsi
    call puts
    movq 8(%rsp), %rax
    call put_hex
    leaq fault_rip_msg(%rip), %rsi
    call puts
    movq 16(%rsp), %rax
    call put_hex
    movb $'\n', %al
    call putc
    movb $PVPANIC_PANICKED, %al
    movw $PVPANIC_PORT, %dx
    outb %al, %dx
    /* fall through */

/* Ends the VM from ring 0 (with the guest's own page tables loaded). */
end_vm:
    movb $I8042_CMD_RESET, %al
    outb %al, $I8042_COMMAND
    movl $GED_SLEEP_CONTROL, %edi
    movb $GED_POWEROFF, (%rdi)
    movl $POWEROFF_SPINS, %ecx
2:  pause
    decl %ecx
    jnz 2b
    lidt null_idt_ptr(%rip)
    int3
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------------------------------ */
/* Ring 3: command line and the memory-bound workloads.                                       */
/* ------------------------------------------------------------------------------------------ */
user_main:
    call parse_cmdline

#if KIND == KIND_MMIO_LOOP
    movq param_n(%rip), %rcx
    movq param_addr(%rip), %rbx
    testq %rcx, %rcx
    jz 2f
1:  movl (%rbx), %eax
    decq %rcx
    jnz 1b
2:
#elif KIND == KIND_TOUCH
    movq param_m(%rip), %rcx
    cmpq $TOUCH_MAX_MIB, %rcx
    jbe 1f
    movq $TOUCH_MAX_MIB, %rcx
    movq %rcx, param_m(%rip)
1:  shlq $8, %rcx                   /* MiB -> 4 KiB pages */
    movl $TOUCH_START, %edi
    testq %rcx, %rcx
    jz 3f
2:  movb $1, (%rdi)
    addq $4096, %rdi
    decq %rcx
    jnz 2b
3:
#elif KIND == KIND_COUNT
    /* Counts to n in memory, checking after every step that memory and register agree: a
     * pause, resume or state restore that loses or corrupts either is caught (#UD -> fault). */
    /* With report=K, every 2^K steps a #UD at count_report makes ring 0 print the count. */
    movq param_report(%rip), %rcx
    movq $-1, %rdx
    testq %rcx, %rcx
    jz 3f
    movl $1, %edx
    shlq %cl, %rdx
    decq %rdx
3:  movq param_n(%rip), %rcx
    movl $COUNT_ADDR, %ebx
    xorl %eax, %eax
    movq %rax, (%rbx)
    testq %rcx, %rcx
    jz 2f
1:  incq %rax
    incq (%rbx)
    cmpq (%rbx), %rax
    jne count_mismatch
    testq %rdx, %rax
    jnz 4f
count_report:
    ud2
4:  decq %rcx
    jnz 1b
2:
#endif
user_return:
    ud2
#if KIND == KIND_COUNT
count_mismatch:
    ud2
#endif

/* ------------------------------------------------------------------------------------------ */
/* Ring 0 again (from the #UD at user_return): port I/O, the done line, the end.             */
/* ------------------------------------------------------------------------------------------ */
kernel_resume:
#if KIND == KIND_HELLO
    leaq hello_msg(%rip), %rsi
    call puts
#elif KIND == KIND_PIO_LOOP
    movq param_port(%rip), %rdx
    xorl %eax, %eax
    movq param_n(%rip), %rcx
    shrq $4, %rcx                   /* n / PIO_UNROLL (16) */
    jz 2f
1:  .rept PIO_UNROLL
    outb %al, %dx
    .endr
    decq %rcx
    jnz 1b
2:  movq param_n(%rip), %rcx
    andq $(PIO_UNROLL - 1), %rcx
    jz 4f
3:  outb %al, %dx
    decq %rcx
    jnz 3b
4:
#elif KIND == KIND_REP_IO
    /* String port I/O: KVM hands these to the VMM as one exit with a count, which must become
     * `count` single accesses. `rep outsb` writes the marker to COM1's data register... */
    leaq rep_msg(%rip), %rsi
    movq $rep_msg_end - rep_msg, %rcx
    movw $COM1_DATA, %dx
    cld
    rep outsb
    /* ...and `rep insb` reads COM1's line status register 4 times: each read must be an LSR
     * read (transmitter empty), not the next registers. */
    leaq rep_in_buffer(%rip), %rdi
    movq $4, %rcx
    movw $COM1_LSR, %dx
    rep insb
    leaq rep_in_ok_msg(%rip), %rsi
    leaq rep_in_buffer(%rip), %rdi
    movl $4, %ecx
5:  testb $LSR_THR_EMPTY, (%rdi)
    jnz 6f
    leaq rep_in_bad_msg(%rip), %rsi
6:  incq %rdi
    decl %ecx
    jnz 5b
    call puts
#elif KIND == KIND_FLOOD
    movl $1, %ebx                   /* line number; puts/putc/put_dec leave RBX alone */
1:  cmpq param_n(%rip), %rbx
    ja 2f
    leaq flood_msg(%rip), %rsi
    call puts
    movq %rbx, %rax
    call put_dec
    movb $'\n', %al
    call putc
    incq %rbx
    jnz 1b
2:
#endif

#if KIND != KIND_HELLO && KIND != KIND_REP_IO
    leaq done_msg(%rip), %rsi
    call puts
    movq param_n(%rip), %rax
    call put_dec
    leaq done_m_msg(%rip), %rsi
    call puts
    movq param_m(%rip), %rax
    call put_dec
    movb $'\n', %al
    call putc
#endif
    cmpq $0, param_hold(%rip)
    je end_vm
1:  cli
    hlt
    jmp 1b

/* Reads "n=", "m=", "port=", "addr=" and "hold=" (decimal or 0x-hex) from the command line. */
parse_cmdline:
    movq cmdline_ptr(%rip), %rsi
    testq %rsi, %rsi
    jz 9f
1:  movb (%rsi), %al                /* at a token start: skip blanks */
    testb %al, %al
    jz 9f
    cmpb $' ', %al
    jne 2f
    incq %rsi
    jmp 1b
2:  leaq key_n(%rip), %rdi
    leaq param_n(%rip), %rbx
    call parse_key
    leaq key_m(%rip), %rdi
    leaq param_m(%rip), %rbx
    call parse_key
    leaq key_port(%rip), %rdi
    leaq param_port(%rip), %rbx
    call parse_key
    leaq key_addr(%rip), %rdi
    leaq param_addr(%rip), %rbx
    call parse_key
    leaq key_hold(%rip), %rdi
    leaq param_hold(%rip), %rbx
    call parse_key
    leaq key_report(%rip), %rdi
    leaq param_report(%rip), %rbx
    call parse_key
3:  movb (%rsi), %al                /* skip the rest of the token */
    testb %al, %al
    jz 9f
    cmpb $' ', %al
    je 1b
    incq %rsi
    jmp 3b
9:  ret

/*
 * If the token at RSI starts with the NUL-terminated key at RDI, parses the number after it
 * into (RBX) and advances RSI past the digits; otherwise leaves RSI alone.
 */
parse_key:
    movq %rsi, %r9
1:  movb (%rdi), %al
    testb %al, %al
    jz 2f
    cmpb (%r9), %al
    jne 9f
    incq %rdi
    incq %r9
    jmp 1b
2:  movq %r9, %rsi
    call parse_number
    movq %rax, (%rbx)
9:  ret

/* Parses a decimal or 0x-prefixed hex number at RSI into RAX; RSI ends past its digits. */
parse_number:
    xorl %eax, %eax
    cmpb $'0', (%rsi)
    jne 5f
    movb 1(%rsi), %cl
    orb $0x20, %cl
    cmpb $'x', %cl
    jne 5f
    addq $2, %rsi
1:  movzbl (%rsi), %ecx
    leal -'0'(%rcx), %edx
    cmpl $9, %edx
    jbe 2f
    orl $0x20, %ecx
    leal -'a'(%rcx), %edx
    cmpl $5, %edx
    ja 9f
    addl $10, %edx
2:  shlq $4, %rax
    addq %rdx, %rax
    incq %rsi
    jmp 1b
5:  movzbl (%rsi), %ecx
    leal -'0'(%rcx), %edx
    cmpl $9, %edx
    ja 9f
    imulq $10, %rax
    addq %rdx, %rax
    incq %rsi
    jmp 5b
9:  ret

/* ------------------------------------------------------------------------------------------ */
/* COM1 output by polling (ring 0).                                                          */
/* ------------------------------------------------------------------------------------------ */

/* Writes the byte in AL; clobbers DX. */
putc:
    pushq %rax
    movw $COM1_LSR, %dx
1:  inb %dx, %al
    testb $LSR_THR_EMPTY, %al
    jz 1b
    popq %rax
    movw $COM1_DATA, %dx
    outb %al, %dx
    ret

/* Writes the NUL-terminated string at RSI; clobbers RAX, RDX, RSI. */
puts:
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    call putc
    incq %rsi
    jmp 1b
2:  ret

/* Writes RAX in hex ("0x..."); clobbers RAX, RCX, RDX, RSI, R8. */
put_hex:
    movq %rax, %r8
    leaq hex_prefix(%rip), %rsi
    call puts
    movl $60, %ecx
1:  movq %r8, %rax
    shrq %cl, %rax
    andl $0xf, %eax
    leaq hex_digits(%rip), %rsi
    movb (%rsi,%rax), %al
    call putc
    subl $4, %ecx
    jns 1b
    ret

/* Writes RAX in decimal; clobbers RAX, RCX, RDX, RSI, R8. */
put_dec:
    leaq dec_buffer_end(%rip), %rsi
    movq $10, %r8
1:  xorl %edx, %edx
    divq %r8
    addb $'0', %dl
    decq %rsi
    movb %dl, (%rsi)
    testq %rax, %rax
    jnz 1b
    jmp puts

/* ------------------------------------------------------------------------------------------ */
/* Read-only data.                                                                            */
/* ------------------------------------------------------------------------------------------ */
    .section .rodata
hello_msg:       .asciz "KILN-GUEST-HELLO\n"
rep_msg:         .ascii "KILN-GUEST-REP-OUTS\n"
rep_msg_end:
rep_in_ok_msg:   .asciz "KILN-GUEST-REP-INS-OK\n"
rep_in_bad_msg:  .asciz "KILN-GUEST-REP-INS-BAD\n"
flood_msg:       .asciz "KILN-GUEST-FLOOD "
done_msg:        .asciz "KILN-GUEST-DONE n="
done_m_msg:      .asciz " m="
fault_msg:       .asciz "KILN-GUEST-FAULT vector="
fault_error_msg: .asciz " error="
fault_rip_msg:   .asciz " rip="
hex_prefix:      .asciz "0x"
hex_digits:      .ascii "0123456789abcdef"
key_n:           .asciz "n="
key_m:           .asciz "m="
key_port:        .asciz "port="
key_addr:        .asciz "addr="
key_hold:        .asciz "hold="
key_report:      .asciz "report="
count_msg:       .asciz "KILN-GUEST-COUNT "

/* ------------------------------------------------------------------------------------------ */
/* Data (file-backed so it is valid whatever the loader does with .bss).                      */
/* ------------------------------------------------------------------------------------------ */
    .data
    .p2align 3
cmdline_ptr: .quad 0
param_n:     .quad DEFAULT_N
param_m:     .quad DEFAULT_M
param_port:  .quad DEFAULT_PORT
param_addr:  .quad DEFAULT_MMIO_ADDR
param_hold:  .quad 0
param_report: .quad 0
dec_buffer:  .fill 24, 1, 0
dec_buffer_end: .byte 0
rep_in_buffer: .fill 8, 1, 0

    .p2align 4
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: ring-0 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: ring-0 data */
    .quad 0x00cff2000000ffff        /* 0x18: ring-3 data */
    .quad 0x00affa000000ffff        /* 0x20: ring-3 64-bit code */
gdt_tss:                            /* 0x28: 64-bit TSS (base filled in at run time) */
    .word TSS_SIZE - 1, 0
    .byte 0, 0x89, 0, 0
    .long 0, 0
gdt_end:

    .p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word IDT_ENTRIES * 16 - 1
    .quad idt
null_idt_ptr:
    .word 0
    .quad 0

    .p2align 4
tss:
    .long 0
    .quad kernel_stack_top          /* RSP0 */
    .quad 0, 0                      /* RSP1, RSP2 */
    .quad 0
    .fill 7, 8, 0                   /* IST1..7 */
    .quad 0
    .word 0
    .word TSS_SIZE                  /* no I/O permission bitmap: ring 3 does no port I/O */

    .p2align 4
idt:
    .fill IDT_ENTRIES * 16, 1, 0

/* PML4 -> one PDPT -> four page directories of 2 MiB pages: 0..4 GiB, user-accessible. */
    .p2align 12
pml4:
    .quad pdpt + TABLE_FLAGS
    .fill 511, 8, 0
pdpt:
    .quad pd + TABLE_FLAGS
    .quad pd + 0x1000 + TABLE_FLAGS
    .quad pd + 0x2000 + TABLE_FLAGS
    .quad pd + 0x3000 + TABLE_FLAGS
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad page + TABLE_FLAGS + PTE_HUGE
    .set page, page + 0x200000
    .endr

/* ------------------------------------------------------------------------------------------ */
/* Stacks.                                                                                    */
/* ------------------------------------------------------------------------------------------ */
    .bss
    .p2align 12
kernel_stack:
    .skip 16384
kernel_stack_top:
user_stack:
    .skip 16384
user_stack_top:
