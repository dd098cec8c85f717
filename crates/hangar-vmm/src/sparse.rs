//! The `sparse` archive codec: a VM's migration stream without the RAM pages that still
//! hold what its template's RAM file holds.
//!
//! A mapped-memory template keeps its guest RAM in a flat *RAM file*: the byte at offset
//! `A` is the guest RAM at offset `A` of the RAM block [`RAM_BLOCK`] (QEMU's
//! `-object memory-backend-file,id=mem,...`). Its clones map that file privately
//! (`share=off`), so their RAM starts as the template's. [`encode`] reads a clone's QEMU 7.2
//! migration stream and drops every RAM record of block [`RAM_BLOCK`] whose page equals the
//! RAM file's page at the same address; everything else is kept byte for byte. To wake the
//! clone, QEMU is started with the same RAM file mapped privately and fed the stream
//! [`decode`] gives back: the pages missing from it keep the template's content, which is
//! what the dropped records would have written.
//!
//! # What is dropped, exactly
//!
//! The stream is parsed by [`crate::delta`]'s parser (see its module doc for the format).
//! A record of block [`RAM_BLOCK`] at page address `A` (with `A + 4096` within the RAM file)
//! is dropped when
//! - it is a `PAGE` record whose 4096 bytes equal the RAM file's bytes at `A`, or a `ZERO`
//!   record whose fill byte fills the RAM file's page at `A` entirely, and
//! - no earlier record for `A` was kept: a page sent again (a later iteration) after a
//!   kept version must overwrite that version, even when it is back to the template's.
//!
//! Under those rules the guest memory that loading the sparse stream over the RAM file
//! gives equals what loading the whole stream over it gives, page for page (the tests check
//! this on random streams); and when the stream sends every page (a precopy migration
//! does), that is what loading the whole stream into any memory gives.
//!
//! # Block continuity
//!
//! A record header with `CONTINUE` (`0x20`) names no block: it means the block of the
//! previous record *the loader saw*. QEMU 7.2's loader (`ram_block_from_stream` in
//! `migration/ram.c`) keeps that block in `MigrationIncomingState::last_recv_block[channel]`
//! (a function-local static before 7.1's postcopy-preempt rework) and never resets it within
//! an incoming migration: it carries over section boundaries, as the sender's
//! `RAMState::last_sent_block` does. Dropping records can make a kept `CONTINUE` record
//! follow a record of another block (or none). Such a record is rewritten as QEMU's sender
//! writes a record that changes block: `CONTINUE` cleared and the block name (length byte,
//! bytes) inserted after the 8-byte header. Where the parser stops understanding the stream
//! (the tail: device state, but possibly RAM records it could not parse), the loader must
//! again agree with the original stream on the current block; if the last record before the
//! tail was dropped and the last kept one is of another block, that last record is written
//! after all, at its place (rebuilt from the RAM file, which it equals; the literal bytes
//! after it, such as the section's end, are held back until it is known whether a tail
//! follows). This costs at most one page per archive.
//!
//! # The sparse file
//!
//! | bytes  | what                                                                  |
//! |--------|-----------------------------------------------------------------------|
//! | 0..8   | magic `HGSPARS1`                                                      |
//! | 8..16  | length of the sparse stream (little endian, like every field here)   |
//! | 16..24 | length of the original stream                                        |
//! | 24..32 | length of the RAM file                                                |
//! | 32..40 | the RAM file's id (the caller's: which template it belongs to)       |
//! | 40..48 | XXH64 (seed 0) of bytes 0..40                                         |
//! | 48..64 | zero (reserved)                                                       |
//! | 64..   | one zstd frame (level 1, with its content checksum) of the sparse stream |
//!
//! The header is written last, so a file cut short while encoding has no valid magic.
//! [`decode`] checks the header, the RAM file's length and id before it writes anything,
//! and the zstd checksum and the stream's length at the end: a truncated or corrupted
//! archive is an error after the last byte at the latest (`qemu::incoming` checks the
//! feed's result before it resumes the VM).
//!
//! # Measured
//!
//! `tests::encode_speed` (`cargo test -p hangar-vmm --release --lib sparse::tests::encode_speed
//! -- --ignored --nocapture`; 2-core host, RAM file in the page cache, stream in memory):
//! a 256 MiB RAM file and a 263.4 MB stream of every page (97% equal to the RAM file, 2%
//! zero over zero, 1% changed) encode in 0.12–0.14 s (about 2 GB/s, so a migration
//! through a pipe is never slowed by it) to 1.13 MB (2.97 MB of sparse stream: the 723
//! pages kept); decoding (`verify`) takes 3–4 ms.

use crate::RAM_BLOCK;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::delta::{
    self, Event, FLAG_CONTINUE, FLAGS_MASK, Input, PAGE_SIZE, Record, be64, invalid,
};

