//! The delta archive decoder (`hangar_vmm::delta::decode`): a delta file read back at wake
//! time, which may be truncated or corrupted on disk. Whatever the file holds, decoding
//! answers the stream or an error, never a panic, never more bytes than the header says,
//! and never a copy from outside the template.
//!
//! The first input byte chooses the shape: odd, the rest is the whole file (header
//! included, so mostly refused early); even, the rest is the decompressed operation
//! stream, wrapped in a valid header and a zstd frame, so that the operations themselves
//! are exercised.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use hangar_vmm::delta::{DeltaHeader, decode};
use libfuzzer_sys::fuzz_target;

/// A small template file (4 pages of a pattern), made once per process.
fn template() -> &'static (PathBuf, u64) {
    static TEMPLATE: OnceLock<(PathBuf, u64)> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hangar-fuzz-delta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        let path = dir.join("template");
        let bytes: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("template");
        (path, bytes.len() as u64)
    })
}

/// Where this process writes each input's delta file.
fn delta_path() -> PathBuf {
    template().0.with_file_name("delta")
}

/// Counts what the decoder writes.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let (template, template_len) = template();
    let (file, stream_len) = if shape & 1 == 1 {
        (rest.to_vec(), u64::MAX)
    } else {
        // The stream length comes from the next two bytes (small, so that the decoder's
        // bound is reached as often as not).
        let (len, ops) = match rest {
            [a, b, ops @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), ops),
            _ => return,
        };
        let header = DeltaHeader {
            stream_len: len,
            stream_xxh64: 0,
            template_len: *template_len,
            template_xxh64: 0,
        };
        let mut file = header.to_bytes().to_vec();
        let mut encoder = zstd::Encoder::new(&mut file, 1).expect("encoder");
        encoder.include_checksum(true).expect("checksum");
        encoder.write_all(ops).expect("compress");
        encoder.finish().expect("frame");
        (file, len)
    };
    let path = delta_path();
    std::fs::write(&path, &file).expect("write the delta");
    let mut written = Counter(0);
    if let Ok(len) = decode(&path, template, &mut written) {
        assert_eq!(len, written.0);
        assert!(len <= stream_len);
    }
    assert!(
        written.0 <= stream_len,
        "wrote {} of {stream_len}",
        written.0
    );
});
