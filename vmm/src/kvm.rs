//! Opening /dev/kvm and telling the user plainly when it cannot work.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;
/// Present when the host's KVM is PVM (paravirtualized, no VT-x/AMD-V underneath).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";
/// Default device path.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Capabilities Kiln cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::ImmediateExit, "immediate exit"),
];

/// Why KVM cannot be used, in words that say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No device node.
    #[error(
        "{0} does not exist: KVM is not available on this host. Load the module \
         (`modprobe kvm_intel` or `modprobe kvm_amd`), enable VT-x/AMD-V in the firmware, \
         or on a cloud VM / CI runner enable nested virtualization"
    )]
    NotFound(String),
    /// No permission to open it.
    #[error(
        "permission denied opening {0}: add your user to the 'kvm' group \
         (`sudo usermod -aG kvm $USER`, then log in again) or install a udev rule such as \
         KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\""
    )]
    PermissionDenied(String),
    /// Opened but not usable (not a KVM device, or another error).
    #[error("cannot use {path}: {reason}")]
    Unusable {
        /// The device path.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Wrong API version.
    #[error("KVM API version {0} is not supported (Kiln needs {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability Kiln needs is missing.
    #[error("this host's KVM lacks capabilities Kiln needs: {0}")]
    MissingCapabilities(String),
}

/// An opened, checked KVM handle and what Kiln learnt about the host.
pub struct KvmHost {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// Most vCPUs one VM may have on this host.
    pub max_vcpus: usize,
    /// True on a PVM host, where unmodified guest kernels cannot boot.
    pub is_pvm: bool,
}

impl std::fmt::Debug for KvmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHost")
            .field("max_vcpus", &self.max_vcpus)
            .field("is_pvm", &self.is_pvm)
            .finish()
    }
}

/// True when the host's KVM is PVM.
pub fn host_is_pvm() -> bool {
    Path::new(PVM_MODULE).exists()
}

/// The warning printed on PVM hosts.
pub const PVM_WARNING: &str = "this host's /dev/kvm is PVM (kvm_pvm is loaded; there is no \
    VT-x/AMD-V underneath): only PVM-enabled guest kernels (CONFIG_PVM_GUEST) run at speed here; \
    an ordinary Linux kernel's ring-0 code is emulated instruction by instruction and will not \
    finish booting";

/// Opens and checks the KVM device at `path`.
pub fn open_kvm(path: &str) -> Result<KvmHost, KvmError> {
    let c_path = std::ffi::CString::new(path).map_err(|_| KvmError::Unusable {
        path: path.to_string(),
        reason: "path contains a NUL byte".into(),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|err| match err.errno() {
        libc::ENOENT => KvmError::NotFound(path.to_string()),
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied(path.to_string()),
        _ => KvmError::Unusable {
            path: path.to_string(),
            reason: err.to_string(),
        },
    })?;
    check_kvm(&kvm, path)?;
    let is_pvm = host_is_pvm();
    if is_pvm {
        log::warn!("{PVM_WARNING}");
    }
    let max_vcpus = kvm.get_max_vcpus();
    Ok(KvmHost {
        kvm,
        max_vcpus,
        is_pvm,
    })
}

fn check_kvm(kvm: &Kvm, path: &str) -> Result<(), KvmError> {
    // A non-KVM file answers the version ioctl with an error, which kvm-ioctls reports as -1.
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(KvmError::Unusable {
            path: path.to_string(),
            reason: "it is not a KVM device (the KVM_GET_API_VERSION ioctl failed)".into(),
        });
    }
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(KvmError::MissingCapabilities(missing.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_says_how_to_fix() {
        let err = open_kvm("/nonexistent/kvm").unwrap_err();
        assert!(matches!(err, KvmError::NotFound(_)));
        assert!(err.to_string().contains("modprobe kvm_intel"));
    }

    #[test]
    fn a_plain_file_is_not_kvm() {
        let path = std::env::temp_dir().join(format!("kiln-not-kvm-{}", std::process::id()));
        std::fs::write(&path, b"not a kvm device").unwrap();
        let result = open_kvm(path.to_str().unwrap());
        std::fs::remove_file(&path).unwrap();
        let err = result.unwrap_err();
        assert!(
            matches!(err, KvmError::Unusable { .. }),
            "unexpected error: {err}"
        );
        assert!(err.to_string().contains("not a KVM device"), "{err}");
    }

    #[test]
    fn permission_denied_says_how_to_fix() {
        let err = KvmError::PermissionDenied("/dev/kvm".into());
        assert!(err.to_string().contains("kvm' group"));
        assert!(err.to_string().contains("udev"));
    }

    #[test]
    fn real_device_opens() {
        // open_kvm's error says why and how to fix it.
        let host = open_kvm(KVM_DEVICE).unwrap_or_else(|err| {
            panic!("this test needs a usable {KVM_DEVICE}, which it checks: {err}")
        });
        assert!(host.max_vcpus >= 1);
        assert_eq!(host.is_pvm, host_is_pvm());
    }
}