const MAGIC: &[u8; 8] = b"HGSPARS1";
/// Length of the fixed header at the start of a sparse file.
pub const HEADER_LEN: usize = 64;

/// zstd level: as in the `zstd` tier.
const ZSTD_LEVEL: i32 = 1;
/// Output buffer, decode buffer.
const BUFFER: usize = 1 << 20;
/// RAM file window: sequential page reads read this much at once.
const WINDOW: usize = 4 << 20;

/// What [`encode`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseStats {
    /// RAM page records (`PAGE` and `ZERO`) of every block.
    pub pages_total: u64,
    /// `PAGE` records dropped (equal to the RAM file).
    pub pages_dropped: u64,
    /// `ZERO` records dropped (the RAM file's page holds the fill byte).
    pub zero_dropped: u64,
    /// Page records written (`pages_total - pages_dropped - zero_dropped`).
    pub pages_kept: u64,
    /// Length of the original stream.
    pub stream_bytes: u64,
    /// Length of the sparse stream (before zstd).
    pub sparse_bytes: u64,
    /// Size of the sparse file.
    pub output_bytes: u64,
}

/// The fixed header of a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// Length of the sparse stream the file decodes to.
    pub sparse_len: u64,
    /// Length of the stream it was made from.
    pub stream_len: u64,
    /// Length of the RAM file it was made against.
    pub ram_len: u64,
    /// Id of that RAM file.
    pub ram_id: u64,
}

impl SparseHeader {
    /// The header as it is written at the start of a sparse file.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        delta::header_bytes(
            MAGIC,
            [self.sparse_len, self.stream_len, self.ram_len, self.ram_id],
        )
    }

    fn from_bytes(bytes: &[u8; HEADER_LEN]) -> io::Result<Self> {
        let [sparse_len, stream_len, ram_len, ram_id] =
            delta::header_words(bytes, MAGIC, "sparse")?;
        Ok(Self {
            sparse_len,
            stream_len,
            ram_len,
            ram_id,
        })
    }
}

/// Reads a VM's migration stream from `stream` (until end of file) and writes it to `out`
/// without the pages of block [`RAM_BLOCK`] that equal the RAM file `ram`'s (see the module
/// doc), recording `ram_id` and `ram`'s length, synced. On error `out` may hold a partial
/// file without a valid header: the caller removes it.
pub fn encode(
    mut stream: impl Read,
    ram: &Path,
    ram_id: u64,
    out: &Path,
) -> io::Result<SparseStats> {
    encode_from(&mut stream, ram, ram_id, out)
}

/// [`encode`], compiled once rather than for each reader.
fn encode_from(
    stream: &mut dyn Read,
    ram: &Path,
    ram_id: u64,
    out: &Path,
) -> io::Result<SparseStats> {
    let ram = RamFile::open(ram)?;
    let ram_len = ram.len;
    let mut file = File::create(out)?;
    file.write_all(&[0u8; HEADER_LEN])?;
    let mut compressor = zstd::Encoder::new(BufWriter::with_capacity(BUFFER, file), ZSTD_LEVEL)?;
    compressor.include_checksum(true)?;
    let mut sparse = Sparser::new(compressor, ram);
    let mut input = Input::new(stream);
    delta::parse(&mut input, &mut |event| sparse.event(event))?;
    sparse.event(Event::Tail(&[]))?;
    let Sparser {
        out,
        mut stats,
        written,
        ..
    } = sparse;
    let file = out.finish()?.into_inner().map_err(|err| err.into_error())?;
    let header = SparseHeader {
        sparse_len: written,
        stream_len: input.consumed,
        ram_len,
        ram_id,
    };
    file.write_all_at(&header.to_bytes(), 0)?;
    file.sync_all()?;
    stats.stream_bytes = input.consumed;
    stats.sparse_bytes = written;
    stats.output_bytes = file.metadata()?.len();
    Ok(stats)
}

/// The encoder's state between parser events.
struct Sparser<W: Write> {
    out: W,
    ram: RamFile,
    /// One bit per RAM file page: a record for it was kept.
    kept: Vec<u64>,
    /// The block of the last record written: what a loader of the sparse stream takes a
    /// `CONTINUE` record for.
    loader_block: Option<Vec<u8>>,
    /// The last record of the original stream, when it was dropped: (address, fill byte
    /// of a `ZERO` record).
    dropped_last: Option<(u64, Option<u8>)>,
    /// Literal bytes after that record, held back while the loader would be in another
    /// block than the original stream's: a tail after them needs the record before them.
    held: Vec<u8>,
    /// Sparse stream bytes written.
    written: u64,
    stats: SparseStats,
}

