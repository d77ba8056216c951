//! `kiln-init`: PID 1 of a `kiln run -- CMD` guest.
//!
//! Mounts the pseudo file systems, connects its vsock streams to the host, optionally mounts a
//! root disk and switches into it, runs the command with the streams as its stdio, reaps every
//! process, and reports how the command ended. Its own messages go to the console (the kernel
//! log's device, hidden unless `kiln run --verbose`); messages meant for the user go to the
//! command's stderr stream. It never exits: PID 1 exiting panics the kernel.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_init::{
    CommandSpec, Report, RootDisk, COPY_STAGING, HOST_CID, PORT_CONTROL, PORT_STDERR, PORT_STDIN,
    PORT_STDOUT, SPEC_PATH,
};

mod network;
mod pty;

/// Where a root disk is mounted before the switch.
const NEW_ROOT: &str = "/newroot";

/// Kiln's boot timer (Firecracker's address): writing 123 makes Kiln log the boot time.
const BOOT_TIMER_ADDRESS: libc::off_t = 0xd000_0000;

fn main() {
    mount_pseudo_file_systems();
    signal_boot_timer();
    let control = match vsock_connect(PORT_CONTROL) {
        Ok(stream) => fs::File::from(stream),
        Err(err) => halt(&format!("cannot connect to the host: {err}")),
    };
    let report = match run() {
        Ok(report) => report,
        Err(message) => Report::SetupFailed(message),
    };
    // SAFETY: sync(2) has no preconditions; it flushes a root disk's writes to the host.
    unsafe { libc::sync() };
    let mut writer = &control;
    if let Err(err) = writer.write_all(&report.encode()) {
        halt(&format!("cannot report to the host: {err}"));
    }
    // The host stops the VM once it has the report and every byte of output; the control
    // stream ends only if the host went away first.
    let mut rest = [0u8; 64];
    let mut reader = &control;
    while matches!(reader.read(&mut rest), Ok(n) if n > 0) {}
    halt("the host closed the control stream");
}

/// Runs the command and reaps until it ends; `Err` is a setup failure.
fn run() -> Result<Report, String> {
    let spec = fs::read(SPEC_PATH)
        .map_err(|err| format!("cannot read {SPEC_PATH}: {err}"))
        .and_then(|bytes| CommandSpec::decode(&bytes).map_err(|err| err.to_string()))?;
    let stdout = vsock_connect(PORT_STDOUT).map_err(|err| format!("stdout stream: {err}"))?;
    let stderr = vsock_connect(PORT_STDERR).map_err(|err| format!("stderr stream: {err}"))?;
    let stdin = if spec.stdin {
        Some(vsock_connect(PORT_STDIN).map_err(|err| format!("stdin stream: {err}"))?)
    } else {
        None
    };
    bring_up_loopback();
    let _ = set_hostname("kiln");
    for warning in network::configure(&spec.dhcp) {
        let _ = writeln!(stderr_file(&stderr), "kiln-init: {warning}");
    }
    // The name servers the lease gave, for the command's root.
    let resolv_conf = fs::read(network::RESOLV_CONF).ok();
    if let Some(root) = &spec.root {
        switch_root(root)?;
        if let (Some(text), false) = (&resolv_conf, spec.dhcp.is_empty()) {
            if let Err(err) = fs::write(network::RESOLV_CONF, text) {
                let _ = writeln!(
                    stderr_file(&stderr),
                    "kiln-init: cannot write {} in the root disk: {err}",
                    network::RESOLV_CONF
                );
            }
        }
    }
    let workdir = spec.workdir.clone().unwrap_or_else(|| OsString::from("/"));
    std::env::set_current_dir(&workdir).map_err(|err| {
        format!(
            "cannot enter the working directory {}: {err}",
            Path::new(&workdir).display()
        )
    })?;
    let report = spawn_and_wait(&spec, &stdout, &stderr, stdin)?;
    // Output ends here for the host even if a background process still holds the streams.
    for stream in [&stdout, &stderr] {
        // SAFETY: shutdown(2) on a socket this function owns.
        unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    }
    Ok(report)
}

