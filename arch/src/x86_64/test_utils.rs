//! Helpers shared by the unit tests.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// A KVM VM (with in-kernel irqchip) and one vCPU.
///
/// Panics with the reason when `/dev/kvm` cannot be opened: these tests check the boot state
/// against real KVM, and a test that cannot do that fails rather than passing unchecked.
pub(crate) fn kvm_vcpu() -> (Kvm, VmFd, VcpuFd) {
    let kvm = Kvm::new().unwrap_or_else(|err| {
        panic!(
            "/dev/kvm cannot be opened ({err}): this test checks the boot state against KVM; \
             run it on a host with KVM (VT-x, AMD-V or PVM) and read-write access to /dev/kvm"
        )
    });
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    (kvm, vm, vcpu)
}
