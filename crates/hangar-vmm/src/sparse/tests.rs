use std::collections::HashMap;
use std::path::PathBuf;

use super::*;
use crate::delta::{FLAG_PAGE, FLAG_ZERO};

const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_EOS: u64 = 0x10;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
pub(crate) const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_FOOTER: u8 = 0x7e;
const EOF: u8 = 0x00;
const RAM_SECTION: u32 = 2;
const RAM_ID: u64 = 0x5eed;

/// A small deterministic random source (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A page of pseudo-random content determined by `seed`.
pub(crate) fn page(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B1_85EB_CA87) | 1);
    (0..PAGE_SIZE).map(|_| (rng.next() % 7) as u8).collect()
}

/// Writes migration streams as QEMU 7.2 does (see `delta`'s module doc).
pub(crate) struct Builder {
    bytes: Vec<u8>,
    last_block: Option<String>,
}

impl Builder {
    /// File header and configuration section, then the RAM section's start with the
    /// block list (`blocks`: name, length).
    pub(crate) fn new(blocks: &[(&str, u64)]) -> Self {
        let mut bytes = Vec::new();
        bytes.extend(b"QEVM");
        bytes.extend(3u32.to_be_bytes());
        bytes.push(0x07);
        bytes.extend(8u32.to_be_bytes());
        bytes.extend(b"microvm\0");
        bytes.push(SECTION_START);
        bytes.extend(RAM_SECTION.to_be_bytes());
        bytes.extend(b"\x03ram");
        bytes.extend(0u32.to_be_bytes());
        bytes.extend(4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|(_, len)| len).sum();
        bytes.extend((total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, len) in blocks {
            bytes.push(name.len() as u8);
            bytes.extend(name.as_bytes());
            bytes.extend(len.to_be_bytes());
        }
        let mut builder = Self {
            bytes,
            last_block: None,
        };
        builder.end_of_section();
        builder
    }

    pub(crate) fn section(&mut self, kind: u8) {
        self.bytes.push(kind);
        self.bytes.extend(RAM_SECTION.to_be_bytes());
    }

    pub(crate) fn end_of_section(&mut self) {
        self.bytes.extend(FLAG_EOS.to_be_bytes());
        self.bytes.push(SECTION_FOOTER);
        self.bytes.extend(RAM_SECTION.to_be_bytes());
    }

    /// A `PAGE` record, or a `ZERO` record for `Err(fill)`.
    pub(crate) fn record(&mut self, block: &str, addr: u64, content: Result<&[u8], u8>) {
        let same = self.last_block.as_deref() == Some(block);
        let flags = match content {
            Ok(_) => FLAG_PAGE,
            Err(_) => FLAG_ZERO,
        };
        let continued = if same { FLAG_CONTINUE } else { 0 };
        self.bytes.extend((addr | flags | continued).to_be_bytes());
        if !same {
            self.bytes.push(block.len() as u8);
            self.bytes.extend(block.as_bytes());
        }
        match content {
            Ok(data) => self.bytes.extend(data),
            Err(fill) => self.bytes.push(fill),
        }
        self.last_block = Some(block.to_owned());
    }

    /// A device section (the test format: a length, then the state) with id `id`.
    fn device(&mut self, id: u32, name: &str, state: &[u8]) {
        self.bytes.push(SECTION_FULL);
        self.bytes.extend(id.to_be_bytes());
        self.bytes.push(name.len() as u8);
        self.bytes.extend(name.as_bytes());
        self.bytes.extend(0u32.to_be_bytes());
        self.bytes.extend(1u32.to_be_bytes());
        self.bytes.extend((state.len() as u32).to_be_bytes());
        self.bytes.extend(state);
        self.bytes.push(SECTION_FOOTER);
        self.bytes.extend(id.to_be_bytes());
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.bytes.push(EOF);
        self.bytes
    }
}

/// Guest memory by RAM block.
type Memory = HashMap<String, Vec<u8>>;

/// Loads `stream` into `memory` as QEMU 7.2's loader does (independently of the parser
/// under test): sections, RAM records with the block of a `CONTINUE` record being the
/// previous record's across sections, device sections of [`Builder::device`]'s format.
/// Returns the device states in order.
fn load(stream: &[u8], memory: &mut Memory) -> Result<Vec<(String, Vec<u8>)>, String> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err("stream ends early".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn name(&mut self) -> Result<String, String> {
            let len = self.u8()?;
            Ok(String::from_utf8(self.take(len.into())?.to_vec()).unwrap())
        }
    }
    let mut r = Reader(stream);
    if r.take(8)? != b"QEVM\0\0\0\x03" {
        return Err("bad file header".into());
    }
    if r.u8()? != 0x07 {
        return Err("no configuration section".into());
    }
    let len = r.u32()?;
    r.take(len as usize)?;
    let mut sections: HashMap<u32, String> = HashMap::new();
    let mut devices = Vec::new();
    let mut block: Option<String> = None;
    loop {
        let kind = r.u8()?;
        let id = match kind {
            EOF => {
                return if r.0.is_empty() {
                    Ok(devices)
                } else {
                    Err("bytes after EOF".into())
                };
            }
            SECTION_START | SECTION_FULL => {
                let id = r.u32()?;
                let name = r.name()?;
                r.take(8)?;
                sections.insert(id, name);
                id
            }
            SECTION_PART | SECTION_END => r.u32()?,
            other => return Err(format!("unknown section type {other:#x}")),
        };
        let name = sections.get(&id).ok_or("unknown section id")?.clone();
        if name == "ram" {
            loop {
                let header = r.u64()?;
                let (flags, addr) = (header & FLAGS_MASK, header & !FLAGS_MASK);
                if flags == FLAG_EOS {
                    break;
                }
                if flags == FLAG_MEM_SIZE {
                    let mut listed = 0;
                    while listed < addr {
                        r.name()?;
                        listed += r.u64()?;
                    }
                    continue;
                }
                if flags & FLAG_CONTINUE == 0 {
                    block = Some(r.name()?);
                }
                let name = block.as_ref().ok_or("CONTINUE outside a RAM block")?;
                let ram = memory.get_mut(name).ok_or("unknown RAM block")?;
                let at = addr as usize;
                let target = ram
                    .get_mut(at..at + PAGE_SIZE)
                    .ok_or("page outside its block")?;
                match flags & !FLAG_CONTINUE {
                    FLAG_ZERO => target.fill(r.u8()?),
                    FLAG_PAGE => target.copy_from_slice(r.take(PAGE_SIZE)?),
                    other => return Err(format!("unknown RAM flags {other:#x}")),
                }
            }
        } else {
            let len = r.u32()?;
            devices.push((name, r.take(len as usize)?.to_vec()));
        }
        if r.u8()? != SECTION_FOOTER || r.u32()? != id {
            return Err("bad section footer".into());
        }
    }
}