fn spawn_and_wait(
    spec: &CommandSpec,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
    stdin: Option<OwnedFd>,
) -> Result<Report, String> {
    let clone = |fd: &OwnedFd| fd.try_clone().map_err(|err| format!("dup: {err}"));
    let program = &spec.argv[0];
    let mut command = Command::new(program);
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.environment());
    let mut terminal = None;
    let mut stdin = stdin;
    match spec.tty {
        Some((rows, columns)) => {
            let pty = pty::Pty::open(rows, columns)
                .map_err(|err| format!("cannot open a pseudo-terminal: {err}"))?;
            pty.attach(&mut command);
            terminal = Some(pty);
        }
        None => {
            command
                .stdout(Stdio::from(clone(stdout)?))
                .stderr(Stdio::from(clone(stderr)?))
                .stdin(match stdin.take() {
                    Some(fd) => Stdio::from(fd),
                    None => Stdio::null(),
                });
            // SAFETY: setsid(2) is async-signal-safe; the command leads its own session, as
            // under a shell.
            unsafe {
                command.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                })
            };
        }
    }
    let spawned = command.spawn();
    // The relays start after the fork, so the command never inherits their descriptors' users.
    let output_done = match (terminal, &spawned) {
        (Some(pty), Ok(_)) => Some(
            pty.relay(stdin, stdout)
                .map_err(|err| format!("cannot relay the terminal: {err}"))?,
        ),
        _ => None,
    };
    let report = wait_for(spawned, program, stderr)?;
    if let Some(done) = &output_done {
        pty::wait_for_output(done);
    }
    Ok(report)
}

/// Reaps every process until the spawned command ends (or reports why it did not start).
fn wait_for(
    spawned: io::Result<std::process::Child>,
    program: &std::ffi::OsStr,
    stderr: &OwnedFd,
) -> Result<Report, String> {
    let child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let (status, why) = match err.kind() {
                io::ErrorKind::NotFound if !program.as_bytes().contains(&b'/') => {
                    (127, "command not found".to_string())
                }
                io::ErrorKind::NotFound => (127, "No such file or directory".to_string()),
                io::ErrorKind::PermissionDenied => (126, "Permission denied".to_string()),
                _ => (126, err.to_string()),
            };
            let message = format!("kiln: {}: {why}\n", program.to_string_lossy());
            let _ = (&*stderr_file(stderr)).write_all(message.as_bytes());
            return Ok(Report::Exited(status));
        }
    };
    let pid = child.id() as libc::pid_t;
    // Reap everything (orphans are reparented to us) until the command itself ends.
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) with a valid out-pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            let status = std::process::ExitStatus::from_raw(status);
            return Ok(match (status.code(), status.signal()) {
                (Some(code), _) => Report::Exited(code as u8),
                (None, Some(signal)) => Report::Signaled(signal as u8),
                (None, None) => Report::SetupFailed(format!("unexpected wait status {status}")),
            });
        }
        if reaped < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(format!("waitpid: {}", io::Error::last_os_error()));
        }
    }
}

/// A `File` view of a stream, without taking ownership.
fn stderr_file(fd: &OwnedFd) -> std::mem::ManuallyDrop<fs::File> {
    // SAFETY: the descriptor stays open while `fd` lives; ManuallyDrop never closes it.
    std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(fd.as_raw_fd()) })
}

fn mount_pseudo_file_systems() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = fs::create_dir_all(target);
        if let Err(err) = mount(source, target, fstype, 0) {
            // devtmpfs may already be there (CONFIG_DEVTMPFS_MOUNT); nothing else should fail.
            if err.raw_os_error() != Some(libc::EBUSY) {
                console(&format!("cannot mount {target}: {err}"));
            }
        }
    }
    let _ = fs::create_dir_all("/dev/shm");
    let _ = mount("tmpfs", "/dev/shm", "tmpfs", 0);
    let _ = fs::create_dir_all("/dev/pts");
    let _ = mount("devpts", "/dev/pts", "devpts", 0);
    let _ = symlink("/proc/self/fd", "/dev/fd");
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let source = CString::new(source)?;
    let target = CString::new(target)?;
    let fstype = CString::new(fstype)?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves an existing mount (`MS_MOVE`).
