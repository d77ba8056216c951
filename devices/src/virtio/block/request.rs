//! virtio-blk requests: from a descriptor chain to a status byte (virtio 1.2, 5.2.6).
//!
//! A request is a device-readable header (type, reserved, sector), data buffers, and a
//! device-writable status byte: the last byte of the last descriptor. Every buffer is checked
//! against guest memory before any I/O starts. A chain that has no status byte Kiln may write
//! cannot be answered and is a [`ChainError`]; any other defect is a [`RequestError`] and is
//! answered with `VIRTIO_BLK_S_IOERR`.

use std::io;
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use kiln_arch::GuestMemoryMmap;

use super::disk::DiskImage;
use super::{request_status, request_type, ID_BYTES, SECTOR_SIZE};

/// Size of the request header: `type: le32, reserved: le32, sector: le64`.
pub const HEADER_SIZE: usize =
    std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>();

/// What the driver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into device-writable buffers.
    In,
    /// Write sectors from device-readable buffers.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the serial number.
    GetId,
    /// Free sectors (on disks that offer it).
    Discard,
    /// Make sectors read as zeros (on disks that offer it).
    WriteZeroes,
    /// Anything else: answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            request_type::IN => Self::In,
            request_type::OUT => Self::Out,
            request_type::FLUSH => Self::Flush,
            request_type::GET_ID => Self::GetId,
            request_type::DISCARD => Self::Discard,
            request_type::WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A run of guest memory: one descriptor, or the part of one that is data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A chain the device cannot answer: there is no status byte it may write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Not a single descriptor could be read.
    #[error("the descriptor chain is empty (its head or indirect table cannot be read)")]
    Empty,
    /// The chain never ends where it should.
    #[error("the descriptor chain does not end: it loops, is longer than its table, points at a descriptor that does not exist, or nests indirect tables")]
    Unterminated,
    /// The last descriptor is device-readable or empty.
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    /// The status byte's address is not guest memory.
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
}

/// A request answered with `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The device-readable part must come first.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    #[error("the device-readable part is {0} bytes, shorter than the 16-byte request header")]
    ShortHeader(u64),
    /// A buffer is not (entirely) guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Data buffers of the wrong kind for the request type.
    #[error("{request:?} request with {readable} device-readable and {writable} device-writable data bytes")]
    WrongDirection {
        /// The request type.
        request: RequestType,
        /// Device-readable data bytes after the header.
        readable: u64,
        /// Device-writable data bytes before the status byte.
        writable: u64,
    },
    /// Data that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// Sectors beyond the end of the disk.
    #[error("{len} bytes at sector {sector} reach past the end of the disk ({capacity} sectors)")]
    BeyondCapacity {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A get-id request without room for the answer.
    #[error("get-id request without a buffer for the serial")]
    NoIdBuffer,
    /// Discard or write-zeroes data that is not one to [`MAX_RANGES`] 16-byte ranges.
    #[error("{0} bytes of discard/write-zeroes ranges: not 1 to {MAX_RANGES} ranges of 16 bytes")]
    BadRanges(u64),
}

/// Most ranges one discard or write-zeroes request may carry (`max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_RANGES: u32 = 1;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const RANGE_SIZE: u64 = 16;
/// The range's `unmap` flag.
const FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Why a chain could not be turned into a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No status byte: the chain goes back to the driver with nothing written.
    Unanswerable(ChainError),
    /// The request is refused with `IOERR` written to `status`.
    Invalid {
        /// Where the status byte goes.
        status: GuestAddress,
        /// What is wrong.
        error: RequestError,
    },
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (512 bytes each) for reads and writes.
    pub sector: u64,
    /// Data buffers: device-writable for `In`/`GetId`, device-readable for `Out`.
    pub data: Vec<Segment>,
    /// Total data length.
    pub data_len: u64,
    /// The status byte.
    pub status: GuestAddress,
}

/// Why a request failed after it was parsed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request itself is wrong.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The host I/O failed.
    #[error("I/O error on the image: {0}")]
    Io(#[from] io::Error),
}

