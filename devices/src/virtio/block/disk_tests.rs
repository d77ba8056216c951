//! Opening, locking and raw I/O of disk images.

use super::*;
use crate::virtio::block::test_utils::{guest_memory, TempImage};
use vm_memory::Bytes;

#[test]
fn opens_and_reports_geometry_and_id() {
    let image = TempImage::new("geometry", 4096);
    let disk = DiskImage::open(image.path(), false, Some("serial-1")).unwrap();
    assert_eq!(disk.sectors(), 8);
    assert_eq!(disk.size(), 4096);
    assert!(!disk.readonly());
    assert_eq!(&disk.id()[..9], b"serial-1\0");
    assert_eq!(disk.id()[8..], [0u8; 12]);
}

#[test]
fn default_id_is_the_file_name_cut_to_20_bytes() {
    assert_eq!(default_id(Path::new("/images/rootfs.ext4")), b"rootfs.ext4");
    assert_eq!(
        default_id(Path::new("/a/debian-bookworm-rootfs-amd64.ext4")),
        b"debian-bookworm-root"
    );
    let image = TempImage::new("derived-id", 512);
    let disk = DiskImage::open(image.path(), true, None).unwrap();
    let expected = default_id(image.path());
    assert_eq!(&disk.id()[..expected.len()], &expected[..]);
}