impl<W: Write> Sparser<W> {
    fn new(out: W, ram: RamFile) -> Self {
        let pages = ram.len / PAGE_SIZE as u64;
        Self {
            out,
            kept: vec![0; usize::try_from(pages.div_ceil(64)).expect("bitmap fits")],
            ram,
            loader_block: None,
            dropped_last: None,
            held: Vec::new(),
            written: 0,
            stats: SparseStats::default(),
        }
    }

    fn event(&mut self, event: Event<'_>) -> io::Result<()> {
        match event {
            Event::Literal(bytes) if self.diverged() => {
                self.held.extend_from_slice(bytes);
                Ok(())
            }
            Event::Literal(bytes) => self.write(bytes),
            Event::Tail(bytes) => {
                self.resync()?;
                self.release()?;
                self.write(bytes)
            }
            Event::Record(record) => {
                self.release()?;
                self.record(&record)
            }
        }
    }

    /// Whether the original stream's last record was dropped and a loader of the sparse
    /// stream would take another block for `CONTINUE` than a loader of the original.
    fn diverged(&self) -> bool {
        self.dropped_last.is_some() && self.loader_block.as_deref() != Some(RAM_BLOCK.as_bytes())
    }

    /// Writes the literal bytes held back.
    fn release(&mut self) -> io::Result<()> {
        let held = std::mem::take(&mut self.held);
        self.write(&held)?;
        self.held = held;
        self.held.clear();
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn record(&mut self, record: &Record<'_>) -> io::Result<()> {
        self.stats.pages_total += 1;
        let page = (record.block == RAM_BLOCK.as_bytes())
            .then(|| self.ram_page(record.addr))
            .flatten();
        let Some(page) = page else {
            self.dropped_last = None;
            return self.keep(record);
        };
        let payload = &record.bytes[record.header_len..];
        let fill = record.zero.then(|| payload[0]);
        if !self.was_kept(page) && self.ram.matches(record.addr, fill, payload)? {
            match fill {
                Some(_) => self.stats.zero_dropped += 1,
                None => self.stats.pages_dropped += 1,
            }
            self.dropped_last = Some((record.addr, fill));
            return Ok(());
        }
        self.dropped_last = None;
        self.mark_kept(page);
        self.keep(record)
    }

    /// The RAM file page index of `addr`, if the file holds that whole page.
    fn ram_page(&self, addr: u64) -> Option<usize> {
        let end = addr.checked_add(PAGE_SIZE as u64)?;
        (end <= self.ram.len).then(|| usize::try_from(addr / PAGE_SIZE as u64).expect("fits"))
    }

    fn was_kept(&self, page: usize) -> bool {
        self.kept[page / 64] & (1 << (page % 64)) != 0
    }

    fn mark_kept(&mut self, page: usize) {
        self.kept[page / 64] |= 1 << (page % 64);
    }

    /// Writes `record`, naming its block when the loader would take another for `CONTINUE`.
    fn keep(&mut self, record: &Record<'_>) -> io::Result<()> {
        self.stats.pages_kept += 1;
        let named = !record.continues();
        if named || self.loader_block.as_deref() == Some(record.block) {
            self.write(record.bytes)?;
        } else {
            let header = be64(record.bytes) & !FLAG_CONTINUE;
            self.write_named(header, record.block, &record.bytes[8..])?;
        }
        if self.loader_block.as_deref() != Some(record.block) {
            self.loader_block = Some(record.block.to_vec());
        }
        Ok(())
    }

    /// A record with its block's name: header (without `CONTINUE`), name, payload.
    fn write_named(&mut self, header: u64, block: &[u8], payload: &[u8]) -> io::Result<()> {
        let len = u8::try_from(block.len()).map_err(|_| invalid("RAM block name too long"))?;
        self.write(&header.to_be_bytes())?;
        self.write(&[len])?;
        self.write(block)?;
        self.write(payload)
    }

    /// Before the tail: if the original stream's last record was dropped and the loader
    /// would now be in another block, writes that record after all, where it was (before
    /// the literal bytes held back since).
    fn resync(&mut self) -> io::Result<()> {
        if !self.diverged() {
            return Ok(());
        }
        let (addr, fill) = self.dropped_last.take().expect("diverged");
        match fill {
            Some(fill) => {
                self.stats.zero_dropped -= 1;
                self.write_named(addr | delta::FLAG_ZERO, RAM_BLOCK.as_bytes(), &[fill])?;
            }
            None => {
                self.stats.pages_dropped -= 1;
                let data = self.ram.page(addr)?.to_vec();
                self.write_named(addr | delta::FLAG_PAGE, RAM_BLOCK.as_bytes(), &data)?;
            }
        }
        debug_assert_eq!(addr & FLAGS_MASK, 0);
        self.stats.pages_kept += 1;
        self.loader_block = Some(RAM_BLOCK.as_bytes().to_vec());
        Ok(())
    }
}

/// Positional reads of the RAM file: a window for sequential pages, one page otherwise.
struct RamFile {
    file: File,
    len: u64,
    window: Vec<u8>,
    window_at: u64,
    window_len: usize,
    /// Address of the last page read: the next one after it moves the window.
    last: u64,
    page: Vec<u8>,
}

impl RamFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            window: vec![0; WINDOW],
            window_at: 0,
            window_len: 0,
            last: u64::MAX,
            page: vec![0; PAGE_SIZE],
        })
    }

    /// The page at `addr` (which the file holds whole).
    fn page(&mut self, addr: u64) -> io::Result<&[u8]> {
        let sequential = self.last.wrapping_add(PAGE_SIZE as u64) == addr;
        self.last = addr;
        let inside = addr >= self.window_at
            && addr + PAGE_SIZE as u64 <= self.window_at + self.window_len as u64;
        if !inside {
            if !sequential {
                self.file.read_exact_at(&mut self.page, addr)?;
                return Ok(&self.page);
            }
            let n = usize::try_from(self.len - addr)
                .unwrap_or(usize::MAX)
                .min(WINDOW);
            self.file.read_exact_at(&mut self.window[..n], addr)?;
            self.window_at = addr;
            self.window_len = n;
        }
        let start = usize::try_from(addr - self.window_at).expect("inside the window");
        Ok(&self.window[start..start + PAGE_SIZE])
    }

    /// Whether the page at `addr` is `payload` (a `PAGE` record), or filled with `fill`
    /// (a `ZERO` record).
    fn matches(&mut self, addr: u64, fill: Option<u8>, payload: &[u8]) -> io::Result<bool> {
        let page = self.page(addr)?;
        Ok(match fill {
            None => page == payload,
            Some(0) => page == [0u8; PAGE_SIZE].as_slice(),
            Some(fill) => page.iter().all(|&byte| byte == fill),
        })
    }
}

