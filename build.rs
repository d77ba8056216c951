//! Builds `kiln-init` (the guest init of `kiln run -- CMD`) as a static binary and leaves it in
//! `OUT_DIR`, where `src/run_command/initramfs.rs` embeds it with `include_bytes!`.
//!
//! Why embedded: a `kiln` binary then runs commands with nothing beside it (copied alone into
//! a container, a CI runner or the virtual KVM host), and the init always matches the protocol
//! of the `kiln` that carries it. Why static glibc (`+crt-static`): only the host's own Rust
//! target is installed here, not musl, and the guest has no libc of its own.
//!
//! The nested `cargo build` uses a target directory of its own inside `OUT_DIR` (so it never
//! waits for the outer build's lock) and the workspace's `Cargo.lock`, offline: `kiln-init`
//! needs only `libc`, which the outer build has already fetched.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target = env::var("TARGET").expect("set by cargo");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for input in ["init/src", "init/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={input}");
    }
    let target_dir = out_dir.join("kiln-init-build");
    let mut build = Command::new(cargo);
    build
        .current_dir(&manifest_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "-p",
            "kiln-init",
            "--bin",
            "kiln-init",
        ])
        .arg("--target")
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy's driver, coverage) are not for the init.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        build.env_remove(var);
    }
    build
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s");
    let status = build
        .status()
        .unwrap_or_else(|err| panic!("cannot run cargo to build kiln-init: {err}"));
    assert!(status.success(), "building kiln-init failed ({status})");
    let built = target_dir.join(&target).join("release").join("kiln-init");
    std::fs::copy(&built, out_dir.join("kiln-init"))
        .unwrap_or_else(|err| panic!("cannot copy {}: {err}", built.display()));
}
