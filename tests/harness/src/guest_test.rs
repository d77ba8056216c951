//! What one Linux-guest test is: a shell script for the guest and the way Kiln boots it.

use std::path::PathBuf;
use std::time::Duration;

use crate::cpio::CpioArchive;
use crate::disk::{DiskOptions, GuestDisk};

/// Where the guest init looks for the test's script.
pub const GUEST_TEST_SCRIPT: &str = "kiln/test.sh";

/// How long a test may take when it does not say, guest boot included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a test's host script may go on after Kiln exited before it is killed.
pub const HOST_SCRIPT_GRACE: Duration = Duration::from_secs(15);

/// Shell functions every host script gets (see [`GuestTest::host_script`]).
pub const HOST_SCRIPT_PRELUDE: &str = r#"# Added by kiln-test-harness.
# wait_console TEXT [SECONDS]: waits (default 120 s) until the guest console shows TEXT.
wait_console() {
    tenths=$(( ${2:-120} * 10 ))
    until grep -q -F -- "$1" "$KILN_CONSOLE" 2>/dev/null; do
        tenths=$((tenths - 1))
        if [ "$tenths" -le 0 ]; then
            echo "host: gave up waiting for '$1' on the guest console"
            return 1
        fi
        sleep 0.1
    done
}
"#;

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
    disks: Vec<GuestDisk>,
    backing_files: Vec<PathBuf>,
    extra_args: Vec<String>,
    host_only_script: Option<String>,
    timeout: Duration,
    vsock_cid: Option<u64>,
    host_script: Option<String>,
}