/// Reads the header of the sparse file at `archive`.
pub fn read_header(archive: &Path) -> io::Result<SparseHeader> {
    let mut header = [0u8; HEADER_LEN];
    File::open(archive)?
        .read_exact(&mut header)
        .map_err(truncated)?;
    SparseHeader::from_bytes(&header)
}

/// Writes the sparse stream of `archive` into `sink`, after checking that it was made
/// against a RAM file with `ram`'s length and id `ram_id` (nothing is written otherwise).
/// Returns the stream's length. Fails, possibly after writing everything, when the archive
/// is truncated or corrupted.
pub fn decode(archive: &Path, ram: &Path, ram_id: u64, mut sink: impl Write) -> io::Result<u64> {
    decode_into(archive, ram, ram_id, &mut sink)
}

/// [`decode`], compiled once rather than for each sink.
fn decode_into(archive: &Path, ram: &Path, ram_id: u64, sink: &mut dyn Write) -> io::Result<u64> {
    let mut file = File::open(archive)?;
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header).map_err(truncated)?;
    let header = SparseHeader::from_bytes(&header)?;
    let ram_len = std::fs::metadata(ram)?.len();
    if ram_len != header.ram_len {
        return Err(invalid(format!(
            "{} is {ram_len} bytes, the sparse archive was made against {} bytes",
            ram.display(),
            header.ram_len
        )));
    }
    if ram_id != header.ram_id {
        return Err(invalid(format!(
            "the sparse archive was made against RAM file {:#x}, not {ram_id:#x} ({})",
            header.ram_id,
            ram.display()
        )));
    }
    let mut stream = zstd::Decoder::new(file)?;
    let mut buf = vec![0u8; BUFFER];
    let mut written: u64 = 0;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            // zstd's own errors (checksum, framing) come as `Other`.
            Err(err) if err.kind() == io::ErrorKind::Other => {
                return Err(invalid(format!("sparse archive is corrupted: {err}")));
            }
            Err(err) => return Err(truncated(err)),
        };
        written += n as u64;
        if written > header.sparse_len {
            return Err(invalid("sparse archive decodes to more than its stream"));
        }
        sink.write_all(&buf[..n])?;
    }
    if written != header.sparse_len {
        return Err(invalid(format!(
            "sparse archive is truncated ({written} of {} bytes)",
            header.sparse_len
        )));
    }
    sink.flush()?;
    Ok(written)
}

/// Decodes `archive` without keeping the result: checks that it is whole and belongs to
/// the RAM file `ram` with id `ram_id`. Returns its header.
pub fn verify(archive: &Path, ram: &Path, ram_id: u64) -> io::Result<SparseHeader> {
    decode(archive, ram, ram_id, io::sink())?;
    read_header(archive)
}

fn truncated(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        invalid("sparse archive is truncated")
    } else {
        err
    }
}

#[cfg(test)]
pub(crate) mod tests;
