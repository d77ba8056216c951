//! Decompressing compressed clusters: raw deflate (zlib, the default) or zstd. The input is an
//! upper bound on the compressed bytes (whole sectors, possibly cut at the end of the file); the
//! output must come out exactly one cluster long, as QEMU requires.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use super::entry::Corrupt;
use super::header::Compression;

/// Fills `out` (one cluster) from the compressed bytes in `input`.
pub fn decompress_cluster(
    compression: Compression,
    input: &[u8],
    out: &mut [u8],
    host: u64,
) -> Result<(), Corrupt> {
    let result = match compression {
        Compression::Zlib => inflate(input, out),
        // The decoder is a large library handed bytes from the image: a bug in it must fail the
        // request, not take the VMM down.
        Compression::Zstd => {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| zstd(input, out)))
                .unwrap_or_else(|_| Err("the zstd decoder failed".to_string()))
        }
    };
    result.map_err(|problem| {
        Corrupt(format!(
            "the compressed cluster at host offset {host:#x} does not decompress: {problem}"
        ))
    })
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut state = Box::<DecompressorOxide>::default();
    let (status, _, written) = decompress(
        &mut state,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        // The input is longer than the stream, and the stream may hold more than a cluster
        // (QEMU ignores that too): a full cluster is success.
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::HasMoreOutput => Err(format!(
            "it holds {written} bytes, not a whole cluster of {}",
            out.len()
        )),
        other => Err(format!("deflate stream error {other:?}")),
    }
}

/// One or more zstd frames that together are exactly one cluster (QEMU's rule).
fn zstd(mut input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut decoder = FrameDecoder::new();
    let mut written = 0;
    while written < out.len() {
        decoder
            .init(&mut input)
            .map_err(|err| format!("bad zstd frame: {err}"))?;
        loop {
            let wanted = out.len() - written;
            let finished = decoder
                .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(wanted))
                .map_err(|err| format!("bad zstd data: {err}"))?;
            let got = decoder
                .read(&mut out[written..])
                .map_err(|err| format!("zstd: {err}"))?;
            written += got;
            if decoder.can_collect() > 0 {
                return Err(format!("it holds more than a cluster of {}", out.len()));
            }
            if finished {
                break;
            }
            if got == 0 && written < out.len() {
                return Err("the zstd stream makes no progress".to_string());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 100) as u8).collect()
    }

    #[test]
    fn raw_deflate_clusters_decompress() {
        let data = cluster();
        let mut compressed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        // The L2 entry's length is in whole sectors: trailing bytes are not part of the stream.
        compressed.extend_from_slice(&[0xa5; 300]);
        let mut out = vec![0u8; data.len()];
        decompress_cluster(Compression::Zlib, &compressed, &mut out, 0x1_0000).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_clusters_decompress() {
        let data = cluster();
        let mut compressed = Vec::new();
        ruzstd::encoding::compress(
            &data[..],
            &mut compressed,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        compressed.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; data.len()];
        decompress_cluster(Compression::Zstd, &compressed, &mut out, 0x1_0000).unwrap();
        assert_eq!(out, data);
        // Two frames of half a cluster each.
        let mut two = Vec::new();
        for half in data.chunks(32768) {
            ruzstd::encoding::compress(half, &mut two, ruzstd::encoding::CompressionLevel::Fastest);
        }
        out.fill(0);
        decompress_cluster(Compression::Zstd, &two, &mut out, 0x1_0000).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn damaged_or_wrong_sized_data_is_corruption() {
        let data = cluster();
        let mut out = vec![0u8; data.len()];
        let deflated = miniz_oxide::deflate::compress_to_vec(&data, 6);
        // Cut short.
        let err =
            decompress_cluster(Compression::Zlib, &deflated[..20], &mut out, 0x3_0000).unwrap_err();
        assert!(err.0.contains("0x30000"), "{err}");
        // Half a cluster.
        let half = miniz_oxide::deflate::compress_to_vec(&data[..32768], 6);
        assert!(decompress_cluster(Compression::Zlib, &half, &mut out, 0).is_err());
        // Garbage.
        assert!(decompress_cluster(Compression::Zlib, &[0xff; 512], &mut out, 0).is_err());
        assert!(decompress_cluster(Compression::Zstd, &[0xff; 512], &mut out, 0).is_err());
        assert!(decompress_cluster(Compression::Zstd, &[], &mut out, 0).is_err());
        // More than a cluster.
        let mut big = Vec::new();
        ruzstd::encoding::compress(
            &vec![7u8; 70000][..],
            &mut big,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(decompress_cluster(Compression::Zstd, &big, &mut out, 0).is_err());
        // Truncated zstd.
        let mut whole = Vec::new();
        ruzstd::encoding::compress(
            &data[..],
            &mut whole,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(
            decompress_cluster(Compression::Zstd, &whole[..whole.len() / 2], &mut out, 0).is_err()
        );
    }
}
