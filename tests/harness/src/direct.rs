//! Direct mode: each test runs `kiln` on this machine's `/dev/kvm`.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cpio;
use crate::guest_test::{GuestTest, HostPaths, HOST_SCRIPT_GRACE};
use crate::images::GuestImages;
use crate::outcome::GuestOutcome;
use crate::process::{shell_exit_code, wait_with_limit};
use crate::{test_dir_name, HarnessError};

/// Runs the tests one after another; `workdir` receives one directory per test.
pub fn run(
    tests: &[GuestTest],
    kiln: &Path,
    images: &GuestImages,
    workdir: &Path,
) -> Result<Vec<GuestOutcome>, HarnessError> {
    let initramfs = images.initramfs();
    let base = fs::read(&initramfs)
        .map_err(|error| HarnessError::Setup(format!("{}: {error}", initramfs.display())))?;
    let mut outcomes = Vec::with_capacity(tests.len());
    for (index, test) in tests.iter().enumerate() {
        let dir = workdir.join(test_dir_name(index, test.name()));
        // Short: a Unix socket path has room for 107 bytes, `_<port>` included.
        let vsock = workdir.join(format!("v{index:02}.sock"));
        let outcome = run_one(test, kiln, images, &base, &dir, &vsock).unwrap_or_else(|problem| {
            GuestOutcome {
                name: test.name().to_string(),
                time_limit: test.time_limit(),
                problem: Some(problem),
                logs: vec![dir.clone()],
                ..GuestOutcome::default()
            }
        });
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn run_one(
    test: &GuestTest,
    kiln: &Path,
    images: &GuestImages,
    base_initramfs: &[u8],
    dir: &Path,
    vsock: &Path,
) -> Result<GuestOutcome, String> {
    let io_error = |what: &str, error: std::io::Error| format!("{what}: {error}");
    fs::create_dir_all(dir).map_err(|e| io_error(&dir.display().to_string(), e))?;
    if let Some(problem) = test.problem() {
        return Err(problem);
    }
    let initrd = dir.join("initrd");
    fs::write(
        &initrd,
        cpio::concatenate(base_initramfs, &test.initramfs_addition()),
    )
    .map_err(|e| io_error(&initrd.display().to_string(), e))?;
    let kernel = images.kernel(test.kernel_variant());
    let stdout_path = dir.join("stdout");
    let stderr_path = dir.join("stderr");
    let stdout = File::create(&stdout_path).map_err(|e| io_error("stdout file", e))?;
    let stderr = File::create(&stderr_path).map_err(|e| io_error("stderr file", e))?;
    let mut host = match test.host_program() {
        Some(program) => Some(start_host(&program, dir, &stdout_path, vsock, images)?),
        None => None,
    };
    let mut command = match test.host_only_script_text() {
        Some(script) => {
            let work = dir.join("work");
            fs::create_dir_all(&work).map_err(|e| io_error("work directory", e))?;
            let paths = HostPaths {
                kiln: &kiln.to_string_lossy(),
                kernel: &kernel.to_string_lossy(),
                initrd: &initrd.to_string_lossy(),
                work: &work.to_string_lossy(),
                disks: test
                    .disks()
                    .iter()
                    .map(|disk| disk.path().to_string_lossy().into_owned())
                    .collect(),
            };
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(script)
                .envs(test.host_environment(&paths))
                .env("PATH", helper_search_path(images)?)
                .current_dir(&work)
                // Its own process group: whatever it starts goes when the test ends.
                .process_group(0);
            command
        }
        None => {
            let mut command = Command::new(kiln);
            command
                .args(test.kiln_arguments(&kernel.to_string_lossy(), &initrd.to_string_lossy()))
                .args(test.vsock_arguments(&vsock.to_string_lossy()));
            command
        }
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| io_error(&format!("cannot start {}", kiln.display()), e))?;
    let ended = wait_with_limit(&mut child, test.time_limit(), None)
        .map_err(|e| io_error("waiting for kiln", e))?;
    if test.host_only_script_text().is_some() {
        if let Ok(group) = i32::try_from(child.id()) {
            // SAFETY: kill(2) of the process group the script led; it only holds what the
            // script started. ESRCH (nothing left) is fine.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
    let host_exit_code = match &mut host {
        Some(host) => finish_host(host)?,
        None => None,
    };
    let read = |path: &Path| {
        fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    };
    Ok(GuestOutcome {
        name: test.name().to_string(),
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
        exit_code: ended.status.and_then(shell_exit_code),
        timed_out: ended.status.is_none(),
        time_limit: test.time_limit(),
        elapsed: ended.elapsed,
        problem: None,
        logs: vec![dir.to_path_buf()],
        host_output: if host.is_some() {
            read(&dir.join("host"))
        } else {
            String::new()
        },
        host_exit_code,
        notes: Vec::new(),
    })
}

/// Starts the host script in its own process group, output to `dir/host`.
fn start_host(
    program: &str,
    dir: &Path,
    console: &Path,
    vsock: &Path,
    images: &GuestImages,
) -> Result<Child, String> {
    let io_error = |what: &str, error: std::io::Error| format!("{what}: {error}");
    let script = dir.join("host.sh");
    fs::write(&script, program).map_err(|e| io_error("host script", e))?;
    let scratch = dir.join("host-tmp");
    fs::create_dir_all(&scratch).map_err(|e| io_error("host scratch directory", e))?;
    let output = File::create(dir.join("host")).map_err(|e| io_error("host output file", e))?;
    let errors = output
        .try_clone()
        .map_err(|e| io_error("host output file", e))?;
    let search = helper_search_path(images)?;
    Command::new("sh")
        .arg(&script)
        .current_dir(dir)
        .env("KILN_CONSOLE", console)
        .env("KILN_TEST_DIR", &scratch)
        .env("KILN_VSOCK", vsock)
        .env("PATH", search)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0)
        .spawn()
        .map_err(|e| io_error("cannot start the host script", e))
}

/// `PATH` with the `kiln-vsock` helper's directory first, for host scripts.
fn helper_search_path(images: &GuestImages) -> Result<std::ffi::OsString, String> {
    let helper_dir = images
        .vsock_helper()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut search: Vec<PathBuf> = vec![helper_dir];
    search.extend(std::env::split_paths(&path));
    std::env::join_paths(search).map_err(|e| format!("PATH: {e}"))
}

/// Waits for the host script at most [`HOST_SCRIPT_GRACE`], then kills its process group
/// (whatever it left running goes too); returns its exit status if it ended by itself.
fn finish_host(host: &mut Child) -> Result<Option<i32>, String> {
    let ended = wait_with_limit(host, HOST_SCRIPT_GRACE, None)
        .map_err(|e| format!("waiting for the host script: {e}"))?;
    if let Ok(group) = i32::try_from(host.id()) {
        // SAFETY: kill(2) of the process group our own child leads; it reaches nothing else.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    Ok(ended.status.and_then(shell_exit_code))
}