struct Encoded {
    dir: tempfile::TempDir,
    ram: PathBuf,
    archive: PathBuf,
    sparse: Vec<u8>,
    stats: SparseStats,
}

/// Encodes `stream` against `ram`, decodes it back and checks the header and stats.
fn encode_bytes(stream: &[u8], ram: &[u8]) -> Encoded {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("ram");
    std::fs::write(&ram_path, ram).unwrap();
    let archive = dir.path().join("memory.delta");
    let stats = encode(stream, &ram_path, RAM_ID, &archive).unwrap();
    assert_eq!(stats.stream_bytes, stream.len() as u64);
    assert_eq!(
        stats.pages_total,
        stats.pages_dropped + stats.zero_dropped + stats.pages_kept,
        "{stats:?}"
    );
    assert_eq!(
        stats.output_bytes,
        std::fs::metadata(&archive).unwrap().len()
    );
    let mut sparse = Vec::new();
    let len = decode(&archive, &ram_path, RAM_ID, &mut sparse).unwrap();
    assert_eq!(len, sparse.len() as u64);
    assert_eq!(stats.sparse_bytes, len);
    let header = verify(&archive, &ram_path, RAM_ID).unwrap();
    assert_eq!(
        header,
        SparseHeader {
            sparse_len: len,
            stream_len: stream.len() as u64,
            ram_len: ram.len() as u64,
            ram_id: RAM_ID,
        }
    );
    Encoded {
        dir,
        ram: ram_path,
        archive,
        sparse,
        stats,
    }
}