fn move_mount(from: &str, to: &str) -> io::Result<()> {
    let from = CString::new(from)?;
    let to = CString::new(to)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let result = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts the root disk at [`NEW_ROOT`], copies the staged `--copy` files into it, moves the
/// pseudo file systems over and makes it `/`.
fn switch_root(root: &RootDisk) -> Result<(), String> {
    fs::create_dir_all(NEW_ROOT).map_err(|err| format!("mkdir {NEW_ROOT}: {err}"))?;
    let fstypes = block_file_systems();
    let mut last_error = String::from("no block file system in /proc/filesystems");
    let mut mounted = false;
    'types: for fstype in &fstypes {
        let attempts: &[libc::c_ulong] = if root.readonly {
            &[libc::MS_RDONLY]
        } else {
            &[0, libc::MS_RDONLY]
        };
        for &flags in attempts {
            match mount(&root.device, NEW_ROOT, fstype, flags) {
                Ok(()) => {
                    mounted = true;
                    break 'types;
                }
                Err(err) => last_error = format!("{fstype}: {err}"),
            }
        }
    }
    if !mounted {
        return Err(format!(
            "cannot mount the root disk {}: {last_error}",
            root.device
        ));
    }
    if Path::new(COPY_STAGING).exists() {
        copy_tree(Path::new(COPY_STAGING), Path::new(NEW_ROOT))
            .map_err(|err| format!("cannot copy the --copy files into the root disk: {err}"))?;
    }
    for target in ["/dev", "/proc", "/sys", "/tmp"] {
        let inside = format!("{NEW_ROOT}{target}");
        let _ = fs::create_dir_all(&inside);
        if let Err(err) = move_mount(target, &inside) {
            console(&format!("cannot move {target} into the root disk: {err}"));
        }
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|err| format!("chdir {NEW_ROOT}: {err}"))?;
    move_mount(".", "/").map_err(|err| format!("cannot move the root disk to /: {err}"))?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|err| format!("chdir /: {err}"))
}

/// The kernel's block-device file systems, ext4 first.
fn block_file_systems() -> Vec<String> {
    let text = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut types: Vec<String> = text
        .lines()
        .filter(|line| !line.starts_with("nodev"))
        .map(|line| line.trim().to_string())
        .filter(|name| !name.is_empty())
        .collect();
    types.sort_by_key(|name| name != "ext4");
    types
}

/// Copies `from`'s contents into `to` (directories merged, files and symlinks replaced).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if !target.is_dir() {
                fs::create_dir_all(&target)?;
            }
            let mode = entry.metadata()?.permissions().mode();
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            copy_tree(&source, &target)?;
        } else {
            let _ = fs::remove_file(&target);
            if kind.is_symlink() {
                symlink(fs::read_link(&source)?, &target)?;
            } else {
                fs::copy(&source, &target)?;
            }
        }
    }
    Ok(())
}

fn vsock_connect(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before the fields are set.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = HOST_CID;
    address.svm_port = port;
    // SAFETY: the address is a live, fully initialised sockaddr_vm of the size given.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Writes 123 to Kiln's boot timer through /dev/mem (`kiln: info: Guest-boot-time = ...`).
fn signal_boot_timer() {
    let Ok(mem) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
    else {
        return;
    };
    // SAFETY: maps one page of the boot timer's MMIO window; checked before use, unmapped after.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            BOOT_TIMER_ADDRESS,
        );
        if page == libc::MAP_FAILED {
            return;
        }
        std::ptr::write_volatile(page.cast::<u8>(), 123);
        libc::munmap(page, 4096);
    }
}

/// `ip link set lo up`; the kernel then gives it 127.0.0.1 and ::1 by itself.
fn bring_up_loopback() {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        console(&format!("no loopback: {}", io::Error::last_os_error()));
        return;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
    // SAFETY: SIOCSIFFLAGS reads a live ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } != 0 {
        console(&format!(
            "cannot bring up lo: {}",
            io::Error::last_os_error()
        ));
    }
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: a live buffer of the length given.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A line on the console (the kernel log's device).
fn console(message: &str) {
    eprintln!("kiln-init: {message}");
}

/// Logs why and powers the VM off; the host sees a guest that ended without reporting.
fn halt(message: &str) -> ! {
    console(message);
    // SAFETY: sync(2) and reboot(2) have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Only reached if reboot failed: PID 1 must never exit, so wait for the host's timeout.
    loop {
        // SAFETY: pause(2) has no preconditions.
        unsafe { libc::pause() };
    }
}
