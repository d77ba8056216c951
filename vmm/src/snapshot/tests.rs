use std::os::unix::fs::MetadataExt;

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use kiln_devices::exit::ExitNotifier;
use kiln_devices::legacy::i8042::I8042Device;

use super::files::decode_state;
use super::*;
use crate::memory::create_guest_memory;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("kiln-snapshot-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vcpu() -> VcpuState {
    VcpuState {
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000,
            rax: 0x1234_5678_9abc_def0,
            ..Default::default()
        },
        sregs: Default::default(),
        fpu: kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        xsave: Some(Default::default()),
        xcrs: Some(Default::default()),
        debug_regs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            ecx: 0x8000_0001,
            ..Default::default()
        }],
        msrs: vec![kvm_msr_entry {
            index: 0x10,
            data: 42,
            ..Default::default()
        }],
    }
}

fn snapshot() -> VmSnapshot {
    VmSnapshot {
        kiln_version: "test".into(),
        snapshot_id: 7,
        created_unix_ms: 1,
        config: VmConfig::new("/vmlinux"),
        disks: vec![SavedDisk {
            config: DiskConfig::new("/disk.img"),
            size: 512,
            capacity: 512,
            modified_ns: 3,
        }],
        memory: vec![SavedRegion {
            guest_addr: 0,
            len: 1 << 20,
        }],
        memory_layers: vec![MemoryLayer {
            path: "/vm.mem".into(),
            snapshot_id: 7,
            pages: None,
        }],
        vcpus: vec![vcpu(), vcpu()],
        irqchip: SavedIrqchip {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: SerialSnapshot {
            registers: [1, 2, 3, 4, 5, 6, 7, 8, 9],
            fifo: b"in".to_vec(),
            pending_input: b"put".to_vec(),
        },
        i8042: I8042Device::new(ExitNotifier::new().unwrap()).snapshot(),
        virtio: Vec::new(),
    }
}

#[test]
fn the_state_file_round_trips() {
    let dir = Dir::new("round-trip");
    let path = dir.0.join("vm.state");
    write_state_file(&path, &snapshot()).unwrap();
    let back = read_state_file(&path).unwrap();
    assert_eq!(back.snapshot_id, 7);
    assert_eq!(back.config, VmConfig::new("/vmlinux"));
    assert_eq!(back.disks, snapshot().disks);
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs.rax, 0x1234_5678_9abc_def0);
    assert_eq!(back.vcpus[0].fpu.fcw, 0x37f);
    assert_eq!(back.vcpus[0].fpu.mxcsr, 0x1f80);
    assert_eq!(back.vcpus[0].msrs[0].data, 42);
    assert_eq!(back.vcpus[0].cpuid[0].ecx, 0x8000_0001);
    assert_eq!(back.serial, snapshot().serial);
    assert_eq!(back.i8042, snapshot().i8042);
    // Nothing is left under a temporary name.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn every_corruption_is_detected() {
    let dir = Dir::new("corrupt");
    let path = dir.0.join("vm.state");
    write_state_file(&path, &snapshot()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], expect: &str| {
        let err = decode_state(&path, bytes)
            .err()
            .expect("accepted")
            .to_string();
        assert!(err.contains(expect), "{expect}: {err}");
    };
    check(b"", "not a Kiln snapshot");
    check(b"KILNSNA", "not a Kiln snapshot");
    check(b"KILNSNAP", "corrupt");
    let mut version = good.clone();
    // An older format (version 1 had no i8042 state) and a newer one.
    for other in [1u32, STATE_VERSION + 1] {
        version[8..12].copy_from_slice(&other.to_le_bytes());
        check(&version, &format!("version {other} snapshot"));
    }
    check(&good[..good.len() - 1], "corrupt");
    let mut longer = good.clone();
    longer.push(0);
    check(&longer, "corrupt");
    let mut huge = good.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    check(&huge, "corrupt");
    // Every single-byte change in the payload or checksum is caught.
    for index in (20..good.len()).step_by(7) {
        let mut flipped = good.clone();
        flipped[index] ^= 0x01;
        check(&flipped, "checksum mismatch");
    }
    // A payload that decodes to something else is refused even with a right checksum.
    let mut foreign = Vec::new();
    let payload = br#"{"not":"a snapshot"}"#;
    foreign.extend_from_slice(&STATE_MAGIC);
    foreign.extend_from_slice(&STATE_VERSION.to_le_bytes());
    foreign.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    foreign.extend_from_slice(payload);
    let crc = crc32fast::hash(&foreign);
    foreign.extend_from_slice(&crc.to_le_bytes());
    check(&foreign, "does not decode");
    assert!(decode_state(&path, &good).is_ok());
}

#[test]
fn the_memory_file_is_sparse_and_maps_back_privately() {
    let dir = Dir::new("memory");
    let path = dir.0.join("vm.mem");
    let memory = create_guest_memory(64 << 20).unwrap();
    memory
        .write_obj(0xdead_beef_u64, GuestAddress(0x1000))
        .unwrap();
    memory
        .write_slice(&[7u8; 10_000], GuestAddress(40 << 20))
        .unwrap();
    let regions = write_memory_file(&path, &memory, 99).unwrap();
    assert_eq!(
        regions,
        vec![SavedRegion {
            guest_addr: 0,
            len: 64 << 20
        }]
    );
    let metadata = std::fs::metadata(&path).unwrap();
    assert_eq!(metadata.len(), (64 << 20) + 32);
    assert!(
        metadata.blocks() * 512 < 1 << 20,
        "zero pages were written: {} blocks",
        metadata.blocks()
    );

    let mapped = map_memory_file(&path, &regions, 99).unwrap();
    assert_eq!(
        mapped.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
        0xdead_beef
    );
    let mut back = [0u8; 10_000];
    mapped
        .read_slice(&mut back, GuestAddress(40 << 20))
        .unwrap();
    assert_eq!(back, [7u8; 10_000]);
    assert_eq!(mapped.read_obj::<u64>(GuestAddress(50 << 20)).unwrap(), 0);
    // Writes stay in this mapping.
    mapped.write_obj(1u64, GuestAddress(0x1000)).unwrap();
    let again = map_memory_file(&path, &regions, 99).unwrap();
    assert_eq!(
        again.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
        0xdead_beef
    );
    assert_eq!(mapped.num_regions(), 1);

    let err = map_memory_file(&path, &regions, 98)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another snapshot"), "{err}");
    let bigger = vec![SavedRegion {
        guest_addr: 0,
        len: 128 << 20,
    }];
    let err = map_memory_file(&path, &bigger, 99)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("need"), "{err}");
    let err = map_memory_file(&dir.0.join("missing"), &regions, 99)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot open"), "{err}");
}

fn cpuid(entries: &[(u32, u32, u32)]) -> Vec<kvm_cpuid_entry2> {
    entries
        .iter()
        .map(|&(function, index, ecx)| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        })
        .collect()
}

#[test]
fn cpuid_features_the_host_lacks_are_named() {
    let host = CpuId::from_entries(&cpuid(&[(0, 0, 0x6c65_746e), (1, 0, 0b0111)])).unwrap();
    assert!(check_cpuid(&cpuid(&[(0, 0, 0x6c65_746e), (1, 0, 0b0101)]), &host).is_ok());
    let err = check_cpuid(&cpuid(&[(0, 0, 0x6c65_746e), (1, 0, 0b1001)]), &host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("leaf 0x1.0 ECX bits 0x00000008"), "{err}");
    let err = check_cpuid(&cpuid(&[(0, 0, 0x444d_4163)]), &host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vendor"), "{err}");
}
