use vm_memory::GuestAddress;

use super::*;
use crate::virtio::block::test_utils::guest_memory;
use crate::virtio::test_driver::{TestQueue, WRITE};

struct Guest {
    memory: GuestMemoryMmap,
    device: Rng,
    queue: TestQueue,
    interrupt: Arc<Interrupt>,
}

fn guest(rate: Option<u64>) -> Guest {
    let memory = guest_memory();
    let mut device = Rng::new(rate).unwrap();
    let queue = TestQueue::new(0x1000, QUEUE_SIZE);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    device
        .activate(Activation {
            memory: memory.clone(),
            queues: vec![queue.queue(&memory, false)],
            queue_events: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: interrupt.clone(),
            features: 0,
        })
        .unwrap();
    Guest {
        memory,
        device,
        queue,
        interrupt,
    }
}

impl Guest {
    fn request(&mut self, addr: u64, len: u32, flags: u16) {
        self.queue.add(&self.memory, &[(addr, len, flags)]);
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.memory
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }
}

#[test]
fn buffers_are_filled_with_random_bytes() {
    let mut guest = guest(None);
    guest.request(0x10_0000, 64, WRITE);
    guest.request(0x20_0000, 64, WRITE);
    guest.device.run_pass();
    assert_eq!(guest.queue.take_used(&guest.memory), [(0, 64), (1, 64)]);
    let first = guest.bytes(0x10_0000, 64);
    let second = guest.bytes(0x20_0000, 64);
    assert_ne!(first, vec![0u8; 64]);
    assert_ne!(first, second, "two requests, two different fills");
    assert!(guest.interrupt.eventfd().read().is_ok());
    assert_eq!(guest.device.bytes_given(), 128);
}

#[test]
fn huge_requests_get_at_most_the_cap_and_bad_buffers_nothing() {
    let mut guest = guest(None);
    guest.request(0x10_0000, 4 << 20, WRITE);
    guest.request(0x10_0000, 64, 0);
    guest.request(0xffff_0000, 64, WRITE);
    guest.device.run_pass();
    let used = guest.queue.take_used(&guest.memory);
    assert_eq!(used, [(0, MAX_REQUEST_BYTES as u32), (1, 0), (2, 0)]);
}

#[test]
fn the_rate_limit_holds_requests_until_tokens_refill() {
    let mut guest = guest(Some(1000));
    for i in 0..4 {
        guest.request(0x10_0000 + i * 0x1000, 512, WRITE);
    }
    guest.device.run_pass();
    let used: u32 = guest
        .queue
        .take_used(&guest.memory)
        .iter()
        .map(|u| u.1)
        .sum();
    assert_eq!(used, 1000, "one second's worth at once");
    guest.device.run_pass();
    assert!(guest.queue.take_used(&guest.memory).is_empty());
    std::thread::sleep(Duration::from_millis(600));
    guest.device.run_pass();
    let more: u32 = guest
        .queue
        .take_used(&guest.memory)
        .iter()
        .map(|u| u.1)
        .sum();
    assert!((500..=1000).contains(&more), "{more} bytes after 0.6 s");
}

#[test]
fn pause_serves_nothing_until_resume() {
    let mut guest = guest(None);
    guest.device.pause().unwrap();
    guest.request(0x10_0000, 16, WRITE);
    guest.device.run_pass();
    assert!(guest.queue.take_used(&guest.memory).is_empty());
    guest.device.resume();
    guest.device.run_pass();
    assert_eq!(guest.queue.take_used(&guest.memory), [(0, 16)]);
}

#[test]
fn token_bucket_arithmetic() {
    let start = Instant::now();
    let mut limit = RateLimit::starting_at(100, start);
    assert_eq!(limit.take(150, start), 100);
    assert_eq!(limit.take(10, start), 0);
    assert_eq!(limit.take(10, start + Duration::from_millis(50)), 5);
    assert_eq!(
        limit.take(1000, start + Duration::from_secs(100)),
        100,
        "capped at one second"
    );
    assert!(limit.wait_for(64) >= Duration::from_millis(600));
}

#[test]
fn a_corrupt_available_ring_stops_the_device_instead_of_spinning() {
    let mut guest = guest(None);
    // Available index far ahead of the ring (the queue sits at 0x1000, 64 entries).
    guest
        .memory
        .write_obj(500u16, GuestAddress(0x1000 + 16 * 64 + 2))
        .unwrap();
    guest.device.run_pass();
    assert!(guest.interrupt.needs_reset());
    guest.request(0x10_0000, 16, WRITE);
    guest.device.run_pass();
    assert_eq!(guest.device.bytes_given(), 0);
}
