//! The `delta` archive codec: a VM's migration stream stored as references to its service
//! template's snapshot plus the bytes that differ.
//!
//! A template is a VM of the service booted to ready and archived as a raw migration stream
//! (a plain file, read with positional reads). VMs cloned from it keep most of its memory:
//! a clone's page at a guest address is usually byte for byte the template's page at the
//! same address. [`encode`] reads a clone's migration stream and writes it as a sequence of
//! two operations: *literal* bytes and *copy* `len` bytes from the template file at `offset`;
//! [`decode`] replays them into a sink. The operations go through zstd (level 1), so the
//! literal pages are compressed as in the `zstd` tier.
//!
//! # What is parsed (QEMU 7.2, `migration/ram.c` and `migration/savevm.c`)
//!
//! Only the RAM sections. The stream starts with the file header (`QEVM`, version 3) and a
//! configuration section; the codec looks for the start of the RAM iterative section
//! (`QEMU_VM_SECTION_START`, section id, `"ram"`, instance id, version 4) and carries every
//! byte before it literally. Then come RAM records, a big-endian `u64` of page offset | flags
//! (`ZERO` + 1 fill byte, `PAGE` + 4096 bytes, `MEM_SIZE` + the block list, `EOS`; without
//! `CONTINUE` the header is followed by the block's name), a section footer (`0x7e`, section
//! id), and more RAM sections (`PART` / `END` with the same section id). The first anything
//! else (a device section, `EOF`, an unknown flag such as `XBZRLE`) starts the *tail*,
//! carried literally to the end. Whatever the parser does not understand therefore costs
//! only compression, never exactness: the stream is always reproduced byte for byte.
//!
//! A page record (header and payload) is copied from the template when the template has a
//! record for the same block and address with the same bytes; otherwise a page whose data
//! equals the template's page at that address, or any template page with the same content
//! (found by hash, then compared), is copied without its header. Copies are only ever made
//! of bytes compared equal while encoding.
//!
//! # The delta file
//!
//! | bytes  | what                                                                  |
//! |--------|-----------------------------------------------------------------------|
//! | 0..8   | magic `HGDELTA1`                                                      |
//! | 8..16  | length of the original stream (little endian, like every field here) |
//! | 16..24 | XXH64 (seed 0) of the original stream                                 |
//! | 24..32 | length of the template file                                           |
//! | 32..40 | XXH64 of the template file ([`TemplateIndex::fingerprint`])           |
//! | 40..48 | XXH64 of bytes 0..40                                                  |
//! | 48..64 | zero (reserved)                                                       |
//! | 64..   | one zstd frame (with its content checksum) of operations              |
//!
//! Operations: `0x01 len bytes` (literal), `0x02 zigzag(offset - end of previous copy) len`
//! (copy from the template), `0x00` (end); numbers are LEB128. The header is written last,
//! so a file cut short while encoding has no valid magic.
//!
//! # Integrity
//!
//! [`decode`] checks the template's length before it writes anything, and the length and
//! checksum of what it wrote when it reaches the end (and zstd checks the frame's checksum):
//! a truncated or corrupted delta, or a template that changed, is an error after the last
//! byte at the latest. Fed to QEMU's `migrate-incoming`, that error fails the restore (see
//! `qemu::incoming`, which checks the feed's result before resuming the VM). [`verify`]
//! decodes into nothing, for a check right after writing. XXH64 rather than SHA-256: these
//! machines have no SHA instructions and a software SHA-256 of a 256 MiB guest would cost
//! most of a second of every wake; the checksum guards against accidents, not attackers.
//!
//! # Template index
//!
//! [`TemplateIndex::build`] reads the whole template once (block, page address → record and
//! data offsets; page content hash → data offset; the file's fingerprint). It holds about
//! 32 bytes per template page and is not stored: building it costs one sequential read and
//! hash of the template, less than the encode it serves. Only [`encode`] needs it.
//!
//! # Measured (`tests/delta.rs`, http-counter guest with 256 MiB, optimised build, TCG host)
//!
//! | what                                | size     | time   |
//! |-------------------------------------|----------|--------|
//! | template raw stream                 | 70.4 MB  |        |
//! | clone raw / zstd -1                 | 70.4 MB / 17.8 MB | zstd: 0.73 s |
//! | clone delta (16720 pages copied, 316 literal, 48519 zero) | 0.14 MB (0.8% of zstd) | 0.12 s |
//! | template index                      |          | 0.11 s |
//! | decode (verify: into nothing)       |          | 0.05 s |

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Guest page size (x86: `TARGET_PAGE_SIZE`).
pub(crate) const PAGE_SIZE: usize = 4096;
/// The flag bits of a RAM record header.
pub(crate) const FLAGS_MASK: u64 = PAGE_SIZE as u64 - 1;

pub(crate) const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
pub(crate) const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
pub(crate) const FLAG_CONTINUE: u64 = 0x20;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FOOTER: u8 = 0x7e;
/// `version_id` of the `ram` section in QEMU 7.2.
const RAM_VERSION: u32 = 4;

/// How far into the stream the start of the RAM section is looked for.
const PREAMBLE_LIMIT: usize = 256 << 10;
/// Read buffer, literal batches, template window and copy chunks.
const BUFFER: usize = 1 << 20;
/// A page address past this (256 GiB) is not indexed.
const MAX_PAGES: u64 = 1 << 26;

/// zstd level: as in the `zstd` tier, fast enough not to slow the migration.
const ZSTD_LEVEL: i32 = 1;

const MAGIC: &[u8; 8] = b"HGDELTA1";
/// Length of the fixed header at the start of a delta file.
pub const HEADER_LEN: usize = 64;

const OP_END: u8 = 0x00;
const OP_LITERAL: u8 = 0x01;
const OP_COPY: u8 = 0x02;

