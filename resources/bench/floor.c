/*
 * kvm-floor: the least a VMM must do to run Kiln's `exit` test guest, the floor Kiln's start-up
 * is measured against (resources/bench/run builds it with gcc; kiln-bench runs it interleaved
 * with Kiln; see docs/benchmarks.md).
 *
 *   kvm-floor GUEST.elf MEMORY_MIB
 *
 * Creates a VM with KVM's in-kernel irqchip, MEMORY_MIB of anonymous guest RAM, copies the
 * ELF's loadable segments to their physical addresses, and runs one vCPU entered in 64-bit long
 * mode at e_entry (identity-mapped first GiB, flat segments: Kiln's Linux-style entry). It
 * stops at the guest's first i8042 reset (0xfe written to port 0x64) and exits with status 0;
 * any other way the guest ends (halt, shutdown, an entry failure) is status 1. No PIT, no
 * devices, no threads, no huge-page advice, no cleanup beyond exit: process exit closes the
 * VM, as it does for every VMM.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GDT_ADDR 0x500
#define ZERO_PAGE_ADDR 0x7000
#define STACK_TOP 0x8ff0
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xa000
#define PD_ADDR 0xb000
#define I8042_COMMAND_PORT 0x64
#define I8042_RESET 0xfe
#define MAX_CPUID_ENTRIES 256

static void fail(const char *what)
{
    fprintf(stderr, "kvm-floor: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static int kvm_ioctl(int fd, unsigned long request, void *arg, const char *what)
{
    int result = ioctl(fd, request, arg);
    if (result < 0)
        fail(what);
    return result;
}

/* Copies the ELF's PT_LOAD segments into guest memory; returns the entry point. */
static uint64_t load_elf(const char *path, uint8_t *memory, uint64_t memory_size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        fail(path);
    uint8_t *image = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (image == MAP_FAILED)
        fail("map the guest image");
    close(fd);
    const Elf64_Ehdr *ehdr = (const Elf64_Ehdr *)image;
    errno = 0;
    if ((size_t)st.st_size < sizeof(*ehdr) || memcmp(ehdr->e_ident, ELFMAG, SELFMAG) != 0 ||
        ehdr->e_ident[EI_CLASS] != ELFCLASS64 ||
        ehdr->e_phoff + (uint64_t)ehdr->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size)
        fail("the guest is not an ELF64 image");
    const Elf64_Phdr *phdr = (const Elf64_Phdr *)(image + ehdr->e_phoff);
    for (int i = 0; i < ehdr->e_phnum; i++) {
        if (phdr[i].p_type != PT_LOAD)
            continue;
        if (phdr[i].p_offset + phdr[i].p_filesz > (uint64_t)st.st_size ||
            phdr[i].p_paddr + phdr[i].p_memsz > memory_size || phdr[i].p_filesz > phdr[i].p_memsz)
            fail("a guest segment does not fit");
        memcpy(memory + phdr[i].p_paddr, image + phdr[i].p_offset, phdr[i].p_filesz);
    }
    return ehdr->e_entry;
}

/* GDT (null, 64-bit code, data) and page tables mapping the first GiB with 2 MiB pages. */
static void write_long_mode_tables(uint8_t *memory)
{
    uint64_t gdt[3] = { 0, 0x00af9b000000ffffULL, 0x00cf93000000ffffULL };
    memcpy(memory + GDT_ADDR, gdt, sizeof(gdt));
    uint64_t *pml4 = (uint64_t *)(memory + PML4_ADDR);
    uint64_t *pdpt = (uint64_t *)(memory + PDPT_ADDR);
    uint64_t *pd = (uint64_t *)(memory + PD_ADDR);
    pml4[0] = PDPT_ADDR | 0x3;
    pdpt[0] = PD_ADDR | 0x3;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x83; /* present, writable, 2 MiB page */
}

static void set_long_mode(int vcpu, uint64_t entry)
{
    struct kvm_sregs sregs;
    kvm_ioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 0x8, .type = 11, .present = 1,
        .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
    };
    struct kvm_segment data = code;
    data.selector = 0x10;
    data.type = 3;
    data.db = 1;
    data.l = 0;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 1u << 5;                       /* PAE */
    sregs.cr0 = 0x80000001u | (1u << 4);       /* PG, PE, ET */
    sregs.efer = (1u << 8) | (1u << 10);       /* LME, LMA */
    kvm_ioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = entry;
    regs.rsp = STACK_TOP;
    regs.rsi = ZERO_PAGE_ADDR;
    regs.rflags = 0x2;
    kvm_ioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: kvm-floor GUEST.elf MEMORY_MIB\n");
        return 2;
    }
    uint64_t memory_size = strtoull(argv[2], NULL, 10) << 20;
    if (memory_size < (2u << 20)) {
        fprintf(stderr, "kvm-floor: memory must be at least 2 MiB\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        fail("/dev/kvm");
    int vm = kvm_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    kvm_ioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");

    uint8_t *memory = mmap(NULL, memory_size, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED)
        fail("map guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = memory_size,
        .userspace_addr = (uint64_t)(uintptr_t)memory,
    };
    kvm_ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
    uint64_t entry = load_elf(argv[1], memory, memory_size);
    write_long_mode_tables(memory);

    int vcpu = kvm_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = kvm_ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        fail("map kvm_run");
    /* KVM refuses long mode (EFER.LME) for a vCPU whose CPUID lacks it: hand it the host's. */
    struct {
        struct kvm_cpuid2 header;
        struct kvm_cpuid_entry2 entries[MAX_CPUID_ENTRIES];
    } cpuid = { .header.nent = MAX_CPUID_ENTRIES };
    kvm_ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid, "KVM_GET_SUPPORTED_CPUID");
    kvm_ioctl(vcpu, KVM_SET_CPUID2, &cpuid, "KVM_SET_CPUID2");
    set_long_mode(vcpu, entry);

    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            fail("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT &&
            run->io.port == I8042_COMMAND_PORT && run->io.size == 1 &&
            *((uint8_t *)run + run->io.data_offset) == I8042_RESET)
            return 0;
        if (run->exit_reason == KVM_EXIT_IO || run->exit_reason == KVM_EXIT_MMIO)
            continue; /* nothing decodes it */
        errno = 0;
        fprintf(stderr, "kvm-floor: the guest ended with KVM exit reason %u\n", run->exit_reason);
        return 1;
    }
}