/// What became of one descriptor chain.
#[derive(Debug)]
pub enum Outcome {
    /// The status byte was written. `used_len` is the number of bytes written to
    /// device-writable buffers, status byte included.
    Completed {
        /// The status written.
        status: u8,
        /// Bytes written for the used ring.
        used_len: u32,
        /// Why the status is not OK, if it is not.
        failure: Option<Failure>,
    },
    /// Nothing could be written: return the chain with length 0 and ask for a reset.
    Unanswerable(ChainError),
}

/// Reads every descriptor of `chain` (at most its table size: virtio-queue stops loops).
pub fn collect_descriptors<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descriptors: Vec<Descriptor> = chain.collect();
    match descriptors.last() {
        None => Err(ChainError::Empty),
        // virtio-queue ends the iteration early (loop, index out of range, unreadable
        // descriptor, bad indirect table, > 4 GiB) without saying so: the last descriptor it
        // returned then still points onwards.
        Some(last) if last.has_next() => Err(ChainError::Unterminated),
        Some(_) => Ok(descriptors),
    }
}

/// Splits `segments` after `count` bytes.
fn split_segments(segments: &[Segment], count: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = count;
    for segment in segments {
        let len = u64::from(segment.len);
        if left >= len {
            head.push(*segment);
            left -= len;
        } else if left > 0 {
            // left < len <= u32::MAX
            let cut = left as u32;
            head.push(Segment {
                addr: segment.addr,
                len: cut,
            });
            tail.push(Segment {
                addr: segment.addr.unchecked_add(u64::from(cut)),
                len: segment.len - cut,
            });
            left = 0;
        } else {
            tail.push(*segment);
        }
    }
    (head, tail)
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn check_in_memory(memory: &GuestMemoryMmap, segment: &Segment) -> Result<(), RequestError> {
    let inside = segment.addr.checked_add(u64::from(segment.len)).is_some()
        && GuestMemoryBackend::check_range(memory, segment.addr, segment.len as usize);
    if inside {
        Ok(())
    } else {
        Err(RequestError::OutsideMemory {
            addr: segment.addr.0,
            len: segment.len,
        })
    }
}

/// Parses a chain's descriptors into a request, checking every buffer against guest memory.
pub fn parse(descriptors: &[Descriptor], memory: &GuestMemoryMmap) -> Result<Request, ParseError> {
    let last = descriptors
        .last()
        .ok_or(ParseError::Unanswerable(ChainError::Empty))?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::Unanswerable(ChainError::NoStatus));
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|&addr| GuestMemoryBackend::check_range(memory, addr, 1))
        .ok_or(ParseError::Unanswerable(ChainError::StatusOutsideMemory(
            last.addr().0.wrapping_add(u64::from(last.len()) - 1),
        )))?;
    let invalid = |error| ParseError::Invalid { status, error };

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut seen_writable = false;
    for (index, descriptor) in descriptors.iter().enumerate() {
        let is_last = index + 1 == descriptors.len();
        // The status byte is not data.
        let len = descriptor.len() - u32::from(is_last);
        let segment = Segment {
            addr: descriptor.addr(),
            len,
        };
        check_in_memory(memory, &segment).map_err(invalid)?;
        if descriptor.is_write_only() {
            seen_writable = true;
            if len > 0 {
                writable.push(segment);
            }
        } else if seen_writable {
            return Err(invalid(RequestError::ReadableAfterWritable));
        } else if len > 0 {
            readable.push(segment);
        }
    }

    let readable_len = total_len(&readable);
    if readable_len < HEADER_SIZE as u64 {
        return Err(invalid(RequestError::ShortHeader(readable_len)));
    }
    let (header_segments, readable_data) = split_segments(&readable, HEADER_SIZE as u64);
    let mut header = [0u8; HEADER_SIZE];
    let mut filled = 0;
    for segment in &header_segments {
        let len = segment.len as usize;
        memory
            .read_slice(&mut header[filled..filled + len], segment.addr)
            .map_err(|_| {
                invalid(RequestError::OutsideMemory {
                    addr: segment.addr.0,
                    len: segment.len,
                })
            })?;
        filled += len;
    }
    let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let readable_data_len = total_len(&readable_data);
    let writable_len = total_len(&writable);
    let request_type = match RequestType::from_raw(raw_type) {
        // Not the discard or write-zeroes request Kiln supports (where it supports them at
        // all): answered UNSUPP, as on disks that do not offer them.
        RequestType::Discard | RequestType::WriteZeroes if writable_len != 0 => {
            RequestType::Unsupported(raw_type)
        }
        other => other,
    };
    let wrong_direction = || {
        invalid(RequestError::WrongDirection {
            request: request_type,
            readable: readable_data_len,
            writable: writable_len,
        })
    };
    let data = match request_type {
        RequestType::In | RequestType::GetId if readable_data_len != 0 => {
            return Err(wrong_direction())
        }
        RequestType::In | RequestType::GetId => writable,
        RequestType::Out if writable_len != 0 => return Err(wrong_direction()),
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => readable_data,
        RequestType::Flush if readable_data_len != 0 || writable_len != 0 => {
            return Err(wrong_direction())
        }
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    let data_len = total_len(&data);
    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status,
    })
}

