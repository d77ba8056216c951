//! Assembles the test guests (`asm/`) into `OUT_DIR` and tells the library where they are.

#[path = "src/assemble.rs"]
mod assemble;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let asm_dir = manifest_dir.join("asm");
    for source in assemble::sources(&asm_dir) {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    println!("cargo:rerun-if-env-changed=CC");
    match assemble::assemble_all(&asm_dir, &out_dir) {
        Ok(built) => {
            for (name, path) in built {
                let key = name.to_uppercase().replace('-', "_");
                println!("cargo:rustc-env=KILN_GUEST_ELF_{key}={}", path.display());
            }
        }
        Err(err) => {
            eprintln!("error: building the Kiln test guests failed: {err}");
            std::process::exit(1);
        }
    }
}
