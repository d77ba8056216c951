use std::path::PathBuf;
use std::sync::Mutex as StdMutex;

use event_manager::EventManager;
use vm_memory::GuestAddress;

use super::*;
use crate::event_loop::SharedSubscriber;

/// Records the KVM registrations instead of making them.
#[derive(Default)]
struct Recorder {
    irqfds: StdMutex<Vec<u32>>,
    ioevents: StdMutex<Vec<(u64, u32)>>,
    fail_irqfd: bool,
}

impl IrqAndIoEvents for Recorder {
    fn register_irqfd(&self, _event: &EventFd, irq: u32) -> Result<(), kvm_ioctls::Error> {
        if self.fail_irqfd {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        self.irqfds.lock().unwrap().push(irq);
        Ok(())
    }

    fn register_mmio_ioevent(
        &self,
        _event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.ioevents.lock().unwrap().push((addr, datamatch));
        Ok(())
    }
}

struct Images(Vec<PathBuf>);

impl Images {
    fn new(sizes: &[u64]) -> Self {
        Self(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| {
                    let path = std::env::temp_dir().join(format!(
                        "kiln-dm-{}-{i}-{:?}.img",
                        std::process::id(),
                        std::thread::current().id()
                    ));
                    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
                    path
                })
                .collect(),
        )
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn handle() -> (EventManager<SharedSubscriber>, EventLoopHandle) {
    let event_loop = EventManager::<SharedSubscriber>::new().unwrap();
    let handle = EventLoopHandle::new(event_loop.remote_endpoint());
    (event_loop, handle)
}

#[test]
fn disks_get_consecutive_slots_and_are_announced() {
    let images = Images::new(&[4096, 8192]);
    let disks = vec![DiskConfig::new(&images.0[0]), DiskConfig::new(&images.0[1])];
    let kvm = Recorder::default();
    let (_loop, handle) = handle();
    let mut manager = DeviceManager::new();
    let opened = DeviceManager::open_disks(&disks).unwrap();
    manager.add_disks(&kvm, &memory(), &handle, opened).unwrap();

    assert_eq!(
        manager.cmdline_args(),
        vec![
            "virtio_mmio.device=4K@0xd0001000:5".to_string(),
            "virtio_mmio.device=4K@0xd0002000:6".to_string(),
        ]
    );
    assert_eq!(
        manager.acpi_devices(),
        vec![(0xd000_1000, 0x1000, 5), (0xd000_2000, 0x1000, 6)]
    );
    assert_eq!(*kvm.irqfds.lock().unwrap(), vec![5, 6]);
    // One queue each: QueueNotify at offset 0x50, datamatch queue 0.
    assert_eq!(
        *kvm.ioevents.lock().unwrap(),
        vec![(0xd000_1050, 0), (0xd000_2050, 0)]
    );

    let mut bus = Bus::new();
    manager.attach(&mut bus).unwrap();
    assert_eq!(bus.len(), 2);
    // The guest finds a virtio block device of the right size at each window.
    let mut word = [0u8; 4];
    assert!(bus.read(0xd000_2000, &mut word));
    assert_eq!(&word, b"virt");
    assert!(bus.read(0xd000_2008, &mut word));
    assert_eq!(u32::from_le_bytes(word), 2);
    let mut capacity = [0u8; 8];
    assert!(bus.read(0xd000_2100, &mut capacity));
    assert_eq!(u64::from_le_bytes(capacity), 16);
}

#[test]
fn slots_run_out_after_the_last_irq_line() {
    let images = Images::new(&[512]);
    let kvm = Recorder::default();
    let (_loop, handle) = handle();
    let mut manager = DeviceManager::new();
    let memory = memory();
    let mut last = (0, 0);
    for _ in 0..VIRTIO_SLOTS {
        let disk = DiskImage::open(&images.0[0], true, None).unwrap();
        let (_, base, irq) = manager
            .add_virtio_device(
                &kvm,
                &memory,
                &handle,
                Block::new(disk).unwrap(),
                "disk".into(),
            )
            .unwrap();
        last = (base, irq);
    }
    assert_eq!(last, (0xd000_1000 + 18 * 0x1000, 23));
    let disk = DiskImage::open(&images.0[0], true, None).unwrap();
    let err = manager
        .add_virtio_device(
            &kvm,
            &memory,
            &handle,
            Block::new(disk).unwrap(),
            "one too many".into(),
        )
        .unwrap_err();
    assert!(matches!(err, DeviceError::NoSlot(_)), "{err}");
    assert!(err.to_string().contains("one too many"));
}

#[test]
fn disk_errors_name_the_disk() {
    let images = Images::new(&[4096, 1000]);
    let disks = vec![DiskConfig::new(&images.0[0]), DiskConfig::new(&images.0[1])];
    let err = DeviceManager::open_disks(&disks).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, DeviceError::Disk { index: 2, .. }),
        "{message}"
    );
    assert!(message.starts_with("disk 2: "), "{message}");
    assert!(
        message.contains("not a multiple of the 512-byte sector size"),
        "{message}"
    );
}

#[test]
fn kvm_refusals_are_reported() {
    let images = Images::new(&[4096]);
    let kvm = Recorder {
        fail_irqfd: true,
        ..Default::default()
    };
    let (_loop, handle) = handle();
    let opened = DeviceManager::open_disks(&[DiskConfig::new(&images.0[0])]).unwrap();
    let err = DeviceManager::new()
        .add_disks(&kvm, &memory(), &handle, opened)
        .unwrap_err();
    assert!(matches!(err, DeviceError::Kvm { .. }), "{err}");
    assert!(err.to_string().contains("irqfd"), "{err}");
}