/// Where a host-only script's inputs are (see [`GuestTest::host_only_script`]).
#[derive(Debug, Clone)]
pub struct HostPaths<'a> {
    /// The `kiln` binary.
    pub kiln: &'a str,
    /// The guest kernel.
    pub kernel: &'a str,
    /// The base initramfs plus the test's script.
    pub initrd: &'a str,
    /// A directory for the script's files (API socket, console log, config files).
    pub work: &'a str,
    /// Each disk as Kiln opens it: its host path (direct) or its device (vhost).
    pub disks: Vec<String>,
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
            disks: Vec::new(),
            backing_files: Vec::new(),
            extra_args: Vec::new(),
            host_only_script: None,
            timeout: DEFAULT_TIMEOUT,
            vsock_cid: None,
            host_script: None,
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

    /// Attaches the host image at `image` as the guest's next virtio disk (`vda`, `vdb`, ... in
    /// the order of the calls). The test creates the image before the suite runs and may read it
    /// back in its check, which runs after the whole batch: in both modes the file then holds
    /// what the guest wrote. Disks must be given this way, not as `--disk` in
    /// [`kiln_args`](Self::kiln_args), so that they also work inside the virtual KVM host.
    pub fn disk(mut self, image: impl Into<PathBuf>, options: DiskOptions) -> Self {
        self.disks.push(GuestDisk::new(image, options));
        self
    }

    /// Gives the guest a vsock device with context ID `cid`. Its Unix socket is in the test's
    /// own directory (on this machine, or inside the virtual KVM host); the host script finds it
    /// in `$KILN_VSOCK`, and guest connections to host port P go to `$KILN_VSOCK_P`.
    pub fn vsock(mut self, cid: u64) -> Self {
        self.vsock_cid = Some(cid);
        self
    }

    /// A shell script that runs on the host side while Kiln runs: here in direct mode, inside
    /// the virtual KVM host in vhost mode, started just before Kiln. It gets `$KILN_VSOCK` (the
    /// vsock socket, if any), `$KILN_CONSOLE` (the guest console as it is written),
    /// `$KILN_TEST_DIR` (a scratch directory), the `kiln-vsock` helper on `$PATH`, and
    /// `wait_console TEXT [SECONDS]` ([`HOST_SCRIPT_PRELUDE`]). Its output and exit status are
    /// in the outcome; it may run [`HOST_SCRIPT_GRACE`] after Kiln exited, then it is killed.
    pub fn host_script(mut self, script: impl Into<String>) -> Self {
        self.host_script = Some(script.into());
        self
    }

    /// The vsock device's context ID, if the test has one.
    pub fn vsock_cid(&self) -> Option<u64> {
        self.vsock_cid
    }

    /// The host script as it is run: the prelude, then the test's script.
    pub fn host_program(&self) -> Option<String> {
        self.host_script.as_ref().map(|script| {
            format!(
                "{HOST_SCRIPT_PRELUDE}{script}
"
            )
        })
    }

    /// The `--vsock` arguments for a socket at `uds`.
    pub fn vsock_arguments(&self, uds: &str) -> Vec<String> {
        match self.vsock_cid {
            Some(cid) => vec!["--vsock".to_string(), format!("cid={cid},uds={uds}")],
            None => Vec::new(),
        }
    }

    /// Makes the host image at `path` (absolute) available to Kiln at that same path: a file a
    /// disk refers to, such as a qcow2 backing file named by its absolute path. Direct mode
    /// needs nothing; in vhost mode it is a read-only drive of the virtual host, linked at
    /// `path` inside.
    pub fn backing_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.backing_files.push(path.into());
        self
    }

    /// The files added with [`GuestTest::backing_file`].
    pub fn backing_files(&self) -> &[PathBuf] {
        &self.backing_files
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

    /// Runs this shell script on the KVM host instead of `kiln run` (unlike
    /// [`GuestTest::host_script`], which runs beside it): it starts Kiln itself
    /// (for instance `$KILN --api-sock "$WORK/api.sock"` and `curl --unix-socket`), and its
    /// stdout, stderr and exit status are the test's outcome. In direct mode that host is this
    /// machine; in vhost mode it is the virtual KVM host, whose `PATH` then has `kiln` and
    /// `curl` (copied from this machine with their libraries); `kiln-vsock` is on `PATH` in both modes. The script gets `KILN`,
    /// `KERNEL`, `INITRD` (with the test's guest script), `WORK` (a directory of its own),
    /// `DISK_0`, `DISK_1`... (each disk as Kiln opens it: host path or `/dev/vdX`) and, when
    /// set, `CPUS`, `MEMORY_MIB` and `CMDLINE`. Everything in its process group is killed at
    /// the time limit.
    pub fn host_only_script(mut self, script: impl Into<String>) -> Self {
        self.host_only_script = Some(script.into());
        self
    }

    /// The host-only script, if the test has one.
    pub fn host_only_script_text(&self) -> Option<&str> {
        self.host_only_script.as_deref()
    }

    /// The environment of the host-only script.
    pub fn host_environment(&self, paths: &HostPaths) -> Vec<(String, String)> {
        let mut env = vec![
            ("KILN".to_string(), paths.kiln.to_string()),
            ("KERNEL".to_string(), paths.kernel.to_string()),
            ("INITRD".to_string(), paths.initrd.to_string()),
            ("WORK".to_string(), paths.work.to_string()),
        ];
        for (index, disk) in paths.disks.iter().enumerate() {
            env.push((format!("DISK_{index}"), disk.clone()));
        }
        if let Some(cpus) = self.cpus {
            env.push(("CPUS".to_string(), cpus.to_string()));
        }
        if let Some(mib) = self.memory_mib {
            env.push(("MEMORY_MIB".to_string(), mib.to_string()));
        }
        if let Some(cmdline) = &self.cmdline {
            env.push(("CMDLINE".to_string(), cmdline.clone()));
        }
        env
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

    /// The disks, in the order the guest sees them.
    pub fn disks(&self) -> &[GuestDisk] {
        &self.disks
    }

    /// Why the harness cannot run this test the same way in both modes, if it cannot: a disk
    /// that cannot be attached, or a `--disk` passed as a raw argument (it would name a host
    /// path that does not exist inside the virtual KVM host).
    pub fn problem(&self) -> Option<String> {
        if self.host_only_script.is_some() && !self.extra_args.is_empty() {
            return Some(
                "the test has a host-only script, which starts kiln itself: kiln_args are not used"
                    .to_string(),
            );
        }
        if self.host_only_script.is_some()
            && (self.host_script.is_some() || self.vsock_cid.is_some())
        {
            return Some(
                "the test has a host-only script, which starts kiln itself: a host script beside \
                 kiln and GuestTest::vsock are not used"
                    .to_string(),
            );
        }
        if self
            .extra_args
            .iter()
            .any(|arg| arg == "--vsock" || arg.starts_with("--vsock="))
        {
            return Some(
                "the test passes --vsock in kiln_args; use GuestTest::vsock so that the socket \
                 works in both modes"
                    .to_string(),
            );
        }
        if self
            .extra_args
            .iter()
            .any(|arg| arg == "--disk" || arg.starts_with("--disk="))
        {
            return Some(
                "the test passes --disk in kiln_args; attach disks with GuestTest::disk so that \
                 they work in both modes"
                    .to_string(),
            );
        }
        if let Some(path) = self.backing_files.iter().find(|path| !path.is_absolute()) {
            return Some(format!(
                "backing file {} must be given by an absolute path (it is linked at that path \
                 inside the virtual KVM host)",
                path.display()
            ));
        }
        self.disks.iter().find_map(GuestDisk::problem)
    }

    /// The `kiln` arguments for this test in direct mode, given where the kernel and the
    /// initramfs are: disks are attached by their host paths.
    pub fn kiln_arguments(&self, kernel: &str, initrd: &str) -> Vec<String> {
        self.kiln_arguments_with_disks(kernel, initrd, |_, disk| disk.direct_spec())
    }

    /// The `kiln` arguments for this test, with `disk_spec(index, disk)` giving the `--disk`
    /// value of each disk (vhost mode attaches them by their device inside the virtual host).
    pub fn kiln_arguments_with_disks(
        &self,
        kernel: &str,
        initrd: &str,
        disk_spec: impl Fn(usize, &GuestDisk) -> String,
    ) -> Vec<String> {
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
        for (index, disk) in self.disks.iter().enumerate() {
            args.extend(["--disk".to_string(), disk_spec(index, disk)]);
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
    fn disks_come_before_extra_arguments_in_order() {
        let test = GuestTest::new("t", "true")
            .disk("/images/a.img", DiskOptions::new().root())
            .disk("/images/b.img", DiskOptions::new().readonly().id("bee"))
            .kiln_args(["--console", "stdio"]);
        let args = test.kiln_arguments("/k", "/i");
        assert_eq!(
            args[5..],
            [
                "--disk",
                "path=/images/a.img,root",
                "--disk",
                "path=/images/b.img,readonly,id=bee",
                "--console",
                "stdio"
            ]
        );
        let devices = ["/dev/vdc", "/dev/vda"];
        let inside = test
            .kiln_arguments_with_disks("/k", "/i", |index, disk| disk.vhost_spec(devices[index]));
        assert_eq!(inside[6], "path=/dev/vdc,root,id=a.img");
        assert_eq!(inside[8], "path=/dev/vda,readonly,id=bee");
    }

    #[test]
    fn raw_disk_arguments_are_refused() {
        let test = GuestTest::new("t", "true").kiln_args(["--disk", "path=/x.img"]);
        assert!(test.problem().unwrap().contains("GuestTest::disk"));
        let missing = GuestTest::new("t", "true").disk("/nonexistent.img", DiskOptions::new());
        assert!(missing.problem().unwrap().contains("/nonexistent.img"));
        assert_eq!(GuestTest::new("t", "true").problem(), None);
    }

    #[test]
    fn script_gets_a_shebang_and_a_final_newline() {
        let archive = GuestTest::new("t", "echo hi").initramfs_addition();
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("kiln/test.sh\0"));
        assert!(text.contains("#!/bin/sh\necho hi\n"));
    }

    #[test]
    fn host_only_scripts_get_their_inputs_and_refuse_kiln_args() {
        let test = GuestTest::new("t", "true")
            .cpus(2)
            .cmdline("quiet")
            .host_only_script("$KILN --api-sock \"$WORK/s\"");
        let env = test.host_environment(&HostPaths {
            kiln: "/k/kiln",
            kernel: "/g/vmlinux",
            initrd: "/t/initrd",
            work: "/t/work",
            disks: vec!["/dev/vdb".into()],
        });
        let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("KILN"), Some("/k/kiln"));
        assert_eq!(get("INITRD"), Some("/t/initrd"));
        assert_eq!(get("DISK_0"), Some("/dev/vdb"));
        assert_eq!(get("CPUS"), Some("2"));
        assert_eq!(get("CMDLINE"), Some("quiet"));
        assert_eq!(get("MEMORY_MIB"), None);
        assert_eq!(test.problem(), None);
        let mixed = test.kiln_args(["--console", "none"]);
        assert!(mixed.problem().unwrap().contains("host-only script"));
        let beside = GuestTest::new("t", "true")
            .host_only_script("$KILN")
            .host_script("true");
        assert!(beside
            .problem()
            .unwrap()
            .contains("host script beside kiln"));
    }

    #[test]
    fn default_guest_has_no_script() {
        let archive = GuestTest::default_guest("t").initramfs_addition();
        assert!(!String::from_utf8_lossy(&archive).contains("test.sh"));
    }
}