/// What [`encode`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Length of the original stream.
    pub stream_bytes: u64,
    /// RAM page records (`PAGE` and `ZERO`).
    pub pages_total: u64,
    /// `PAGE` records whose data was copied from the template.
    pub pages_referenced: u64,
    /// Of those, the ones found at another address of the template (by content).
    pub pages_relocated: u64,
    /// `PAGE` records stored literally.
    pub pages_literal: u64,
    /// `ZERO` records (copied or literal: 9 bytes each either way).
    pub pages_zero: u64,
    /// Stream bytes stored literally (before zstd).
    pub literal_bytes: u64,
    /// Stream bytes copied from the template.
    pub copied_bytes: u64,
    /// Size of the delta file.
    pub output_bytes: u64,
}

/// The fixed header of a delta file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHeader {
    pub stream_len: u64,
    pub stream_xxh64: u64,
    pub template_len: u64,
    /// [`TemplateIndex::fingerprint`] of the template the delta refers to.
    pub template_xxh64: u64,
}

impl DeltaHeader {
    /// The header as it is written at the start of a delta file (magic, fields, checksum).
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        header_bytes(
            MAGIC,
            [
                self.stream_len,
                self.stream_xxh64,
                self.template_len,
                self.template_xxh64,
            ],
        )
    }

    fn from_bytes(bytes: &[u8; HEADER_LEN]) -> io::Result<Self> {
        let [stream_len, stream_xxh64, template_len, template_xxh64] =
            header_words(bytes, MAGIC, "delta")?;
        Ok(Self {
            stream_len,
            stream_xxh64,
            template_len,
            template_xxh64,
        })
    }
}

/// A 64-byte archive header: `magic`, four little-endian words, the XXH64 of those 40
/// bytes, zeros (the delta and sparse formats share it).
pub(crate) fn header_bytes(magic: &[u8; 8], words: [u64; 4]) -> [u8; HEADER_LEN] {
    let mut bytes = [0u8; HEADER_LEN];
    bytes[..8].copy_from_slice(magic);
    for (i, word) in words.iter().enumerate() {
        bytes[8 + i * 8..16 + i * 8].copy_from_slice(&word.to_le_bytes());
    }
    let check = xxh64(&bytes[..40]);
    bytes[40..48].copy_from_slice(&check.to_le_bytes());
    bytes
}

/// The four words of a header written by [`header_bytes`] with `magic`; an error naming
/// `what` archive when the magic or the checksum is wrong.
pub(crate) fn header_words(
    bytes: &[u8; HEADER_LEN],
    magic: &[u8; 8],
    what: &str,
) -> io::Result<[u64; 4]> {
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if &bytes[..8] != magic {
        return Err(invalid(format!("not a {what} archive (bad magic)")));
    }
    if word(40) != xxh64(&bytes[..40]) {
        return Err(invalid(format!("{what} header checksum mismatch")));
    }
    Ok([word(8), word(16), word(24), word(32)])
}

pub(crate) fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Where a template page lives in the template file.
#[derive(Debug, Clone, Copy)]
struct PageLoc {
    /// Offset of the record (its header).
    record: u64,
    /// Offset of the 4096 data bytes; [`NO_DATA`] for a `ZERO` record.
    data: u64,
}

const NO_DATA: u64 = u64::MAX;
const NO_PAGE: PageLoc = PageLoc {
    record: u64::MAX,
    data: NO_DATA,
};

/// The pages of a raw template stream, by (RAM block, page address) and by content.
#[derive(Debug, Clone)]
pub struct TemplateIndex {
    blocks: HashMap<Vec<u8>, Vec<PageLoc>>,
    by_content: HashMap<u64, u64>,
    template_len: u64,
    fingerprint: u64,
    pages: u64,
}

impl TemplateIndex {
    /// Reads the raw template stream at `raw_template` and indexes its pages.
    pub fn build(raw_template: &Path) -> io::Result<Self> {
        let file = File::open(raw_template)?;
        let mut input = Input::new(BufReader::with_capacity(BUFFER, file));
        let mut index = Self {
            blocks: HashMap::new(),
            by_content: HashMap::new(),
            template_len: 0,
            fingerprint: 0,
            pages: 0,
        };
        parse(&mut input, &mut |event| {
            if let Event::Record(record) = event {
                index.add(&record);
            }
            Ok(())
        })?;
        index.template_len = input.consumed;
        index.fingerprint = input.checksum.digest();
        Ok(index)
    }

    fn add(&mut self, record: &Record<'_>) {
        let page = record.addr / PAGE_SIZE as u64;
        if page >= MAX_PAGES {
            return;
        }
        let data = if record.zero {
            NO_DATA
        } else {
            let data = record.offset + record.header_len as u64;
            self.by_content
                .entry(xxh64(&record.bytes[record.header_len..]))
                .or_insert(data);
            data
        };
        let pages = self.blocks.entry(record.block.to_vec()).or_default();
        let page = usize::try_from(page).expect("page index fits");
        if pages.len() <= page {
            pages.resize(page + 1, NO_PAGE);
        }
        // A page sent again later in the stream holds the final content: the last one wins.
        pages[page] = PageLoc {
            record: record.offset,
            data,
        };
        self.pages += 1;
    }

    fn lookup(&self, block: &[u8], addr: u64) -> Option<PageLoc> {
        let pages = self.blocks.get(block)?;
        let page = usize::try_from(addr / PAGE_SIZE as u64).ok()?;
        pages
            .get(page)
            .copied()
            .filter(|loc| loc.record != u64::MAX)
    }

    /// Length of the template file.
    pub fn template_len(&self) -> u64 {
        self.template_len
    }