impl Request {
    /// Checks the request against the disk: whole sectors, inside the disk, writable.
    pub fn check(&self, disk: &DiskImage) -> Result<(), RequestError> {
        match self.request_type {
            RequestType::In | RequestType::Out => {
                if self.request_type == RequestType::Out && disk.readonly() {
                    return Err(RequestError::ReadOnly);
                }
                if !self.data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::NotSectorMultiple(self.data_len));
                }
                let end = self
                    .sector
                    .checked_add(self.data_len / SECTOR_SIZE)
                    .filter(|&end| end <= disk.sectors());
                if end.is_none() {
                    return Err(RequestError::BeyondCapacity {
                        sector: self.sector,
                        len: self.data_len,
                        capacity: disk.sectors(),
                    });
                }
                Ok(())
            }
            RequestType::GetId if self.data_len == 0 => Err(RequestError::NoIdBuffer),
            // Answered UNSUPP in execute when the disk does not offer them.
            RequestType::Discard | RequestType::WriteZeroes if !disk.supports_discard() => Ok(()),
            RequestType::Discard | RequestType::WriteZeroes => {
                if disk.readonly() {
                    return Err(RequestError::ReadOnly);
                }
                let ranges = self.data_len / RANGE_SIZE;
                if !self.data_len.is_multiple_of(RANGE_SIZE)
                    || ranges == 0
                    || ranges > u64::from(MAX_RANGES)
                {
                    return Err(RequestError::BadRanges(self.data_len));
                }
                Ok(())
            }
            RequestType::GetId | RequestType::Flush | RequestType::Unsupported(_) => Ok(()),
        }
    }

    /// Carries out a checked request. Returns the status and the bytes written to
    /// device-writable data buffers.
    fn execute(&self, memory: &GuestMemoryMmap, disk: &DiskImage) -> Result<(u8, u64), Failure> {
        match self.request_type {
            RequestType::In => {
                disk.read_segments(memory, &self.data, self.sector * SECTOR_SIZE)?;
                disk.stats().record_read(self.data_len);
                Ok((request_status::OK, self.data_len))
            }
            RequestType::Out => {
                disk.write_segments(memory, &self.data, self.sector * SECTOR_SIZE)?;
                if disk.write_through() {
                    disk.flush()?;
                }
                disk.stats().record_write(self.data_len);
                Ok((request_status::OK, 0))
            }
            RequestType::Flush => {
                if !disk.readonly() {
                    disk.flush()?;
                }
                Ok((request_status::OK, 0))
            }
            RequestType::GetId => {
                let id = disk.id();
                let mut written = 0usize;
                for segment in &self.data {
                    if written == ID_BYTES {
                        break;
                    }
                    let len = (segment.len as usize).min(ID_BYTES - written);
                    memory
                        .write_slice(&id[written..written + len], segment.addr)
                        .map_err(|err| Failure::Io(io::Error::other(err)))?;
                    written += len;
                }
                Ok((request_status::OK, written as u64))
            }
            RequestType::Discard | RequestType::WriteZeroes if !disk.supports_discard() => {
                Ok((request_status::UNSUPP, 0))
            }
            RequestType::Discard | RequestType::WriteZeroes => self.discard_or_zero(memory, disk),
            RequestType::Unsupported(_) => Ok((request_status::UNSUPP, 0)),
        }
    }

    /// Carries out a checked discard or write-zeroes request (virtio 1.2, 5.2.6.2).
    fn discard_or_zero(
        &self,
        memory: &GuestMemoryMmap,
        disk: &DiskImage,
    ) -> Result<(u8, u64), Failure> {
        let mut bytes = Vec::with_capacity(self.data_len as usize);
        for segment in &self.data {
            let start = bytes.len();
            bytes.resize(start + segment.len as usize, 0);
            memory
                .read_slice(&mut bytes[start..], segment.addr)
                .map_err(|err| Failure::Io(io::Error::other(err)))?;
        }
        let mut ranges = Vec::new();
        for range in bytes.chunks_exact(RANGE_SIZE as usize) {
            let sector = u64::from_le_bytes(range[..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(range[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(range[12..16].try_into().unwrap_or_default());
            // Unknown flags, and unmap on a discard, are UNSUPP (the spec says so).
            if flags & !FLAG_UNMAP != 0 || (self.request_type == RequestType::Discard && flags != 0)
            {
                return Ok((request_status::UNSUPP, 0));
            }
            let inside = sector
                .checked_add(u64::from(sectors))
                .is_some_and(|end| end <= disk.sectors());
            if !inside {
                return Err(RequestError::BeyondCapacity {
                    sector,
                    len: u64::from(sectors) * SECTOR_SIZE,
                    capacity: disk.sectors(),
                }
                .into());
            }
            ranges.push((sector, sectors, flags & FLAG_UNMAP != 0));
        }
        for (sector, sectors, unmap) in ranges {
            let (offset, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
            if self.request_type == RequestType::Discard {
                disk.discard(offset, len)?;
            } else {
                disk.write_zeroes(offset, len, unmap)?;
            }
        }
        if disk.write_through() {
            disk.flush()?;
        }
        Ok((request_status::OK, 0))
    }
}

/// Writes the status byte and builds the outcome.
fn complete(
    memory: &GuestMemoryMmap,
    status_addr: GuestAddress,
    status: u8,
    data_written: u64,
    failure: Option<Failure>,
) -> Outcome {
    if memory.write_obj(status, status_addr).is_err() {
        // parse() checked the address; guest memory does not shrink.
        return Outcome::Unanswerable(ChainError::StatusOutsideMemory(status_addr.0));
    }
    Outcome::Completed {
        status,
        used_len: u32::try_from(data_written.saturating_add(1)).unwrap_or(u32::MAX),
        failure,
    }
}

/// Handles one descriptor chain completely: parse, check, I/O, status byte.
pub fn handle_chain<M>(
    chain: DescriptorChain<M>,
    memory: &GuestMemoryMmap,
    disk: &DiskImage,
) -> Outcome
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descriptors = match collect_descriptors(chain) {
        Ok(descriptors) => descriptors,
        Err(err) => return Outcome::Unanswerable(err),
    };
    let request = match parse(&descriptors, memory) {
        Ok(request) => request,
        Err(ParseError::Unanswerable(err)) => return Outcome::Unanswerable(err),
        Err(ParseError::Invalid { status, error }) => {
            return complete(memory, status, request_status::IOERR, 0, Some(error.into()))
        }
    };
    if let Err(error) = request.check(disk) {
        return complete(
            memory,
            request.status,
            request_status::IOERR,
            0,
            Some(error.into()),
        );
    }
    match request.execute(memory, disk) {
        Ok((status, written)) => complete(memory, request.status, status, written, None),
        Err(failure) => complete(
            memory,
            request.status,
            request_status::IOERR,
            0,
            Some(failure),
        ),
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