/// Memory with block `mem` holding `ram` (zero beyond it, up to `mem_len`) and the other
/// blocks zero.
fn memory_over(ram: &[u8], blocks: &[(&str, u64)]) -> Memory {
    blocks
        .iter()
        .map(|&(name, len)| {
            let mut bytes = vec![0u8; len as usize];
            if name == RAM_BLOCK {
                let n = ram.len().min(bytes.len());
                bytes[..n].copy_from_slice(&ram[..n]);
            }
            (name.to_owned(), bytes)
        })
        .collect()
}

/// Loading the sparse stream over the RAM file gives what loading the whole stream over it
/// gives, memory and devices. Returns that memory.
fn assert_exact(stream: &[u8], sparse: &[u8], ram: &[u8], blocks: &[(&str, u64)]) -> Memory {
    let mut expected = memory_over(ram, blocks);
    let expected_devices = load(stream, &mut expected).expect("the whole stream loads");
    let mut got = memory_over(ram, blocks);
    let devices = load(sparse, &mut got).expect("the sparse stream loads");
    assert_eq!(devices, expected_devices);
    for (name, bytes) in &expected {
        assert!(got[name] == *bytes, "block {name} differs");
    }
    expected
}

fn pages(seeds: &[u64]) -> Vec<u8> {
    seeds
        .iter()
        .flat_map(|&seed| match seed {
            0 => vec![0; PAGE_SIZE],
            0x5a => vec![0x5a; PAGE_SIZE],
            seed => page(seed),
        })
        .collect()
}

fn at(ram: &[u8], index: usize) -> &[u8] {
    &ram[index * PAGE_SIZE..(index + 1) * PAGE_SIZE]
}

const P: u64 = PAGE_SIZE as u64;

#[test]
fn pages_equal_to_the_ram_file_are_dropped_and_the_rest_kept() {
    let ram = pages(&[1, 2, 3, 0, 0x5a, 0, 7, 8]);
    let blocks = [(RAM_BLOCK, 8 * P), ("/rom@etc/acpi/tables", 2 * P)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_PART);
    s.record(RAM_BLOCK, 0, Ok(at(&ram, 0))); // equal: dropped
    s.record(RAM_BLOCK, P, Ok(&page(99))); // differs: kept
    s.record(RAM_BLOCK, 2 * P, Ok(at(&ram, 2))); // equal: dropped
    s.record(RAM_BLOCK, 3 * P, Err(0)); // zero over zero: dropped
    s.record(RAM_BLOCK, 4 * P, Err(0x5a)); // fill over that fill: dropped
    s.record(RAM_BLOCK, 5 * P, Ok(&page(98))); // differs from a zero page: kept
    s.record(RAM_BLOCK, 6 * P, Err(0)); // zero over non-zero: kept
    let mut one_byte = at(&ram, 7).to_vec();
    one_byte[4095] ^= 1;
    s.record(RAM_BLOCK, 7 * P, Ok(&one_byte)); // one byte differs: kept
    // Another block with the RAM file's content at the same addresses: kept.
    s.record("/rom@etc/acpi/tables", 0, Ok(at(&ram, 0)));
    s.record("/rom@etc/acpi/tables", P, Err(0));
    s.end_of_section();
    s.section(SECTION_END);
    s.end_of_section();
    s.device(3, "timer", &[0x12; 40]);
    let stream = s.finish();

    let encoded = encode_bytes(&stream, &ram);
    let stats = &encoded.stats;
    assert_eq!(stats.pages_total, 10);
    assert_eq!(stats.pages_dropped, 2, "{stats:?}");
    assert_eq!(stats.zero_dropped, 2, "{stats:?}");
    assert_eq!(stats.pages_kept, 6, "{stats:?}");
    assert_eq!(
        encoded.sparse.len(),
        stream.len() - 2 * (8 + PAGE_SIZE) - 2 * (8 + 1),
        "only the dropped records are missing (the first one's block name moved to the next)"
    );
    let memory = assert_exact(&stream, &encoded.sparse, &ram, &blocks);
    assert!(at(&memory[RAM_BLOCK], 1) == page(99).as_slice());
    assert!(encoded.stats.output_bytes < 4 * P, "{:?}", encoded.stats);
}

