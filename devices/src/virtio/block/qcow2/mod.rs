//! qcow2 images (QEMU's copy-on-write format, versions 2 and 3): reads and writes with
//! allocation on write, backing files (qcow2 or raw, opened read-only), zero clusters,
//! compressed clusters on read (zlib and zstd), write-zeroes and discard in the metadata.
//!
//! - [`header`]: the header, checked against the file before anything else is read.
//! - [`open`]: the L1 and refcount tables (every entry checked) and the backing chain.
//! - `image`: the data path; `meta`, `refcount`, `cache`: metadata in memory and how it goes
//!   back to the file; `entry`: table entries; `compress`: decompression; `io`: buffers.
//! - [`create`]: new overlays (`kiln image create`).
//!
//! Consistency: metadata changes stay in memory until a flush (or a full cache) and are then
//! written in dependency order with `fdatasync` between the steps (`Metadata::checkpoint`);
//! references to freed clusters are dropped on disk before their refcounts are. A crash or
//! kill at any point leaves an image `qemu-img check` finds consistent (leaked clusters at
//! most), with every flushed write in it. A corruption met while running fails the request
//! with an `InvalidData` I/O error.

mod cache;
mod compress;
pub mod create;
mod entry;
pub mod header;
mod image;
mod io;
mod meta;
pub mod open;
mod refcount;

pub use create::{create_overlay, CreateError, OverlayOptions};
pub use header::{Header, HeaderError};
pub use image::{Backing, Qcow2Image};
pub use io::{buffer_slice, Slice};
pub use open::{open_image, BackingPolicy, Qcow2Error, MAX_BACKING_DEPTH};

#[cfg(test)]
mod tests;
