//! Moving bytes between image files and buffers given as [`VolatileSlice`]s (guest memory, or
//! Kiln's own buffers for copy-on-write), walked in order by a [`SliceCursor`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use std::num::NonZeroUsize;
use std::sync::LazyLock;

use vm_memory::bitmap::{AtomicBitmap, RefSlice};
use vm_memory::VolatileSlice;

use crate::virtio::block::disk::{pread_until_eof, pwrite_all};

/// A buffer of guest memory (or one of Kiln's, see [`buffer_slice`]), with the dirty-page
/// bitmap of the memory it lies in.
pub type Slice<'a> = VolatileSlice<'a, crate::virtio::GuestBitmap<'a>>;

/// The bitmap of Kiln's own buffers: empty, so it ignores every mark.
static UNTRACKED: LazyLock<AtomicBitmap> =
    LazyLock::new(|| AtomicBitmap::new(0, NonZeroUsize::new(4096).expect("non-zero")));

/// Zeros to copy from.
static ZEROS: [u8; 65536] = [0; 65536];

/// A [`Slice`] over `buf`, for reading into Kiln's own buffers with the same code that reads
/// into guest memory.
pub fn buffer_slice(buf: &mut [u8]) -> Slice<'_> {
    // SAFETY: the slice covers exactly `buf`, which it borrows mutably for its whole lifetime,
    // so the memory stays valid and nothing else accesses it meanwhile.
    unsafe {
        VolatileSlice::with_bitmap(
            buf.as_mut_ptr(),
            buf.len(),
            RefSlice::new(&*UNTRACKED, 0),
            None,
        )
    }
}

/// Walks a list of slices from the start, handing out consecutive pieces.
#[derive(Debug)]
pub struct SliceCursor<'s, 'a> {
    slices: &'s [Slice<'a>],
    index: usize,
    offset: usize,
}

impl<'s, 'a> SliceCursor<'s, 'a> {
    /// A cursor at the start of `slices`.
    pub fn new(slices: &'s [Slice<'a>]) -> Self {
        Self {
            slices,
            index: 0,
            offset: 0,
        }
    }

    /// Total bytes of all slices.
    pub fn total(slices: &[Slice<'_>]) -> u64 {
        slices.iter().map(|slice| slice.len() as u64).sum()
    }

    /// The next piece: at most `max` bytes, within one slice. None when all is used.
    fn next_piece(&mut self, max: usize) -> Option<Slice<'a>> {
        while let Some(slice) = self.slices.get(self.index) {
            let left = slice.len() - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let len = left.min(max);
            let piece = slice.subslice(self.offset, len).ok()?;
            self.offset += len;
            return Some(piece);
        }
        None
    }

    /// Hands `len` bytes, piece by piece, to `each(piece, offset_from_start)`.
    fn for_each(
        &mut self,
        len: u64,
        mut each: impl FnMut(&Slice<'a>, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let want = usize::try_from(len - done).unwrap_or(usize::MAX);
            let piece = self
                .next_piece(want)
                .ok_or_else(|| io::Error::other("the buffers are shorter than the request"))?;
            each(&piece, done)?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    /// Fills the next `len` bytes with zeros.
    pub fn fill_zeros(&mut self, len: u64) -> io::Result<()> {
        self.for_each(len, |piece, _| {
            let mut at = 0;
            while at < piece.len() {
                let n = (piece.len() - at).min(ZEROS.len());
                piece
                    .subslice(at, n)
                    .map_err(io::Error::other)?
                    .copy_from(&ZEROS[..n]);
                at += n;
            }
            Ok(())
        })
    }

    /// Copies `bytes` into the next `bytes.len()` bytes.
    pub fn copy_in(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.for_each(bytes.len() as u64, |piece, done| {
            let start = done as usize;
            piece.copy_from(&bytes[start..start + piece.len()]);
            Ok(())
        })
    }

    /// Reads `len` bytes of `file` at `offset` into the next `len` bytes; what lies past the
    /// end of the file reads as zeros (as in QEMU).
    pub fn read_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let mut at_end = false;
        self.for_each(len, |piece, done| {
            let filled = if at_end {
                0
            } else {
                pread_until_eof(file, piece, offset + done)?
            };
            if filled < piece.len() {
                at_end = true;
                let rest = piece.offset(filled).map_err(io::Error::other)?;
                let mut at = 0;
                while at < rest.len() {
                    let n = (rest.len() - at).min(ZEROS.len());
                    rest.subslice(at, n)
                        .map_err(io::Error::other)?
                        .copy_from(&ZEROS[..n]);
                    at += n;
                }
            }
            Ok(())
        })
    }

    /// Writes the next `len` bytes to `file` at `offset`.
    pub fn write_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        self.for_each(len, |piece, done| pwrite_all(file, piece, offset + done))
    }
}

/// Writes `len` zero bytes to `file` at `offset`.
pub fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`, fewer only at the end of the file; returns how many.
pub fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    pread_until_eof(file, &buffer_slice(buf), offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_utils::TempImage;

    #[test]
    fn the_cursor_walks_pieces_across_slices() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        {
            let slices = [buffer_slice(&mut a), buffer_slice(&mut b)];
            let mut cursor = SliceCursor::new(&slices);
            assert_eq!(SliceCursor::total(&slices), 8);
            cursor.copy_in(&[1, 2]).unwrap();
            cursor.copy_in(&[3, 4, 5]).unwrap();
            cursor.fill_zeros(1).unwrap();
            cursor.copy_in(&[9, 9]).unwrap();
            assert!(cursor.copy_in(&[7]).is_err());
        }
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [4, 5, 0, 9, 9]);
    }

    #[test]
    fn reads_past_the_end_of_the_file_are_zeros() {
        let image = TempImage::new("cursor", 0);
        std::fs::write(image.path(), [0x11u8; 6]).unwrap();
        let file = File::open(image.path()).unwrap();
        let mut a = [0xffu8; 4];
        let mut b = [0xffu8; 4];
        {
            let slices = [buffer_slice(&mut a), buffer_slice(&mut b)];
            SliceCursor::new(&slices).read_file(&file, 1, 8).unwrap();
        }
        assert_eq!(a, [0x11; 4]);
        assert_eq!(b, [0x11, 0, 0, 0]);
    }
}