#[test]
fn continue_is_rewritten_after_a_dropped_first_record_and_across_sections() {
    let ram = pages(&[1, 2, 3, 4]);
    let blocks = [(RAM_BLOCK, 4 * P), ("rom", P)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_PART);
    s.record(RAM_BLOCK, 0, Ok(at(&ram, 0))); // dropped: it named the block
    s.record(RAM_BLOCK, P, Ok(&page(50))); // CONTINUE: no block for the loader yet
    s.record("rom", 0, Ok(&page(51)));
    s.record(RAM_BLOCK, 2 * P, Ok(at(&ram, 2))); // dropped: it named the block again
    s.end_of_section();
    s.section(SECTION_END);
    s.record(RAM_BLOCK, 3 * P, Ok(&page(52))); // CONTINUE in the next section: rom for the loader
    s.end_of_section();
    s.device(3, "timer", b"state");
    let stream = s.finish();
    // The sender set CONTINUE on both.
    let continued = |addr: u64| (addr | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes();
    assert!(contains(&stream, &continued(P)));
    assert!(contains(&stream, &continued(3 * P)));

    let encoded = encode_bytes(&stream, &ram);
    assert_eq!(encoded.stats.pages_dropped, 2);
    for addr in [P, 3 * P] {
        let mut named = (addr | FLAG_PAGE).to_be_bytes().to_vec();
        named.extend(b"\x03mem");
        assert!(contains(&encoded.sparse, &named), "{addr:#x} is named");
        assert!(!contains(&encoded.sparse, &continued(addr)));
    }
    assert_exact(&stream, &encoded.sparse, &ram, &blocks);
    // Without the rewrite, the loader refuses the first CONTINUE (or writes the last page
    // into rom): the test loader notices.
    let mut memory = memory_over(&ram, &blocks);
    let mut cut = stream.clone();
    let first = find(&cut, &(FLAG_PAGE).to_be_bytes()).unwrap();
    cut.drain(first..first + 8 + 4 + PAGE_SIZE);
    assert!(load(&cut, &mut memory).is_err());
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

#[test]
fn records_after_a_section_the_parser_stops_at_keep_their_block() {
    // A device section between two RAM parts ends what the parser understands; the RAM
    // part after it starts with CONTINUE (the block of the last record before it).
    let ram = pages(&[1, 2, 3]);
    let blocks = [(RAM_BLOCK, 3 * P), ("rom", P)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_PART);
    s.record("rom", 0, Ok(&page(60)));
    s.record(RAM_BLOCK, 0, Ok(at(&ram, 0)));
    s.record(RAM_BLOCK, P, Ok(at(&ram, 1))); // the last record before the tail: equal
    s.end_of_section();
    s.device(5, "dirty-bitmap", b"x");
    s.section(SECTION_END);
    s.record(RAM_BLOCK, 2 * P, Ok(&page(61))); // CONTINUE: mem
    s.end_of_section();
    let stream = s.finish();
    let encoded = encode_bytes(&stream, &ram);
    // mem page 1 is written after all, so that the loader is in block mem at the tail.
    assert_eq!(encoded.stats.pages_dropped, 1, "{:?}", encoded.stats);
    assert_eq!(encoded.stats.pages_kept, 2, "{:?}", encoded.stats);
    let memory = assert_exact(&stream, &encoded.sparse, &ram, &blocks);
    assert!(at(&memory[RAM_BLOCK], 2) == page(61).as_slice());
}

#[test]
fn a_page_sent_again_overwrites_its_kept_version_even_with_the_template_content() {
    let ram = pages(&[1, 2]);
    let blocks = [(RAM_BLOCK, 2 * P)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_PART);
    s.record(RAM_BLOCK, 0, Ok(&page(70))); // dirty in the first pass: kept
    s.record(RAM_BLOCK, P, Ok(at(&ram, 1)));
    s.end_of_section();
    s.section(SECTION_END);
    s.record(RAM_BLOCK, 0, Ok(at(&ram, 0))); // back to the template's: kept too
    s.record(RAM_BLOCK, P, Ok(at(&ram, 1))); // never kept: dropped
    s.end_of_section();
    let stream = s.finish();
    let encoded = encode_bytes(&stream, &ram);
    assert_eq!(encoded.stats.pages_kept, 2, "{:?}", encoded.stats);
    assert_eq!(encoded.stats.pages_dropped, 2, "{:?}", encoded.stats);
    let memory = assert_exact(&stream, &encoded.sparse, &ram, &blocks);
    assert!(at(&memory[RAM_BLOCK], 0) == at(&ram, 0));
}

#[test]
fn random_streams_load_the_same_sparse_over_the_ram_file() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut dropped = 0;
    for case in 0..300 {
        let ram_pages = 1 + rng.below(10) as usize;
        // The block may be longer than the RAM file: those pages are always kept.
        let mem_pages = ram_pages + rng.below(3) as usize;
        let ram = pages(
            &(0..ram_pages)
                .map(|_| [0, 0x5a, 1 + rng.below(5)][rng.below(3) as usize])
                .collect::<Vec<_>>(),
        );
        let blocks = [(RAM_BLOCK, mem_pages as u64 * P), ("rom", 2 * P)];
        let template = |index: usize| (index < ram_pages).then(|| at(&ram, index).to_vec());
        let content = |rng: &mut Rng, index: usize| -> Result<Vec<u8>, u8> {
            match rng.below(5) {
                0 | 1 => template(index).map(Ok).unwrap_or(Err(0)),
                2 => Err([0, 0x5a][rng.below(2) as usize]),
                _ => Ok(page(1 + rng.below(6))),
            }
        };
        let mut s = Builder::new(&blocks);
        // First pass: every page of both blocks, interleaved at random.
        s.section(SECTION_PART);
        let mut order: Vec<(&str, usize)> = (0..mem_pages)
            .map(|i| (RAM_BLOCK, i))
            .chain((0..2).map(|i| ("rom", i)))
            .collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (block, index) in order {
            let data = content(&mut rng, index);
            s.record(block, index as u64 * P, data.as_deref().map_err(|&b| b));
            if rng.below(6) == 0 {
                s.end_of_section();
                s.section(SECTION_PART);
            }
        }
        s.end_of_section();
        // Pages sent again, in sections, with now and then a section the parser stops at.
        for _ in 0..rng.below(4) {
            if rng.below(4) == 0 {
                s.device(9, "other", &[case as u8]);
            }
            s.section(SECTION_PART);
            for _ in 0..rng.below(6) {
                let (block, pages) = if rng.below(4) == 0 {
                    ("rom", 2)
                } else {
                    (RAM_BLOCK, mem_pages)
                };
                let index = rng.below(pages as u64) as usize;
                let data = content(&mut rng, index);
                s.record(block, index as u64 * P, data.as_deref().map_err(|&b| b));
            }
            s.end_of_section();
        }
        s.section(SECTION_END);
        s.end_of_section();
        s.device(3, "timer", &[case as u8; 7]);
        let stream = s.finish();
        let encoded = encode_bytes(&stream, &ram);
        dropped += encoded.stats.pages_dropped + encoded.stats.zero_dropped;
        let memory = assert_exact(&stream, &encoded.sparse, &ram, &blocks);
        // Every page was sent: the whole stream over zero memory gives the same.
        let mut from_zero = memory_over(&[], &blocks);
        load(&stream, &mut from_zero).unwrap();
        assert!(from_zero == memory, "case {case}");
    }
    assert!(dropped > 500, "the cases drop pages: {dropped}");
}

#[test]
fn a_damaged_archive_or_another_ram_file_is_refused() {
    let ram = pages(&[1, 2, 3, 4]);
    let blocks = [(RAM_BLOCK, 4 * P)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_END);
    for index in 0..4 {
        s.record(RAM_BLOCK, index * P, Ok(&page(80 + index)));
    }
    s.end_of_section();
    let stream = s.finish();
    let encoded = encode_bytes(&stream, &ram);
    let whole = std::fs::read(&encoded.archive).unwrap();
    let damaged = encoded.dir.path().join("damaged");
    let check = |bytes: &[u8]| {
        std::fs::write(&damaged, bytes).unwrap();
        let err = decode(&damaged, &encoded.ram, RAM_ID, io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        err.to_string()
    };
    // Cut short anywhere, including before the header is complete.
    for len in [
        0,
        10,
        HEADER_LEN,
        HEADER_LEN + 5,
        whole.len() / 2,
        whole.len() - 1,
    ] {
        check(&whole[..len]);
    }
    // A flipped bit anywhere: the header's checksum, zstd's checksum or its framing.
    for at in [3, 20, 45, HEADER_LEN + 2, whole.len() / 2, whole.len() - 2] {
        let mut bytes = whole.clone();
        bytes[at] ^= 0x10;
        check(&bytes);
    }
    // Bytes after the frame.
    let mut longer = whole.clone();
    longer.extend(b"junk");
    check(&longer);
    // Another RAM file id, or length: refused before anything is written.
    let mut out = Vec::new();
    let err = decode(&encoded.archive, &encoded.ram, RAM_ID + 1, &mut out).unwrap_err();
    assert!(err.to_string().contains("RAM file"), "{err}");
    std::fs::write(&encoded.ram, &ram[..3 * PAGE_SIZE]).unwrap();
    let err = decode(&encoded.archive, &encoded.ram, RAM_ID, &mut out).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    assert!(out.is_empty());
    assert!(verify(&encoded.archive, &encoded.ram, RAM_ID).is_err());
}

/// Encode speed on a 256 MiB RAM file in the page cache: a stream of every page, 97% equal
/// to the RAM file, 2% zero over zero, 1% changed. Run with `--release --ignored`.
#[test]
#[ignore = "a measurement"]
fn encode_speed() {
    let pages_n = 65536usize;
    let mut rng = Rng(42);
    let mut ram = Vec::with_capacity(pages_n * PAGE_SIZE);
    let mut kinds = Vec::with_capacity(pages_n);
    for index in 0..pages_n {
        let kind = rng.below(100);
        kinds.push(kind);
        if kind < 2 {
            ram.extend([0u8; PAGE_SIZE]);
        } else {
            ram.extend(page(index as u64 + 1));
        }
    }
    let blocks = [(RAM_BLOCK, (pages_n * PAGE_SIZE) as u64)];
    let mut s = Builder::new(&blocks);
    s.section(SECTION_PART);
    for (index, kind) in kinds.iter().enumerate() {
        let addr = index as u64 * P;
        match kind {
            0 | 1 => s.record(RAM_BLOCK, addr, Err(0)),
            2 => s.record(RAM_BLOCK, addr, Ok(&page(index as u64 + 1_000_000))),
            _ => s.record(RAM_BLOCK, addr, Ok(at(&ram, index))),
        }
    }
    s.end_of_section();
    s.section(SECTION_END);
    s.end_of_section();
    let stream = s.finish();
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("ram");
    std::fs::write(&ram_path, &ram).unwrap();
    drop(ram);
    let archive = dir.path().join("memory.delta");
    let mb = stream.len() as f64 / 1e6;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let stats = encode(&stream[..], &ram_path, RAM_ID, &archive).unwrap();
        let encode_s = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        verify(&archive, &ram_path, RAM_ID).unwrap();
        let decode_s = started.elapsed().as_secs_f64();
        println!(
            "stream {mb:.1} MB -> {:.2} MB: encode {encode_s:.3} s ({:.0} MB/s), decode {decode_s:.3} s; {stats:?}",
            stats.output_bytes as f64 / 1e6,
            mb / encode_s,
        );
    }
}
