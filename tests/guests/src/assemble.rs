//! Assembles and links the test guests from `asm/` with the system C compiler driver.
//!
//! Std-only on purpose: `build.rs` includes this file to build the guests into `OUT_DIR`, and
//! test crates that cannot depend on `kiln-test-guests` (the root package's `tests/direct_*.rs`)
//! include it to build the same guests into their own temporary directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of each guest (also its file stem) and the `KIND` it is assembled with.
pub const GUESTS: [(&str, u32); 8] = [
    ("exit", 0),
    ("hello", 1),
    ("pio-loop", 2),
    ("mmio-loop", 3),
    ("touch", 4),
    ("count", 5),
    ("rep-io", 6),
    ("flood", 7),
];

/// File stem of the QEMU shim that enters a guest the way Kiln does (tests only).
pub const DIRECT_ENTRY_SHIM: &str = "direct-entry-shim";

/// Why a guest could not be built.
#[derive(Debug)]
pub struct AssembleError(String);

impl fmt::Display for AssembleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AssembleError {}

/// The compiler driver: `$CC` if set, else `cc` (GNU as and ld do the work behind it).
pub fn compiler() -> String {
    std::env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string())
}

/// Every source file the guests are built from, for rebuild tracking.
pub fn sources(asm_dir: &Path) -> Vec<PathBuf> {
    [
        "guest.S",
        "guest.ld",
        "direct_entry_shim.S",
        "direct_entry_shim.ld",
    ]
    .iter()
    .map(|name| asm_dir.join(name))
    .collect()
}

/// Builds every guest and the direct-entry shim into `out_dir`; returns `(name, path)` pairs.
pub fn assemble_all(
    asm_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, AssembleError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|err| AssembleError(format!("cannot create {}: {err}", out_dir.display())))?;
    let mut built = Vec::new();
    for (name, kind) in GUESTS {
        let output = out_dir.join(format!("{name}.elf"));
        link(
            &asm_dir.join("guest.S"),
            &asm_dir.join("guest.ld"),
            &[format!("-DKIND={kind}")],
            &output,
        )?;
        built.push((name.to_string(), output));
    }
    let shim = out_dir.join(format!("{DIRECT_ENTRY_SHIM}.elf"));
    link(
        &asm_dir.join("direct_entry_shim.S"),
        &asm_dir.join("direct_entry_shim.ld"),
        &[],
        &shim,
    )?;
    built.push((DIRECT_ENTRY_SHIM.to_string(), shim));
    Ok(built)
}

/// Preprocesses, assembles and links one freestanding static ELF with `script`.
fn link(
    source: &Path,
    script: &Path,
    defines: &[String],
    output: &Path,
) -> Result<(), AssembleError> {
    let cc = compiler();
    let mut command = Command::new(&cc);
    command
        .args(["-m64", "-nostdlib", "-static", "-no-pie"])
        .arg(format!("-Wl,-T,{}", script.display()))
        .args([
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=0x1000",
            "-Wl,-z,noexecstack",
            "-Wl,--no-warn-rwx-segments",
        ])
        .args(defines)
        .arg("-o")
        .arg(output)
        .arg(source);
    let result = command.output().map_err(|err| {
        AssembleError(format!(
            "cannot run the C compiler driver `{cc}` to assemble the test guests \
             (install gcc/binutils or set CC): {err}"
        ))
    })?;
    if !result.status.success() {
        return Err(AssembleError(format!(
            "`{command:?}` failed ({}):\n{}{}",
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        )));
    }
    Ok(())
}
