//! A writer of "newc" cpio archives, the format Linux unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; `TRAILER!!!` ends
//! the archive. Owners are root, times zero: the archive describes a guest, not the host.

use std::collections::BTreeSet;
use std::io::{self, Write};

const MODE_DIRECTORY: u32 = 0o040000;
const MODE_REGULAR: u32 = 0o100000;
const MODE_SYMLINK: u32 = 0o120000;
const MODE_CHAR_DEVICE: u32 = 0o020000;

/// Writes entries one by one to `out`; parent directories are added as needed.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    directories: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// An archive written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
            directories: BTreeSet::new(),
        }
    }

    /// A directory (and its parents).
    pub fn directory(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = normalize(path)?;
        if path.is_empty() || self.directories.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.directories.insert(path.clone());
        self.entry(&path, MODE_DIRECTORY | (mode & 0o7777), 2, 0, &[])
    }

    /// A regular file with `data` (its parents are created with mode 0755).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, MODE_REGULAR | (mode & 0o7777), 1, 0, data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, MODE_SYMLINK | 0o777, 1, 0, target)
    }

    /// A character device node (`major`, `minor`).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        let rdev = (major << 8) | minor;
        self.entry(&path, MODE_CHAR_DEVICE | (mode & 0o7777), 1, rdev, &[])
    }

    /// Writes the trailer and returns the output and the archive's length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry("TRAILER!!!", 0, 1, 0, &[])?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.directory(parent, 0o755)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name} is larger than 4 GiB")))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let (rdev_major, rdev_minor) = (rdev >> 8, rdev & 0xff);
        let header = format!(
            "070701{inode:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rdev_major:08x}{rdev_minor:08x}{:08x}{:08x}",
            0,
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..padding])
    }
}

/// `path` without leading `/` or `./`, refusing `..`, empty components and NUL.
fn normalize(path: &str) -> io::Result<String> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("'{path}' {why}"));
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("contains '..'")),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a newc archive: (name, mode, rdev major, data).
    fn parse(archive: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            let header = std::str::from_utf8(&archive[at..at + 110]).unwrap();
            assert_eq!(&header[..6], "070701");
            let field = |index: usize| {
                u32::from_str_radix(&header[6 + index * 8..14 + index * 8], 16).unwrap()
            };
            let (mode, size, major, name_len) = (field(1), field(6), field(9), field(11));
            let name_start = at + 110;
            let name =
                String::from_utf8(archive[name_start..name_start + name_len as usize - 1].to_vec())
                    .unwrap();
            assert_eq!(archive[name_start + name_len as usize - 1], 0);
            let data_start = (name_start + name_len as usize).next_multiple_of(4);
            let data = archive[data_start..data_start + size as usize].to_vec();
            at = (data_start + size as usize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len());
                return entries;
            }
            entries.push((name, mode, major, data));
        }
    }

    #[test]
    fn entries_parents_and_padding_follow_newc() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.file("/init", 0o755, b"\x7fELF!").unwrap();
        writer.file("a/b/c.txt", 0o644, b"hello").unwrap();
        writer.directory("a/b", 0o700).unwrap();
        writer.symlink("bin/sh", b"/bin/busybox").unwrap();
        writer.char_device("dev/console", 0o600, 5, 1).unwrap();
        let (archive, length) = writer.finish().unwrap();
        assert_eq!(length as usize, archive.len());
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive);
        let names: Vec<&str> = entries.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "a",
                "a/b",
                "a/b/c.txt",
                "bin",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[0].1, 0o100755);
        assert_eq!(entries[0].3, b"\x7fELF!");
        assert_eq!(entries[1].1, 0o040755);
        assert_eq!(entries[3].3, b"hello");
        assert_eq!(entries[5].1, 0o120777);
        assert_eq!(entries[5].3, b"/bin/busybox");
        assert_eq!((entries[7].1, entries[7].2), (0o020600, 5));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.file("../etc/passwd", 0o644, b"").is_err());
        assert!(writer.file("a\0b", 0o644, b"").is_err());
        assert!(writer.file("/a/./b", 0o644, b"x").is_ok());
    }
}