#[test]
fn refuses_bad_images_with_clear_errors() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("kiln-no-such-image-{}", std::process::id()));
    let err = DiskImage::open(&missing, false, None).unwrap_err();
    assert!(matches!(err, DiskError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("does not exist"));

    let err = DiskImage::open(&dir, true, None).unwrap_err();
    assert!(matches!(err, DiskError::Directory(_)), "{err}");

    // A character device.
    let err = DiskImage::open(Path::new("/dev/null"), true, None).unwrap_err();
    assert!(matches!(err, DiskError::NotRegularFile(_)), "{err}");

    let empty = TempImage::new("empty", 0);
    let err = DiskImage::open(empty.path(), false, None).unwrap_err();
    assert!(matches!(err, DiskError::Empty(_)), "{err}");

    let odd = TempImage::new("odd", 1000);
    let err = DiskImage::open(odd.path(), false, None).unwrap_err();
    assert!(
        matches!(err, DiskError::NotSectorMultiple { size: 1000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("1000 bytes"));

    let err = DiskImage::open(odd.path(), false, Some("a-serial-that-is-too-long")).unwrap_err();
    assert!(matches!(err, DiskError::IdTooLong(_)), "{err}");
}

/// A loop device over a temporary image, detached on drop.
struct LoopDevice {
    device: PathBuf,
    _image: TempImage,
}

impl LoopDevice {
    /// None when this host cannot attach one (not root, no loop driver, no losetup).
    fn attach(size: u64) -> Option<Self> {
        let image = TempImage::new("loop", size);
        let output = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image.path())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let device = String::from_utf8(output.stdout).ok()?.trim().to_string();
        Some(Self {
            device: PathBuf::from(device),
            _image: image,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .status();
    }
}

#[test]
fn block_devices_are_disks_too() {
    let Some(device) = LoopDevice::attach(3 * 512 * 1024) else {
        eprintln!("note: no loop device could be attached here; block device path not exercised");
        return;
    };
    let disk = DiskImage::open(&device.device, false, None).unwrap();
    assert_eq!(disk.sectors(), 3 * 1024);
    assert_eq!(&disk.id()[..4], b"loop");
    let memory = guest_memory();
    memory
        .write_slice(&[0x5c; 4096], GuestAddress(0x1000))
        .unwrap();
    disk.write_from_guest(&memory, GuestAddress(0x1000), 4096, 512 * 1024)
        .unwrap();
    disk.flush().unwrap();
    disk.read_to_guest(&memory, GuestAddress(0x4000), 4096, 512 * 1024)
        .unwrap();
    let mut back = [0u8; 4096];
    memory.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
    assert_eq!(back, [0x5c; 4096]);
    let err = DiskImage::open(&device.device, true, None).unwrap_err();
    assert!(matches!(err, DiskError::InUseReadWrite(_)), "{err}");
}

#[test]
fn read_write_locks_are_exclusive_and_read_only_locks_shared() {
    let image = TempImage::new("locks", 512);
    {
        let _writer = DiskImage::open(image.path(), false, None).unwrap();
        let err = DiskImage::open(image.path(), false, None).unwrap_err();
        assert!(matches!(err, DiskError::InUse(_)), "{err}");
        let err = DiskImage::open(image.path(), true, None).unwrap_err();
        assert!(matches!(err, DiskError::InUseReadWrite(_)), "{err}");
    }
    let _reader = DiskImage::open(image.path(), true, None).unwrap();
    let _second_reader = DiskImage::open(image.path(), true, None).unwrap();
    let err = DiskImage::open(image.path(), false, None).unwrap_err();
    assert!(matches!(err, DiskError::InUse(_)), "{err}");
}

#[test]
fn read_only_images_are_opened_read_only() {
    let image = TempImage::new("ro-open", 512);
    let disk = DiskImage::open(image.path(), true, None).unwrap();
    let memory = guest_memory();
    memory
        .write_slice(&[0xaa; 512], GuestAddress(0x1000))
        .unwrap();
    // The descriptor itself refuses writes: proof the file was not opened for writing.
    let err = disk
        .write_from_guest(&memory, GuestAddress(0x1000), 512, 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    assert_eq!(std::fs::read(image.path()).unwrap(), vec![0u8; 512]);
}

#[test]
fn data_moves_between_file_and_guest_memory() {
    let image = TempImage::new("rw", 2048);
    let disk = DiskImage::open(image.path(), false, None).unwrap();
    let memory = guest_memory();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    memory.write_slice(&pattern, GuestAddress(0x2000)).unwrap();
    disk.write_from_guest(&memory, GuestAddress(0x2000), 1024, 512)
        .unwrap();
    disk.flush().unwrap();
    let on_disk = std::fs::read(image.path()).unwrap();
    assert_eq!(&on_disk[512..1536], &pattern[..]);
    assert_eq!(&on_disk[..512], &[0u8; 512][..]);

    disk.read_to_guest(&memory, GuestAddress(0x8000), 1024, 512)
        .unwrap();
    let mut back = vec![0u8; 1024];
    memory.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn reading_past_the_end_of_a_shrunk_file_fails() {
    let image = TempImage::new("shrunk", 1024);
    let disk = DiskImage::open(image.path(), false, None).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(image.path())
        .unwrap()
        .set_len(512)
        .unwrap();
    let memory = guest_memory();
    let err = disk
        .read_to_guest(&memory, GuestAddress(0x1000), 1024, 0)
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn accesses_outside_guest_memory_fail_without_io() {
    let image = TempImage::new("outside", 1024);
    std::fs::write(image.path(), [0x5a; 1024]).unwrap();
    let disk = DiskImage::open(image.path(), false, None).unwrap();
    let memory = guest_memory();
    let end = crate::virtio::block::test_utils::MEMORY_SIZE;
    // Straddling the end of guest memory: the part inside is not touched either.
    let err = disk
        .read_to_guest(&memory, GuestAddress(end - 512), 1024, 0)
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let mut tail = [0xffu8; 512];
    memory
        .read_slice(&mut tail, GuestAddress(end - 512))
        .unwrap();
    assert_eq!(tail, [0u8; 512]);
    memory
        .write_slice(&[1u8; 512], GuestAddress(end - 512))
        .unwrap();
    assert!(disk
        .write_from_guest(&memory, GuestAddress(end - 512), 1024, 0)
        .is_err());
    assert!(disk
        .write_from_guest(&memory, GuestAddress(end + 4096), 512, 0)
        .is_err());
    assert_eq!(std::fs::read(image.path()).unwrap(), vec![0x5a; 1024]);
}