    /// XXH64 of the template file: deltas record it (see [`DeltaHeader::template_xxh64`]).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Page records indexed.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

/// Reads a VM's migration stream from `stream` (until end of file) and writes it to `out` as
/// a delta against `template` (indexed by `index`), synced. On error `out` may hold a partial
/// file without a valid header: the caller removes it.
pub fn encode(
    mut stream: impl Read,
    template: &Path,
    index: &TemplateIndex,
    out: &Path,
) -> io::Result<DeltaStats> {
    encode_from(&mut stream, template, index, out)
}

/// [`encode`], compiled once (here, optimised with this crate) rather than for each reader.
fn encode_from(
    stream: &mut dyn Read,
    template: &Path,
    index: &TemplateIndex,
    out: &Path,
) -> io::Result<DeltaStats> {
    let template_file = File::open(template)?;
    let template_len = template_file.metadata()?.len();
    if template_len != index.template_len {
        return Err(invalid(format!(
            "{} is {template_len} bytes, its index says {}",
            template.display(),
            index.template_len
        )));
    }
    let mut file = File::create(out)?;
    file.write_all(&[0u8; HEADER_LEN])?;
    let mut compressor = zstd::Encoder::new(BufWriter::with_capacity(BUFFER, file), ZSTD_LEVEL)?;
    compressor.include_checksum(true)?;
    let mut ops = OpWriter::new(compressor);
    let mut template = TemplateReader::new(template_file, template_len);
    let mut input = Input::new(stream);
    let mut stats = DeltaStats::default();
    parse(&mut input, &mut |event| match event {
        Event::Literal(bytes) | Event::Tail(bytes) => {
            stats.literal_bytes += bytes.len() as u64;
            ops.literal(bytes)
        }
        Event::Record(record) => encode_record(&record, index, &mut template, &mut ops, &mut stats),
    })?;
    let file = ops
        .finish()?
        .finish()?
        .into_inner()
        .map_err(|err| err.into_error())?;
    let header = DeltaHeader {
        stream_len: input.consumed,
        stream_xxh64: input.checksum.digest(),
        template_len,
        template_xxh64: index.fingerprint,
    };
    file.write_all_at(&header.to_bytes(), 0)?;
    file.sync_all()?;
    stats.stream_bytes = input.consumed;
    stats.output_bytes = file.metadata()?.len();
    Ok(stats)
}

fn encode_record<W: Write>(
    record: &Record<'_>,
    index: &TemplateIndex,
    template: &mut TemplateReader,
    ops: &mut OpWriter<W>,
    stats: &mut DeltaStats,
) -> io::Result<()> {
    let bytes = record.bytes;
    stats.pages_total += 1;
    if record.zero {
        stats.pages_zero += 1;
    }
    let loc = index.lookup(record.block, record.addr);
    // The whole record, header included, as the template has it.
    if let Some(loc) = loc
        && template.window(loc.record, bytes.len())? == Some(bytes)
    {
        if !record.zero {
            stats.pages_referenced += 1;
        }
        stats.copied_bytes += bytes.len() as u64;
        return ops.copy(loc.record, bytes.len() as u64);
    }
    let (header, data) = bytes.split_at(record.header_len);
    let mut found = None;
    if !record.zero {
        if let Some(loc) = loc
            && loc.data != NO_DATA
            && template.window(loc.data, PAGE_SIZE)? == Some(data)
        {
            found = Some(loc.data);
        } else if let Some(&offset) = index.by_content.get(&xxh64(data))
            && template.scattered(offset, PAGE_SIZE)? == Some(data)
        {
            stats.pages_relocated += 1;
            found = Some(offset);
        }
    }
    match found {
        Some(offset) => {
            stats.pages_referenced += 1;
            stats.literal_bytes += header.len() as u64;
            stats.copied_bytes += PAGE_SIZE as u64;
            ops.literal(header)?;
            ops.copy(offset, PAGE_SIZE as u64)
        }
        None => {
            if !record.zero {
                stats.pages_literal += 1;
            }
            stats.literal_bytes += bytes.len() as u64;
            ops.literal(bytes)
        }
    }
}

/// Reads the header of the delta file at `delta`.
pub fn read_header(delta: &Path) -> io::Result<DeltaHeader> {
    let mut header = [0u8; HEADER_LEN];
    File::open(delta)?
        .read_exact(&mut header)
        .map_err(truncated)?;
    DeltaHeader::from_bytes(&header)
}

/// Rebuilds the original stream from `delta` and `template` into `sink`, streaming (about
/// 3 MiB of buffers). Returns the stream's length. Fails, possibly after writing everything,
/// when the delta is truncated or corrupted or the template is not the one it was made
/// against.
pub fn decode(delta: &Path, template: &Path, mut sink: impl Write) -> io::Result<u64> {
    decode_into(delta, template, &mut sink)
}

/// [`decode`], compiled once rather than for each sink.
fn decode_into(delta: &Path, template: &Path, sink: &mut dyn Write) -> io::Result<u64> {
    let mut file = File::open(delta)?;
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header).map_err(truncated)?;
    let header = DeltaHeader::from_bytes(&header)?;
    let template_file = File::open(template)?;
    let template_len = template_file.metadata()?.len();
    if template_len != header.template_len {
        return Err(invalid(format!(
            "{} is {template_len} bytes, the delta was made against {} bytes",
            template.display(),
            header.template_len
        )));
    }
    let mut ops = BufReader::with_capacity(64 << 10, zstd::Decoder::new(file)?);
    let mut buf = vec![0u8; BUFFER];
    let mut checksum = Xxh64::new();
    let mut written: u64 = 0;
    let mut copy_end: u64 = 0;
    let mut emit = |bytes: &[u8], sink: &mut dyn Write, written: &mut u64| -> io::Result<()> {
        *written += bytes.len() as u64;
        if *written > header.stream_len {
            return Err(invalid("delta decodes to more than the original stream"));
        }
        checksum.update(bytes);
        sink.write_all(bytes)
    };
    loop {
        let mut tag = [0u8];
        ops.read_exact(&mut tag).map_err(truncated)?;
        match tag[0] {
            OP_END => break,
            OP_LITERAL => {
                let mut left = read_varint(&mut ops)?;
                while left > 0 {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    ops.read_exact(&mut buf[..n]).map_err(truncated)?;
                    emit(&buf[..n], sink, &mut written)?;
                    left -= n as u64;
                }
            }
            OP_COPY => {
                let delta = unzigzag(read_varint(&mut ops)?);
                let len = read_varint(&mut ops)?;
                let mut offset = copy_end
                    .checked_add_signed(delta)
                    .filter(|offset| {
                        offset
                            .checked_add(len)
                            .is_some_and(|end| end <= template_len)
                    })
                    .ok_or_else(|| invalid("delta copies from outside the template"))?;
                copy_end = offset + len;
                while offset < copy_end {
                    let n = usize::try_from(copy_end - offset)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    template_file.read_exact_at(&mut buf[..n], offset)?;
                    emit(&buf[..n], sink, &mut written)?;
                    offset += n as u64;
                }
            }
            other => return Err(invalid(format!("unknown delta operation {other:#04x}"))),
        }
    }
    // Reading to the end of the frame makes zstd check its checksum.
    let mut rest = [0u8; 1];
    if ops.read(&mut rest).map_err(truncated)? != 0 {
        return Err(invalid("data after the end of the delta"));
    }
    if written != header.stream_len || checksum.digest() != header.stream_xxh64 {
        return Err(invalid(format!(
            "decoded stream differs from the original ({written} of {} bytes, checksum {})",
            header.stream_len,
            if checksum.digest() == header.stream_xxh64 {
                "matches"
            } else {
                "differs"
            }
        )));
    }
    sink.flush()?;
    Ok(written)
}

