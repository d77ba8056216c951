//! The state file: header, JSON payload, checksum; written atomically.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{SnapshotError, VmSnapshot, STATE_MAGIC, STATE_VERSION};

/// Magic, version, payload length.
const HEADER_LEN: usize = 8 + 4 + 8;
/// The CRC-32 at the end.
const CHECKSUM_LEN: usize = 4;
/// Far above any real state (a few KiB per vCPU and device); guards the allocation.
const MAX_PAYLOAD: u64 = 256 << 20;

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Serializes `snapshot` to `path`, atomically.
pub fn write_state_file(path: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(snapshot).map_err(|err| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode the state: {err}"),
    })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    write_atomically(path, "write the snapshot state file", |file| {
        file.write_all(&bytes)
    })
}

/// Reads and checks a state file: magic, version, length and checksum before the payload is
/// decoded.
pub fn read_state_file(path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_error("read the snapshot state file", path))?;
    decode_state(path, &bytes)
}

pub(super) fn decode_state(path: &Path, bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < STATE_MAGIC.len() || bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
        return Err(SnapshotError::NotAState(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(corrupt(format!("only {} bytes long", bytes.len())));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let payload_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let expected = (HEADER_LEN + CHECKSUM_LEN) as u64 + payload_len.min(MAX_PAYLOAD);
    if payload_len > MAX_PAYLOAD || bytes.len() as u64 != expected {
        return Err(corrupt(format!(
            "its header announces {payload_len} bytes of state, the file holds {} (truncated or \
             extended)",
            bytes.len().saturating_sub(HEADER_LEN + CHECKSUM_LEN)
        )));
    }
    let (content, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let stored = u32::from_le_bytes(checksum.try_into().expect("4 bytes"));
    let actual = crc32fast::hash(content);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        )));
    }
    serde_json::from_slice(&content[HEADER_LEN..])
        .map_err(|err| corrupt(format!("its state does not decode: {err}")))
}

/// Writes a file under a temporary name beside `path`, syncs it and renames it over `path`:
/// a reader sees the old file or the complete new one, never a part.
pub(super) fn write_atomically(
    path: &Path,
    what: &'static str,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let temporary = temporary_path(path);
    let result = (|| {
        let mut file = File::create(&temporary)?;
        fill(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(io_error(what, path))
}

fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.kiln-tmp-{}", std::process::id()))
}
