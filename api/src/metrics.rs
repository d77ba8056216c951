//! Firecracker-style metrics: one JSON object per line, written to a file or named pipe on
//! request (`FlushMetrics`), every 60 s while the VM runs, and when Kiln exits. Counters are
//! the change since the previous line, as Firecracker's are; latencies are the last value.
//!
//! Only what Kiln measures is written: `utc_timestamp_ms`, `api_server`, `block` (all disks)
//! and `block_<drive_id>`, `vcpu` and `latencies_us`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use kiln_vmm::metrics::{DiskMetrics, VcpuExits};
use kiln_vmm::VmMetrics;

/// How often metrics are written while the VM runs (Firecracker's period).
pub const PERIOD: Duration = Duration::from_secs(60);

/// Values that are not counters of the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessTimes {
    /// From process start until the API socket accepted connections.
    pub startup_us: Option<u64>,
    /// How long the last pause took.
    pub pause_us: Option<u64>,
    /// How long the last resume took.
    pub resume_us: Option<u64>,
}

/// The open metrics destination and what was last written to it.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
    last: VmMetrics,
}

impl MetricsWriter {
    /// Opens (or creates) `path` for appending. A named pipe is opened read-write and
    /// non-blocking, so that Kiln neither waits for a reader nor stalls on a full pipe.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            last: VmMetrics::default(),
        })
    }

    /// Where the lines go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line with the change since the previous one.
    pub fn write(
        &mut self,
        now: &VmMetrics,
        drive_ids: &[String],
        times: &ProcessTimes,
    ) -> std::io::Result<()> {
        let line = render(&self.last, now, drive_ids, times, SystemTime::now());
        self.file.write_all(format!("{line}\n").as_bytes())?;
        self.last = now.clone();
        Ok(())
    }
}

/// One metrics line: `now` minus `last` for counters.
pub fn render(
    last: &VmMetrics,
    now: &VmMetrics,
    drive_ids: &[String],
    times: &ProcessTimes,
    at: SystemTime,
) -> Value {
    let mut line = Map::new();
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    line.insert("utc_timestamp_ms".into(), json!(millis));
    let mut api_server = Map::new();
    if let Some(us) = times.startup_us {
        api_server.insert("process_startup_time_us".into(), json!(us));
    }
    line.insert("api_server".into(), Value::Object(api_server));

    let empty = DiskMetrics::default();
    let mut total = DiskMetrics::default();
    let mut per_drive = Vec::new();
    for (index, disk) in now.disks.iter().enumerate() {
        let before = last.disks.get(index).unwrap_or(&empty);
        let delta = DiskMetrics {
            name: disk.name.clone(),
            read_count: disk.read_count - before.read_count,
            read_bytes: disk.read_bytes - before.read_bytes,
            write_count: disk.write_count - before.write_count,
            write_bytes: disk.write_bytes - before.write_bytes,
            flush_count: disk.flush_count - before.flush_count,
        };
        total.read_count += delta.read_count;
        total.read_bytes += delta.read_bytes;
        total.write_count += delta.write_count;
        total.write_bytes += delta.write_bytes;
        total.flush_count += delta.flush_count;
        let id = drive_ids.get(index).cloned().unwrap_or(disk.name.clone());
        per_drive.push((format!("block_{id}"), block_json(&delta)));
    }
    line.insert("block".into(), block_json(&total));
    for (key, value) in per_drive {
        line.insert(key, value);
    }
    line.insert("vcpu".into(), vcpu_json(&last.vcpu, &now.vcpu));
    let mut latencies = Map::new();
    if let Some(us) = times.pause_us {
        latencies.insert("vmm_pause_vm".into(), json!(us));
    }
    if let Some(us) = times.resume_us {
        latencies.insert("vmm_resume_vm".into(), json!(us));
    }
    line.insert("latencies_us".into(), Value::Object(latencies));
    Value::Object(line)
}

fn block_json(disk: &DiskMetrics) -> Value {
    json!({
        "read_count": disk.read_count,
        "read_bytes": disk.read_bytes,
        "write_count": disk.write_count,
        "write_bytes": disk.write_bytes,
        "flush_count": disk.flush_count,
    })
}

fn vcpu_json(last: &VcpuExits, now: &VcpuExits) -> Value {
    json!({
        "exit_io_in": now.io_in - last.io_in,
        "exit_io_out": now.io_out - last.io_out,
        "exit_mmio_read": now.mmio_read - last.mmio_read,
        "exit_mmio_write": now.mmio_write - last.mmio_write,
        "failures": now.failures - last.failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(io_out: u64, reads: u64) -> VmMetrics {
        VmMetrics {
            vcpu: VcpuExits {
                io_out,
                ..VcpuExits::default()
            },
            disks: vec![DiskMetrics {
                name: "vda".into(),
                read_count: reads,
                read_bytes: reads * 512,
                ..DiskMetrics::default()
            }],
        }
    }

    #[test]
    fn lines_carry_the_change_since_the_last_one() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let times = ProcessTimes {
            startup_us: Some(800),
            pause_us: Some(120),
            resume_us: None,
        };
        let line = render(
            &metrics(10, 2),
            &metrics(25, 5),
            &["rootfs".into()],
            &times,
            at,
        );
        assert_eq!(line["utc_timestamp_ms"], 1_700_000_000_123u64);
        assert_eq!(line["vcpu"]["exit_io_out"], 15);
        assert_eq!(line["vcpu"]["exit_mmio_read"], 0);
        assert_eq!(line["block"]["read_count"], 3);
        assert_eq!(line["block_rootfs"]["read_bytes"], 3 * 512);
        assert_eq!(line["api_server"]["process_startup_time_us"], 800);
        assert_eq!(line["latencies_us"]["vmm_pause_vm"], 120);
        assert!(line["latencies_us"].get("vmm_resume_vm").is_none());
    }

    #[test]
    fn a_writer_appends_lines_and_differences() {
        let path = std::env::temp_dir().join(format!("kiln-metrics-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut writer = MetricsWriter::open(&path).unwrap();
        let ids = ["disk0".to_string()];
        writer
            .write(&metrics(7, 1), &ids, &ProcessTimes::default())
            .unwrap();
        writer
            .write(&metrics(9, 1), &ids, &ProcessTimes::default())
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["vcpu"]["exit_io_out"], 7);
        assert_eq!(lines[1]["vcpu"]["exit_io_out"], 2);
        assert_eq!(lines[1]["block_disk0"]["read_count"], 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_named_pipe_without_reader_does_not_block() {
        let path = std::env::temp_dir().join(format!("kiln-metrics-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let mut writer = MetricsWriter::open(&path).unwrap();
        writer
            .write(&metrics(1, 0), &[], &ProcessTimes::default())
            .unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