/// Decodes `delta` against `template` without keeping the result: checks that it rebuilds
/// the stream it was made from. Returns its header.
pub fn verify(delta: &Path, template: &Path) -> io::Result<DeltaHeader> {
    decode(delta, template, io::sink())?;
    read_header(delta)
}

fn truncated(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        invalid("delta is truncated")
    } else {
        err
    }
}

// --- operations -------------------------------------------------------------------------

/// Writes operations, merging adjacent literals and adjacent copies.
struct OpWriter<W: Write> {
    out: W,
    literal: Vec<u8>,
    /// A copy not written yet: (template offset, length).
    copy: Option<(u64, u64)>,
    copy_end: u64,
}

impl<W: Write> OpWriter<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            literal: Vec::with_capacity(BUFFER),
            copy: None,
            copy_end: 0,
        }
    }

    fn literal(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.flush_copy()?;
        self.literal.extend_from_slice(bytes);
        if self.literal.len() >= BUFFER {
            self.flush_literal()?;
        }
        Ok(())
    }

    fn copy(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.flush_literal()?;
        match &mut self.copy {
            Some((start, pending)) if *start + *pending == offset => *pending += len,
            _ => {
                self.flush_copy()?;
                self.copy = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush_literal(&mut self) -> io::Result<()> {
        if !self.literal.is_empty() {
            let mut op = vec![OP_LITERAL];
            put_varint(&mut op, self.literal.len() as u64);
            self.out.write_all(&op)?;
            self.out.write_all(&self.literal)?;
            self.literal.clear();
        }
        Ok(())
    }

    fn flush_copy(&mut self) -> io::Result<()> {
        if let Some((offset, len)) = self.copy.take() {
            let mut op = vec![OP_COPY];
            put_varint(&mut op, zigzag(offset.wrapping_sub(self.copy_end) as i64));
            put_varint(&mut op, len);
            self.out.write_all(&op)?;
            self.copy_end = offset + len;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.flush_literal()?;
        self.flush_copy()?;
        self.out.write_all(&[OP_END])?;
        Ok(self.out)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(input: &mut impl Read) -> io::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8];
        input.read_exact(&mut byte).map_err(truncated)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(invalid("delta has an overlong number"))
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

// --- template reads ---------------------------------------------------------------------

/// Positional reads of the template: a window for the (mostly sequential) same-address
/// lookups, a page buffer for lookups by content.
struct TemplateReader {
    file: File,
    len: u64,
    window: Vec<u8>,
    window_at: u64,
    window_len: usize,
    page: Vec<u8>,
}

impl TemplateReader {
    fn new(file: File, len: u64) -> Self {
        Self {
            file,
            len,
            window: vec![0; BUFFER],
            window_at: 0,
            window_len: 0,
            page: vec![0; PAGE_SIZE],
        }
    }

    fn in_file(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.len)
    }

    /// `len` bytes at `offset` through the window (moved there when they are outside it).
    fn window(&mut self, offset: u64, len: usize) -> io::Result<Option<&[u8]>> {
        if !self.in_file(offset, len) || len > self.window.len() {
            return Ok(None);
        }
        let inside = offset >= self.window_at
            && offset + len as u64 <= self.window_at + self.window_len as u64;
        if !inside {
            let n = usize::try_from(self.len - offset)
                .unwrap_or(usize::MAX)
                .min(self.window.len());
            self.file.read_exact_at(&mut self.window[..n], offset)?;
            self.window_at = offset;
            self.window_len = n;
        }
        let start = usize::try_from(offset - self.window_at).expect("inside the window");
        Ok(Some(&self.window[start..start + len]))
    }

    /// One page at `offset`, leaving the window where it is.
    fn scattered(&mut self, offset: u64, len: usize) -> io::Result<Option<&[u8]>> {
        if !self.in_file(offset, len) || len > self.page.len() {
            return Ok(None);
        }
        self.file.read_exact_at(&mut self.page[..len], offset)?;
        Ok(Some(&self.page[..len]))
    }
}

// --- stream parsing ---------------------------------------------------------------------

/// A buffered reader that checksums and counts what its user consumes.
pub(crate) struct Input<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    checksum: Xxh64,
    pub(crate) consumed: u64,
}

impl<R: Read> Input<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
            eof: false,
            checksum: Xxh64::new(),
            consumed: 0,
        }
    }

    /// Buffers at least `n` bytes (at most the buffer's size) unless the stream ends first.
    /// Returns how many are buffered.
    fn fill(&mut self, n: usize) -> io::Result<usize> {
        let n = n.min(self.buf.len());
        while self.end - self.start < n && !self.eof {
            if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(read) => self.end += read,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(self.end - self.start)
    }

    fn peek(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.checksum.update(&self.buf[self.start..self.start + n]);
        self.start += n;
        self.consumed += n as u64;
    }
}

/// A RAM page record of the stream.
pub(crate) struct Record<'a> {
    /// Offset of the record in the stream.
    pub(crate) offset: u64,
    /// The record's RAM block: named in the record, or the previous record's (`CONTINUE`).
    pub(crate) block: &'a [u8],
    pub(crate) addr: u64,
    pub(crate) zero: bool,
    /// Header bytes (8, or 9 + the block name's length without `CONTINUE`).
    pub(crate) header_len: usize,
    /// The whole record: header and payload (4096 bytes, or the fill byte of a `ZERO`).
    pub(crate) bytes: &'a [u8],
}

