//! Helpers shared by the unit tests.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// A KVM VM (with in-kernel irqchip) and one vCPU, or `None` with a printed note when
/// `/dev/kvm` cannot be opened. Any failure after opening `/dev/kvm` panics: a host with KVM
/// must run these tests for real.
pub(crate) fn kvm_vcpu() -> Option<(Kvm, VmFd, VcpuFd)> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(err) => {
            println!("NOTE: /dev/kvm cannot be opened ({err}); skipping this KVM test");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    Some((kvm, vm, vcpu))
}
