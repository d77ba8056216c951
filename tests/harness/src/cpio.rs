//! A writer for "newc" cpio archives, the format the Linux kernel unpacks into its initramfs.
//!
//! Tests add their files to the prebuilt base initramfs by appending a small archive of their own:
//! the kernel unpacks concatenated archives one after another, so the base is never rebuilt.

/// Mode bits of a directory.
const S_IFDIR: u32 = 0o040_000;
/// Mode bits of a regular file.
const S_IFREG: u32 = 0o100_000;

/// An uncompressed newc archive under construction.
#[derive(Debug, Default)]
pub struct CpioArchive {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (root-owned) with the given permission bits.
    pub fn directory(&mut self, path: &str, permissions: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (permissions & 0o7777), 2, &[]);
        self
    }

    /// Adds a regular file (root-owned) with the given permission bits and contents.
    pub fn file(&mut self, path: &str, permissions: u32, contents: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (permissions & 0o7777), 1, contents);
        self
    }

    /// Ends the archive with its trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[]);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, contents: &[u8]) {
        self.next_inode += 1;
        // Paths inside the archive are relative ("kiln/test.sh").
        let name = path.trim_start_matches('/');
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            // Test files are small; a 4 GiB file would not fit the format anyway.
            u32::try_from(contents.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(contents);
        self.pad();
    }

    /// Pads to the next multiple of 4 bytes, as newc requires after names and data.
    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }
}

/// Returns `base` followed by zero padding up to a multiple of 4 bytes and then `appended`: the
/// kernel only recognises an uncompressed archive at a 4-byte aligned offset.
pub fn concatenate(base: &[u8], appended: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(base.len() + 3 + appended.len());
    bytes.extend_from_slice(base);
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes.extend_from_slice(appended);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        let text = std::str::from_utf8(&header[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    #[test]
    fn file_entry_has_newc_layout() {
        let mut archive = CpioArchive::new();
        archive.file("/kiln/test.sh", 0o755, b"echo hi\n");
        let bytes = archive.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(field(&bytes, 1), 0o100_755);
        assert_eq!(field(&bytes, 6), 8);
        assert_eq!(field(&bytes, 11), "kiln/test.sh".len() as u32 + 1);
        // 110-byte header + 13-byte name = 123, padded to 124; data follows.
        assert_eq!(&bytes[110..123], b"kiln/test.sh\0");
        assert_eq!(&bytes[124..132], b"echo hi\n");
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn archive_ends_with_trailer() {
        let bytes = CpioArchive::new().finish();
        assert_eq!(&bytes[110..121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn gnu_cpio_reads_our_archive() {
        let mut archive = CpioArchive::new();
        archive
            .directory("kiln", 0o755)
            .file("kiln/test.sh", 0o755, b"#!/bin/sh\necho hi\n");
        let bytes = archive.finish();
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            // cpio is installed by the resource scripts; without it the layout tests above
            // still cover the format.
            eprintln!("cpio not installed; skipping the cross-check with GNU cpio");
            return;
        };
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "kiln\nkiln/test.sh\n"
        );
    }

    #[test]
    fn concatenation_aligns_the_second_archive() {
        let joined = concatenate(b"12345", b"070701");
        assert_eq!(joined, [&b"12345\0\0\0"[..], b"070701"].concat());
    }
}