impl Record<'_> {
    /// Whether the header has `CONTINUE` (no block name: the previous record's block).
    pub(crate) fn continues(&self) -> bool {
        self.header_len == 8
    }
}

pub(crate) enum Event<'a> {
    /// Bytes carried as they are, before or between RAM records.
    Literal(&'a [u8]),
    Record(Record<'a>),
    /// Bytes carried as they are after the last RAM record understood (device state, end
    /// of file, or whatever was not understood: possibly more RAM records).
    Tail(&'a [u8]),
}

/// How a run of RAM records ended.
enum Flow {
    /// `EOS`: the section's data is complete.
    EndOfSection,
    /// Something not understood (or the end of the stream): the rest is literal.
    Stop,
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

pub(crate) type Handler<'h> = dyn FnMut(Event<'_>) -> io::Result<()> + 'h;

/// Reads the whole stream, reporting every byte once, in order: as literal bytes or as part
/// of a page record.
pub(crate) fn parse<R: Read>(input: &mut Input<R>, on: &mut Handler<'_>) -> io::Result<()> {
    if let Some(section_id) = find_ram_start(input, on)? {
        let mut block = Vec::new();
        loop {
            if let Flow::Stop = ram_records(input, on, &mut block)? {
                break;
            }
            let same_section = |input: &Input<R>, kinds: &[u8]| {
                let bytes = input.peek();
                bytes.len() >= 5 && kinds.contains(&bytes[0]) && be32(&bytes[1..]) == section_id
            };
            input.fill(5)?;
            if same_section(input, &[SECTION_FOOTER]) {
                literal(input, on, 5)?;
                input.fill(5)?;
            }
            if !same_section(input, &[SECTION_PART, SECTION_END]) {
                break;
            }
            literal(input, on, 5)?;
        }
    }
    // The tail: device state, end of file, or whatever was not understood.
    loop {
        let n = input.fill(BUFFER)?;
        if n == 0 {
            return Ok(());
        }
        on(Event::Tail(&input.peek()[..n]))?;
        input.consume(n);
    }
}

fn literal<R: Read>(input: &mut Input<R>, on: &mut Handler<'_>, n: usize) -> io::Result<()> {
    on(Event::Literal(&input.peek()[..n]))?;
    input.consume(n);
    Ok(())
}

/// Finds the header of the RAM section's start and reports everything up to its end as
/// literal. Returns the section id, or `None` (nothing consumed) when it is not found near
/// the start of the stream.
fn find_ram_start<R: Read>(input: &mut Input<R>, on: &mut Handler<'_>) -> io::Result<Option<u32>> {
    // type, section id, idstr length and "ram", instance id, version id
    const LEN: usize = 1 + 4 + 4 + 4 + 4;
    let is_start = |bytes: &[u8]| {
        bytes[0] == SECTION_START && &bytes[5..9] == b"\x03ram" && be32(&bytes[13..]) == RAM_VERSION
    };
    let mut at = 0;
    while at < PREAMBLE_LIMIT {
        if input.fill(at + LEN)? < at + LEN {
            return Ok(None);
        }
        if is_start(&input.peek()[at..]) {
            let section_id = be32(&input.peek()[at + 1..]);
            literal(input, on, at + LEN)?;
            return Ok(Some(section_id));
        }
        at += 1;
    }
    Ok(None)
}

/// Reads RAM records up to and including `EOS`. `block` is the block of the last page
/// record (it carries over sections: QEMU's `last_sent_block` does).
fn ram_records<R: Read>(
    input: &mut Input<R>,
    on: &mut Handler<'_>,
    block: &mut Vec<u8>,
) -> io::Result<Flow> {
    loop {
        if input.fill(8)? < 8 {
            return Ok(Flow::Stop);
        }
        let header = be64(input.peek());
        let flags = header & FLAGS_MASK;
        let addr = header & !FLAGS_MASK;
        match flags {
            FLAG_EOS => {
                literal(input, on, 8)?;
                return Ok(Flow::EndOfSection);
            }
            FLAG_MEM_SIZE => {
                // The total, then each block: name length, name, used length.
                literal(input, on, 8)?;
                let mut listed: u64 = 0;
                while listed < addr {
                    if input.fill(1)? < 1 {
                        return Ok(Flow::Stop);
                    }
                    let len = 1 + usize::from(input.peek()[0]) + 8;
                    if input.fill(len)? < len {
                        return Ok(Flow::Stop);
                    }
                    let used = be64(&input.peek()[len - 8..]);
                    literal(input, on, len)?;
                    listed = match listed.checked_add(used) {
                        Some(listed) => listed,
                        None => return Ok(Flow::Stop),
                    };
                }
            }
            _ if matches!(flags & !FLAG_CONTINUE, FLAG_PAGE | FLAG_ZERO) => {
                let zero = flags & FLAG_ZERO != 0;
                let header_len = if flags & FLAG_CONTINUE != 0 {
                    if block.is_empty() {
                        return Ok(Flow::Stop);
                    }
                    8
                } else {
                    if input.fill(9)? < 9 {
                        return Ok(Flow::Stop);
                    }
                    let len = 9 + usize::from(input.peek()[8]);
                    if input.fill(len)? < len {
                        return Ok(Flow::Stop);
                    }
                    block.clear();
                    block.extend_from_slice(&input.peek()[9..len]);
                    len
                };
                let len = header_len + if zero { 1 } else { PAGE_SIZE };
                if input.fill(len)? < len {
                    return Ok(Flow::Stop);
                }
                on(Event::Record(Record {
                    offset: input.consumed,
                    block: block.as_slice(),
                    addr,
                    zero,
                    header_len,
                    bytes: &input.peek()[..len],
                }))?;
                input.consume(len);
            }
            // XBZRLE, compressed pages, hooks, multifd, ...: not understood.
            _ => return Ok(Flow::Stop),
        }
    }
}

// --- XXH64 ------------------------------------------------------------------------------

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// Streaming XXH64 with seed 0 (the checksum zstd frames carry, in their low 32 bits).
#[derive(Debug, Clone)]
/// XXH64 (seed 0), streaming.
pub(crate) struct Xxh64 {
    lanes: [u64; 4],
    pending: [u8; 32],
    pending_len: usize,
    total: u64,
}

fn xxh64_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn le64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

pub(crate) fn xxh64(bytes: &[u8]) -> u64 {
    let mut hasher = Xxh64::new();
    hasher.update(bytes);
    hasher.digest()
}

impl Xxh64 {
    pub(crate) fn new() -> Self {
        Self {
            lanes: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            pending: [0; 32],
            pending_len: 0,
            total: 0,
        }
    }

    fn stripe(lanes: &mut [u64; 4], stripe: &[u8]) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane = xxh64_round(*lane, le64(&stripe[i * 8..]));
        }
    }

    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (32 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 32 {
                return;
            }
            Self::stripe(&mut self.lanes, &self.pending);
            self.pending_len = 0;
        }
        let mut stripes = bytes.chunks_exact(32);
        for stripe in &mut stripes {
            Self::stripe(&mut self.lanes, stripe);
        }
        let rest = stripes.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    pub(crate) fn digest(&self) -> u64 {
        let [v1, v2, v3, v4] = self.lanes;
        let mut hash = if self.total >= 32 {
            let mut hash = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            for lane in self.lanes {
                hash = (hash ^ xxh64_round(0, lane))
                    .wrapping_mul(P1)
                    .wrapping_add(P4);
            }
            hash
        } else {
            P5
        };
        hash = hash.wrapping_add(self.total);
        let mut rest = &self.pending[..self.pending_len];
        while rest.len() >= 8 {
            hash ^= xxh64_round(0, le64(rest));
            hash = hash.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let word = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            hash ^= u64::from(word).wrapping_mul(P1);
            hash = hash.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &byte in rest {
            hash ^= u64::from(byte).wrapping_mul(P5);
            hash = hash.rotate_left(11).wrapping_mul(P1);
        }
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(P2);
        hash ^= hash >> 29;
        hash = hash.wrapping_mul(P3);
        hash ^ (hash >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's RAM: blocks of pages, `None` for a zero page.
    #[derive(Clone)]
    struct Guest {
        blocks: Vec<(String, Vec<Option<Vec<u8>>>)>,
    }

    /// A page of pseudo-random content determined by `seed`.
    fn page(seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(P1) ^ P5;
        (0..PAGE_SIZE)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Mostly small values, so zstd finds something to compress.
                (state % 7) as u8
            })
            .collect()
    }

    fn guest(seed: u64) -> Guest {
        let ram = (0..64)
            .map(|i| (i % 5 != 3).then(|| page(seed * 1000 + i)))
            .collect();
        let rom = (0..4).map(|i| Some(page(seed * 1000 + 500 + i))).collect();
        Guest {
            blocks: vec![("pc.ram".into(), ram), ("/rom@etc/acpi/tables".into(), rom)],
        }
    }

    /// Writes streams as QEMU 7.2 does.
    struct Stream {
        bytes: Vec<u8>,
        last_block: Option<usize>,
    }

    const SECTION_ID: u32 = 2;

    impl Stream {
        fn new() -> Self {
            let mut bytes = Vec::new();
            bytes.extend(0x5145_564d_u32.to_be_bytes());
            bytes.extend(3u32.to_be_bytes());
            // Configuration section: type, then a vmstate with the machine type.
            bytes.push(0x07);
            bytes.extend(8u32.to_be_bytes());
            bytes.extend(b"microvm\0");
            Self {
                bytes,
                last_block: None,
            }
        }

        fn section_start(&mut self, guest: &Guest) {
            self.bytes.push(SECTION_START);
            self.bytes.extend(SECTION_ID.to_be_bytes());
            self.bytes.extend(b"\x03ram");
            self.bytes.extend(0u32.to_be_bytes());
            self.bytes.extend(RAM_VERSION.to_be_bytes());
            let total: u64 = guest
                .blocks
                .iter()
                .map(|(_, pages)| (pages.len() * PAGE_SIZE) as u64)
                .sum();
            self.bytes.extend((total | FLAG_MEM_SIZE).to_be_bytes());
            for (name, pages) in &guest.blocks {
                self.bytes.push(name.len() as u8);
                self.bytes.extend(name.as_bytes());
                self.bytes
                    .extend(((pages.len() * PAGE_SIZE) as u64).to_be_bytes());
            }
        }

        fn section(&mut self, kind: u8) {
            self.bytes.push(kind);
            self.bytes.extend(SECTION_ID.to_be_bytes());
        }

        fn end_of_section(&mut self) {
            self.bytes.extend(FLAG_EOS.to_be_bytes());
            self.bytes.push(SECTION_FOOTER);
            self.bytes.extend(SECTION_ID.to_be_bytes());
        }

        fn record(&mut self, guest: &Guest, block: usize, index: usize) {
            let (name, pages) = &guest.blocks[block];
            let mut header = (index * PAGE_SIZE) as u64;
            header |= if pages[index].is_some() {
                FLAG_PAGE
            } else {
                FLAG_ZERO
            };
            let same = self.last_block == Some(block);
            if same {
                header |= FLAG_CONTINUE;
            }
            self.bytes.extend(header.to_be_bytes());
            if !same {
                self.bytes.push(name.len() as u8);
                self.bytes.extend(name.as_bytes());
            }
            match &pages[index] {
                Some(data) => self.bytes.extend(data),
                None => self.bytes.push(0),
            }
            self.last_block = Some(block);
        }

        fn tail(&mut self) {
            // A device section (FULL), then EOF.
            self.bytes.push(0x04);
            self.bytes.extend(3u32.to_be_bytes());
            self.bytes.extend(b"\x06timer\0\0\0\0\0\0\0\x01");
            self.bytes.extend([0x12; 40]);
            self.bytes.push(SECTION_FOOTER);
            self.bytes.extend(3u32.to_be_bytes());
            self.bytes.push(0x00);
        }
    }

    /// The whole migration of `guest`: all pages, then `resent` pages again in a second
    /// iteration, then an empty final iteration and device state.
    fn stream(guest: &Guest, resent: &[(usize, usize)]) -> Vec<u8> {
        let mut stream = Stream::new();
        stream.section_start(guest);
        stream.end_of_section();
        stream.section(SECTION_PART);
        for (block, (_, pages)) in guest.blocks.iter().enumerate() {
            for index in 0..pages.len() {
                stream.record(guest, block, index);
            }
        }
        stream.end_of_section();
        stream.section(SECTION_PART);
        for &(block, index) in resent {
            stream.record(guest, block, index);
        }
        stream.end_of_section();
        stream.section(SECTION_END);
        stream.end_of_section();
        stream.tail();
        stream.bytes
    }

    struct Encoded {
        _dir: tempfile::TempDir,
        template: std::path::PathBuf,
        delta: std::path::PathBuf,
        stats: DeltaStats,
    }

    /// Encodes `clone` against `template`, checks that it decodes back exactly.
    fn round_trip(template: &[u8], clone: &[u8]) -> Encoded {
        let dir = tempfile::tempdir().unwrap();
        let template_path = dir.path().join("template.raw");
        std::fs::write(&template_path, template).unwrap();
        let index = TemplateIndex::build(&template_path).unwrap();
        assert_eq!(index.template_len(), template.len() as u64);
        assert_eq!(index.fingerprint(), xxh64(template));
        let delta = dir.path().join("memory.delta");
        let stats = encode(clone, &template_path, &index, &delta).unwrap();
        assert_eq!(stats.stream_bytes, clone.len() as u64);
        assert_eq!(stats.output_bytes, std::fs::metadata(&delta).unwrap().len());
        assert_eq!(
            stats.literal_bytes + stats.copied_bytes,
            clone.len() as u64,
            "{stats:?}"
        );
        let mut back = Vec::new();
        assert_eq!(
            decode(&delta, &template_path, &mut back).unwrap(),
            clone.len() as u64
        );
        assert!(back == clone, "decode(encode(x)) differs from x");
        let header = verify(&delta, &template_path).unwrap();
        assert_eq!(header.stream_len, clone.len() as u64);
        assert_eq!(header.template_xxh64, index.fingerprint());
        Encoded {
            _dir: dir,
            template: template_path,
            delta,
            stats,
        }
    }

    fn ram_pages(guest: &Guest) -> (u64, u64) {
        let all = guest.blocks.iter().flat_map(|(_, pages)| pages);
        let total = all.clone().count() as u64;
        let zero = all.filter(|page| page.is_none()).count() as u64;
        (total, zero)
    }

    #[test]
    fn a_clone_of_the_template_is_stored_as_references() {
        let template = guest(1);
        let encoded = round_trip(&stream(&template, &[]), &stream(&template, &[]));
        let (total, zero) = ram_pages(&template);
        let stats = &encoded.stats;
        assert_eq!(stats.pages_total, total);
        assert_eq!(stats.pages_zero, zero);
        assert_eq!(stats.pages_referenced, total - zero);
        assert_eq!(stats.pages_literal, 0);
        assert_eq!(stats.pages_relocated, 0);
        assert!(stats.output_bytes < 400, "{stats:?}");
    }

    #[test]
    fn changed_pages_are_literal_and_the_rest_referenced() {
        let template = guest(1);
        let mut clone = template.clone();
        let ram = &mut clone.blocks[0].1;
        ram[0] = Some(page(77)); // changed
        ram[1].as_mut().unwrap()[100] ^= 1; // one byte changed
        ram[2] = None; // now zero
        ram[3] = Some(page(78)); // was zero
        ram[4] = template.blocks[0].1[10].clone(); // moved
        let encoded = round_trip(&stream(&template, &[]), &stream(&clone, &[]));
        let (total, zero) = ram_pages(&clone);
        let stats = &encoded.stats;
        assert_eq!(stats.pages_total, total);
        assert_eq!(stats.pages_zero, zero);
        assert_eq!(stats.pages_literal, 3, "{stats:?}");
        assert_eq!(stats.pages_relocated, 1, "{stats:?}");
        assert_eq!(stats.pages_referenced, total - zero - 3, "{stats:?}");
        assert!(
            stats.output_bytes < 3 * PAGE_SIZE as u64,
            "only the changed pages are stored: {stats:?}"
        );
    }

    #[test]
    fn block_changes_and_pages_sent_again_in_later_sections() {
        let template = guest(1);
        let mut clone = template.clone();
        clone.blocks[1].1[2] = Some(page(99));
        // The second iteration starts with a page of the block the first one ended with
        // (CONTINUE across sections), then changes block twice.
        let resent = [(1, 3), (0, 7), (0, 9), (1, 0)];
        let encoded = round_trip(&stream(&template, &resent), &stream(&clone, &resent));
        let (total, zero) = ram_pages(&clone);
        let stats = &encoded.stats;
        assert_eq!(stats.pages_total, total + 4);
        assert_eq!(stats.pages_literal, 1, "{stats:?}");
        assert_eq!(stats.pages_referenced, total + 4 - zero - 1, "{stats:?}");

        // Against a template without the second iteration: the pages sent again are found
        // at their address (their header differs: no CONTINUE) or by content.
        let encoded = round_trip(&stream(&template, &[]), &stream(&clone, &resent));
        assert_eq!(encoded.stats.pages_literal, 1, "{:?}", encoded.stats);
        assert_eq!(
            encoded.stats.pages_referenced,
            total + 4 - zero - 1,
            "{:?}",
            encoded.stats
        );
    }

    #[test]
    fn an_unknown_record_carries_the_rest_literally() {
        let template = guest(1);
        let mut clone = Stream::new();
        clone.section_start(&template);
        clone.end_of_section();
        clone.section(SECTION_PART);
        for index in 0..10 {
            clone.record(&template, 0, index);
        }
        // An XBZRLE page: not understood.
        clone
            .bytes
            .extend(((10 * PAGE_SIZE as u64) | 0x40 | FLAG_CONTINUE).to_be_bytes());
        clone.bytes.extend([0, 0, 3, 1, 2, 3]);
        for index in 11..20 {
            clone.record(&template, 0, index);
        }
        clone.end_of_section();
        clone.tail();
        let encoded = round_trip(&stream(&template, &[]), &clone.bytes);
        let stats = &encoded.stats;
        assert_eq!(stats.pages_total, 10, "{stats:?}");
        assert_eq!(stats.pages_referenced, 8, "{stats:?}");
    }

    #[test]
    fn anything_round_trips() {
        let template = stream(&guest(1), &[]);
        let clone = stream(&guest(2), &[(0, 1)]);
        let mut noise = Vec::new();
        for i in 0..50_000u32 {
            noise.extend(xxh64(&i.to_le_bytes()).to_le_bytes());
        }
        for input in [&[][..], b"QEVM", &noise, &template[..100]] {
            round_trip(&template, input);
        }
        // A stream cut anywhere (a migration that failed half way) is still reproduced.
        for cut in [3, 8, 30, 60, 70, 120, 4200, 4300, clone.len() - 1] {
            round_trip(&template, &clone[..cut]);
            round_trip(&template, &template[..cut.min(template.len())]);
        }
        // The template is not a migration stream at all.
        round_trip(&noise, &clone);
    }

    /// Hands out 1 to 7 bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.step = self.step % 7 + 1;
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_reads_change_nothing() {
        let template = stream(&guest(1), &[]);
        let clone = stream(&guest(1), &[(0, 1), (1, 1)]);
        let whole = round_trip(&template, &clone);
        let index = TemplateIndex::build(&whole.template).unwrap();
        let delta = whole.delta.with_extension("trickle");
        let trickle = Trickle {
            data: &clone,
            step: 0,
        };
        let stats = encode(trickle, &whole.template, &index, &delta).unwrap();
        assert_eq!(stats, whole.stats);
        assert_eq!(
            std::fs::read(&delta).unwrap(),
            std::fs::read(&whole.delta).unwrap()
        );
    }

    #[test]
    fn a_truncated_or_corrupted_delta_is_an_error() {
        let template = guest(1);
        let mut clone = template.clone();
        clone.blocks[0].1[5] = Some(page(1234));
        let encoded = round_trip(&stream(&template, &[]), &stream(&clone, &[]));
        let good = std::fs::read(&encoded.delta).unwrap();
        let original = stream(&clone, &[]);
        let bad = encoded.delta.with_extension("bad");
        let decodes = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            let mut out = Vec::new();
            let result = decode(&bad, &encoded.template, &mut out).map(|_| out);
            assert_eq!(
                result.is_ok(),
                verify(&bad, &encoded.template).is_ok(),
                "verify agrees with decode"
            );
            result
        };
        for len in [
            0,
            10,
            HEADER_LEN,
            HEADER_LEN + 5,
            good.len() / 2,
            good.len() - 1,
        ] {
            let err = decodes(&good[..len]).expect_err("truncated");
            assert!(err.to_string().contains("truncated"), "cut at {len}: {err}");
        }
        // A flipped bit is an error, or (in a field nothing reads, such as an unused bit of
        // zstd's frame header) changes nothing: never a different stream.
        let mut harmless = Vec::new();
        let body = (HEADER_LEN..good.len()).filter(|at| at < &(HEADER_LEN + 64) || at % 5 == 0);
        let flips: Vec<usize> = (0..48).chain(body).collect();
        for &at in &flips {
            let mut corrupted = good.clone();
            corrupted[at] ^= 0x10;
            if let Ok(out) = decodes(&corrupted) {
                assert!(
                    out == original,
                    "byte {at} flipped decodes to another stream"
                );
                harmless.push(at);
            }
        }
        assert!(
            harmless.len() * 20 < flips.len(),
            "flips that decode: {harmless:?} of {}",
            flips.len()
        );
        let mut longer = good.clone();
        longer.extend(b"more");
        assert!(decodes(&longer).is_err());
        assert!(decodes(&good).unwrap() == original);
    }

    #[test]
    fn another_template_is_an_error() {
        let template = guest(1);
        let encoded = round_trip(&stream(&template, &[]), &stream(&template, &[]));
        // Same length, one referenced page changed.
        let mut other = template.clone();
        other.blocks[0].1[20] = Some(page(4321));
        std::fs::write(&encoded.template, stream(&other, &[])).unwrap();
        let err = decode(&encoded.delta, &encoded.template, io::sink()).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        // Another length: refused before anything is written.
        std::fs::write(&encoded.template, stream(&other, &[(0, 0)])).unwrap();
        let mut out = Vec::new();
        let err = decode(&encoded.delta, &encoded.template, &mut out).unwrap_err();
        assert!(out.is_empty());
        assert!(err.to_string().contains("bytes"), "{err}");
        // encode checks that the index belongs to the template.
        let index = TemplateIndex::build(&encoded.template).unwrap();
        std::fs::write(&encoded.template, stream(&template, &[])).unwrap();
        let err = encode(&b"x"[..], &encoded.template, &index, &encoded.delta).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn xxh64_matches_the_reference() {
        assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc"), 0x44BC_2CF5_AD77_0999);
        // zstd's frame checksum is the low 32 bits of XXH64 of the content.
        for len in [0, 5, 31, 32, 33, 100, 4096, 100_003] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut encoder = zstd::Encoder::new(Vec::new(), 1).unwrap();
            encoder.include_checksum(true).unwrap();
            encoder.write_all(&data).unwrap();
            let frame = encoder.finish().unwrap();
            let stored = u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap());
            assert_eq!(stored, xxh64(&data) as u32, "{len} bytes");
            // Streaming in uneven pieces gives the same digest.
            let mut hasher = Xxh64::new();
            for piece in data.chunks(13) {
                hasher.update(piece);
            }
            assert_eq!(hasher.digest(), xxh64(&data));
        }
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            assert_eq!(read_varint(&mut &bytes[..]).unwrap(), value);
        }
        for value in [0, 1, -1, 4104, -4104, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
    }
}
