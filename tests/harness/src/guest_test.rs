//! What one Linux-guest test is: a shell script for the guest and the way Kiln boots it.

use std::time::Duration;

use crate::cpio::CpioArchive;

/// Where the guest init looks for the test's script.
pub const GUEST_TEST_SCRIPT: &str = "kiln/test.sh";

/// How long a test may take when it does not say, guest boot included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// Which build of the guest kernel Kiln boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelVariant {
    /// The ELF `vmlinux`.
    #[default]
    Vmlinux,
    /// The compressed `bzImage`.
    BzImage,
}

impl KernelVariant {
    /// The file name the resource builder gives this variant.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Vmlinux => "vmlinux",
            Self::BzImage => "bzImage",
        }
    }
}

/// One guest boot: Kiln runs the test kernel with the base initramfs plus this test's script as
/// `/kiln/test.sh`, which the guest init runs and then powers the VM off.
#[derive(Debug, Clone)]
pub struct GuestTest {
    name: String,
    script: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    cmdline: Option<String>,
    kernel: KernelVariant,
    extra_args: Vec<String>,
    timeout: Duration,
}

impl GuestTest {
    /// A test whose guest runs `script` (busybox sh; `#!/bin/sh` is added when missing).
    pub fn new(name: impl Into<String>, script: impl Into<String>) -> Self {
        Self {
            script: Some(script.into()),
            ..Self::default_guest(name)
        }
    }

    /// A test that boots the default guest: no script, the init prints its banner and powers off.
    pub fn default_guest(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            script: None,
            cpus: None,
            memory_mib: None,
            cmdline: None,
            kernel: KernelVariant::default(),
            extra_args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Boots with `--cpus n`.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = Some(n);
        self
    }

    /// Boots with `--memory <mib>M`.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// Boots with `--cmdline <args>` (appended by Kiln to its default command line).
    pub fn cmdline(mut self, args: impl Into<String>) -> Self {
        self.cmdline = Some(args.into());
        self
    }

    /// Boots this build of the guest kernel.
    pub fn kernel(mut self, variant: KernelVariant) -> Self {
        self.kernel = variant;
        self
    }

    /// Adds arguments to `kiln run` after the ones the harness generates.
    pub fn kiln_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Kills the guest (and reports the test as timed out) after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The test's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest shell script, if the test has one.
    pub fn script(&self) -> Option<&str> {
        self.script.as_deref()
    }

    /// The vCPU count asked for, if any.
    pub fn cpu_count(&self) -> Option<u32> {
        self.cpus
    }

    /// The guest memory asked for in MiB, if any.
    pub fn memory(&self) -> Option<u64> {
        self.memory_mib
    }

    /// The kernel build this test boots.
    pub fn kernel_variant(&self) -> KernelVariant {
        self.kernel
    }

    /// How long the test may run.
    pub fn time_limit(&self) -> Duration {
        self.timeout
    }

    /// The `kiln` arguments for this test, given where the kernel and the initramfs are.
    pub fn kiln_arguments(&self, kernel: &str, initrd: &str) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--kernel".to_string(),
            kernel.to_string(),
            "--initrd".to_string(),
            initrd.to_string(),
        ];
        if let Some(cpus) = self.cpus {
            args.extend(["--cpus".to_string(), cpus.to_string()]);
        }
        if let Some(mib) = self.memory_mib {
            args.extend(["--memory".to_string(), format!("{mib}M")]);
        }
        if let Some(cmdline) = &self.cmdline {
            args.extend(["--cmdline".to_string(), cmdline.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The archive this test appends to the base initramfs (empty of files for the default guest).
    pub fn initramfs_addition(&self) -> Vec<u8> {
        let mut archive = CpioArchive::new();
        archive.directory("kiln", 0o755);
        if let Some(script) = &self.script {
            let mut text = String::new();
            if !script.starts_with("#!") {
                text.push_str("#!/bin/sh\n");
            }
            text.push_str(script);
            if !text.ends_with('\n') {
                text.push('\n');
            }
            archive.file(GUEST_TEST_SCRIPT, 0o755, text.as_bytes());
        }
        archive.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_follow_the_kiln_cli() {
        let test = GuestTest::new("t", "true")
            .cpus(4)
            .memory_mib(256)
            .cmdline("a=1 b")
            .kiln_args(["--console", "stdio"]);
        assert_eq!(
            test.kiln_arguments("/k", "/i"),
            [
                "run",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
                "--cpus",
                "4",
                "--memory",
                "256M",
                "--cmdline",
                "a=1 b",
                "--console",
                "stdio"
            ]
        );
    }

    #[test]
    fn script_gets_a_shebang_and_a_final_newline() {
        let archive = GuestTest::new("t", "echo hi").initramfs_addition();
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("kiln/test.sh\0"));
        assert!(text.contains("#!/bin/sh\necho hi\n"));
    }

    #[test]
    fn default_guest_has_no_script() {
        let archive = GuestTest::default_guest("t").initramfs_addition();
        assert!(!String::from_utf8_lossy(&archive).contains("test.sh"));
    }
}
