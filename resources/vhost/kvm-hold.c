/*
 * kvm-hold: keeps one empty KVM VM open for the life of Kiln's virtual KVM host.
 *
 * KVM enables virtualization on every CPU when the first VM is created and disables it, with an
 * IPI to every CPU, when the last one is destroyed. Under QEMU TCG that IPI was once lost when a
 * killed kiln destroyed its VM, and the virtual host hung in kvm_destroy_vm. With this VM open,
 * the count never drops to zero and that path never runs (Linux 6.12+ does the same by default).
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("kvm-hold: /dev/kvm");
		return 1;
	}
	if (ioctl(kvm, KVM_CREATE_VM, 0) < 0) {
		perror("kvm-hold: KVM_CREATE_VM");
		return 1;
	}
	for (;;)
		pause();
}
