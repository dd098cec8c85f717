//! Memory archives on disk: the files of an archived VM and the blocking byte pumps between
//! QEMU's migration stream and those files.
//!
//! # Streaming design
//!
//! QEMU 7.2 has no `file:` migration URI. hangar uses `fd:` URIs over an anonymous pipe:
//! the backend makes a pipe, hands one end to QEMU with QMP `getfd` (the descriptor travels
//! as `SCM_RIGHTS` data over the QMP socket), closes its own copy of that end, and pumps the
//! other end in a blocking thread. Outgoing (`migrate fd:NAME`), the pump reads QEMU's
//! stream and writes it to `memory.<tier>.tmp`, through a zstd encoder for
//! [`ArchiveTier::Zstd`]; incoming (`migrate-incoming fd:NAME`), it reads the archive,
//! through a zstd decoder, into the pipe. Compared with `exec:` (`exec:zstd > file`), this:
//! - keeps every byte in-process, so a failing write (`ENOSPC`, `EIO`) is seen here with its
//!   real error, not as an exit status of a shell;
//! - needs no external tools and no shell quoting of paths;
//! - fails cleanly both ways: when the pump stops, its end of the pipe closes and QEMU's
//!   next write gets `EPIPE` (the outgoing migration fails and the source VM is unharmed);
//!   when QEMU stops, the pump sees end of file or `EPIPE`.
//!
//! # Files in the VM directory
//!
//! | file               | what                                                      |
//! |--------------------|-----------------------------------------------------------|
//! | `memory.<tier>`    | QEMU's migration stream (raw, or zstd-compressed)         |
//! | `archive.json`     | [`ArchiveRecord`]: tier, sizes, QEMU version, the VM spec |
//! | `disk.qcow2`       | the VM's disk layer, untouched (frozen while archived)    |
//!
//! `archive.json` is written last (atomically), so it marks a complete archive.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ArchiveInfo, ArchiveTier, VmSpec};

/// The record beside an archive's memory file.
pub const RECORD_FILE: &str = "archive.json";

/// zstd level for [`ArchiveTier::Zstd`]: level 1 is fast enough not to slow the migration
/// and already removes most of a guest's memory (zero and repeated pages).
const ZSTD_LEVEL: i32 = 1;

/// Buffer between the pipe and the file.
const BUFFER: usize = 1 << 20;

/// What `archive.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    #[serde(flatten)]
    pub info: ArchiveInfo,
    /// The disk layer the memory snapshot belongs with (relative to the VM directory).
    pub disk: Option<PathBuf>,
    /// Size of that disk layer file when archived.
    pub disk_bytes: Option<u64>,
    /// The QEMU that wrote the stream (`major.minor.micro`); a restore needs a compatible one.
    pub qemu_version: String,
    pub created_unix_ms: u64,
    /// The VM's configuration when archived.
    pub spec: VmSpec,
}

/// `<dir>/memory.<tier>`.
pub fn memory_path(dir: &Path, tier: ArchiveTier) -> PathBuf {
    dir.join(format!("memory.{tier}"))
}

/// `<dir>/memory.<tier>.tmp`: the file while it is being written.
pub fn partial_path(dir: &Path, tier: ArchiveTier) -> PathBuf {
    dir.join(format!("memory.{tier}.tmp"))
}

/// What an [`ArchiveTier::Delta`] archive is made against: the template the VM was cloned
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaBase {
    /// The template's snapshot as a raw migration stream: the archive is a [`crate::delta`].
    Stream(PathBuf),
    /// The template's RAM file (mapped memory) and its id: the archive is a
    /// [`crate::sparse`] stream, to be fed to a QEMU that maps that file privately.
    Ram { path: PathBuf, id: u64 },
}

/// Writes the stream read from `source` (until end of file) to `path`, compressed for
/// [`ArchiveTier::Zstd`], against `base` for [`ArchiveTier::Delta`] (verified by decoding
/// it once written), and syncs it. Returns the file's size.
pub fn write_memory(
    mut source: impl Read,
    path: &Path,
    tier: ArchiveTier,
    base: Option<&DeltaBase>,
) -> std::io::Result<u64> {
    if tier == ArchiveTier::Delta {
        match base.ok_or_else(|| no_template(path))? {
            DeltaBase::Stream(template) => {
                let index = crate::delta::TemplateIndex::build(template)?;
                let stats = crate::delta::encode(source, template, &index, path)?;
                crate::delta::verify(path, template)?;
                tracing::debug!(?stats, "delta archive written");
            }
            DeltaBase::Ram { path: ram, id } => {
                let stats = crate::sparse::encode(source, ram, *id, path)?;
                crate::sparse::verify(path, ram, *id)?;
                tracing::debug!(?stats, "sparse archive written");
            }
        }
        return Ok(std::fs::metadata(path)?.len());
    }
    let file = File::create(path)?;
    let mut out = BufWriter::with_capacity(BUFFER, file);
    match tier {
        ArchiveTier::Raw | ArchiveTier::Delta => {
            std::io::copy(&mut source, &mut out)?;
        }
        ArchiveTier::Zstd => {
            let mut encoder = zstd::Encoder::new(&mut out, ZSTD_LEVEL)?;
            std::io::copy(&mut source, &mut encoder)?;
            encoder.finish()?;
        }
    }
    let file = out.into_inner().map_err(|err| err.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Writes the stream stored at `path` (decompressed for [`ArchiveTier::Zstd`], rebuilt
/// against `base` for [`ArchiveTier::Delta`]: for [`DeltaBase::Ram`], the sparse stream,
/// which only a QEMU with that RAM file mapped loads right) into `sink`. Returns the
/// stream's length.
pub fn read_memory(
    path: &Path,
    tier: ArchiveTier,
    base: Option<&DeltaBase>,
    mut sink: impl Write,
) -> std::io::Result<u64> {
    if tier == ArchiveTier::Delta {
        let copied = match base.ok_or_else(|| no_template(path))? {
            DeltaBase::Stream(template) => crate::delta::decode(path, template, &mut sink)?,
            DeltaBase::Ram { path: ram, id } => crate::sparse::decode(path, ram, *id, &mut sink)?,
        };
        sink.flush()?;
        return Ok(copied);
    }
    let file = File::open(path)?;
    let copied = match tier {
        ArchiveTier::Delta => unreachable!("handled above"),
        ArchiveTier::Raw => std::io::copy(
            &mut std::io::BufReader::with_capacity(BUFFER, file),
            &mut sink,
        )?,
        ArchiveTier::Zstd => {
            let mut decoder = zstd::Decoder::new(file)?;
            std::io::copy(&mut decoder, &mut sink)?
        }
    };
    sink.flush()?;
    Ok(copied)
}

/// A stream being read ahead: [`read_memory`] runs in its own thread into a bounded
/// queue from the moment it starts, so that decompressing (or rebuilding) an archive
/// overlaps QEMU's start-up, which takes about as long. [`Prefetch::drain_into`] later
/// moves what was read, and the rest as it comes, into the real sink.
pub struct Prefetch {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    reader: std::thread::JoinHandle<std::io::Result<u64>>,
    path: PathBuf,
}

/// Size of one queued piece of a prefetched stream.
const PREFETCH_CHUNK: usize = 1 << 20;

impl Prefetch {
    /// Starts reading the stream of `path` (see [`read_memory`]), at most `ahead` bytes
    /// ahead of the sink.
    pub fn start(
        path: &Path,
        tier: ArchiveTier,
        base: Option<DeltaBase>,
        ahead: usize,
    ) -> std::io::Result<Prefetch> {
        let (sender, chunks) = std::sync::mpsc::sync_channel(ahead.div_ceil(PREFETCH_CHUNK));
        let reader = {
            let path = path.to_owned();
            std::thread::Builder::new()
                .name("hangar-prefetch".into())
                .spawn(move || {
                    let queue = QueueWriter {
                        sender,
                        chunk: Vec::with_capacity(PREFETCH_CHUNK),
                    };
                    read_memory(&path, tier, base.as_ref(), queue)
                })?
        };
        Ok(Prefetch {
            chunks,
            reader,
            path: path.to_owned(),
        })
    }

    /// Writes the whole stream into `sink`. Returns its length; an error of either side
    /// (reading the archive, or writing to `sink`) ends it, and the reader with it.
    pub fn drain_into(self, mut sink: impl Write) -> std::io::Result<u64> {
        let mut written = Ok(0u64);
        for chunk in &self.chunks {
            if let Err(err) = sink.write_all(&chunk) {
                written = Err(err);
                break;
            }
            written = written.map(|n| n + chunk.len() as u64);
        }
        // Dropping the queue makes the reader's next write fail: it stops, whatever the
        // reason the sink did.
        drop(self.chunks);
        let read = self.reader.join().map_err(|_| {
            std::io::Error::other(format!("reading {} panicked", self.path.display()))
        })?;
        let written = written.and_then(|n| sink.flush().map(|()| n))?;
        let read = read?;
        if read != written {
            return Err(std::io::Error::other(format!(
                "{}: read {read} bytes of stream, wrote {written}",
                self.path.display()
            )));
        }
        Ok(written)
    }
}

/// The write side of a [`Prefetch`] queue: whole chunks go to the queue, the last one on
/// flush.
struct QueueWriter {
    sender: std::sync::mpsc::SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
}

impl QueueWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(PREFETCH_CHUNK));
        self.sender.send(full).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the stream's consumer stopped",
            )
        })
    }
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(PREFETCH_CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == PREFETCH_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn no_template(path: &Path) -> std::io::Error {
    std::io::Error::other(format!(
        "{}: a delta archive needs the snapshot or RAM file of the template the VM was cloned from",
        path.display()
    ))
}

/// What a delta archive of a VM made as `spec` is made against: the RAM file of the mapped
/// template it maps (with the checksum recorded when the template was made), or the raw
/// stream of an older template it was cloned from; none for a VM that is no clone, or
/// whose template is gone.
pub fn delta_base(spec: &VmSpec) -> Option<DeltaBase> {
    let dir = spec.template.as_ref()?;
    match &spec.memory {
        crate::MemoryBacking::Mapped { file } => {
            let template = crate::template::read(dir)?;
            (template.ram.as_ref() == Some(file)).then_some(())?;
            Some(DeltaBase::Ram {
                path: file.clone(),
                id: template.ram_xxh64?,
            })
        }
        _ => {
            let stream = dir.join(crate::template::MEMORY_FILE);
            stream.is_file().then_some(DeltaBase::Stream(stream))
        }
    }
}

/// Writes `archive.json` atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_record(dir: &Path, record: &ArchiveRecord) -> std::io::Result<()> {
    let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(record)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(RECORD_FILE))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The archive record of the VM in `dir`, if it has a complete archive (record and memory
/// file both present).
pub fn read_record(dir: &Path) -> Option<ArchiveRecord> {
    let bytes = std::fs::read(dir.join(RECORD_FILE)).ok()?;
    let record: ArchiveRecord = serde_json::from_slice(&bytes)
        .inspect_err(
            |err| tracing::warn!(dir = %dir.display(), error = %err, "unreadable archive record"),
        )
        .ok()?;
    record.info.path.is_file().then_some(record)
}

/// Removes an archive's files (memory first: a record without memory is no archive).
pub fn remove(dir: &Path, record: &ArchiveRecord) -> std::io::Result<()> {
    remove_if_present(&record.info.path)?;
    remove_if_present(&dir.join(RECORD_FILE))?;
    sync_dir(dir)
}

/// Removes every archive file in `dir`, complete or partial: `archive.json`, its temporary
/// file and `memory.*`. For a VM whose QEMU process is alive, such files are what an archive
/// or a restore cut short by the server's end left behind: the memory lives in the process,
/// so they are stale. Returns the names removed.
pub fn remove_stale(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("memory.") || name.starts_with(RECORD_FILE) {
            remove_if_present(&dir.join(&name))?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    removed.sort();
    Ok(removed)
}

/// Removes `path`; a missing file is fine.
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            vcpus: 1,
            memory_mib: 64,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "k".into(),
            initramfs: "i".into(),
            cmdline: String::new(),
            base_image: None,
            layers: Vec::new(),
            forwards: vec![],
            pre_os: false,
            layer_slots: 0,
            background: false,
            template: None,
            firmware: false,
            memory: Default::default(),
        }
    }

    #[test]
    fn memory_round_trips_through_both_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let mut stream = vec![0u8; 4 << 20];
        for (i, byte) in stream.iter_mut().enumerate().step_by(4096) {
            *byte = (i / 4096) as u8;
        }
        for tier in [ArchiveTier::Raw, ArchiveTier::Zstd] {
            let path = memory_path(dir.path(), tier);
            let size = write_memory(&stream[..], &path, tier, None).unwrap();
            assert_eq!(size, std::fs::metadata(&path).unwrap().len());
            match tier {
                ArchiveTier::Raw => assert_eq!(size, stream.len() as u64),
                ArchiveTier::Zstd => assert!(size < stream.len() as u64 / 50, "{size}"),
                ArchiveTier::Delta => unreachable!(),
            }
            let mut back = Vec::new();
            assert_eq!(
                read_memory(&path, tier, None, &mut back).unwrap(),
                stream.len() as u64
            );
            assert!(back == stream, "{tier} round trip differs");
        }
    }

    #[test]
    fn a_prefetched_stream_arrives_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of the chunk size, and longer than what may be read ahead.
        let stream: Vec<u8> = (0..(3 * PREFETCH_CHUNK + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        for tier in [ArchiveTier::Raw, ArchiveTier::Zstd] {
            let path = memory_path(dir.path(), tier);
            write_memory(&stream[..], &path, tier, None).unwrap();
            let prefetch = Prefetch::start(&path, tier, None, PREFETCH_CHUNK).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut back = Vec::new();
            assert_eq!(prefetch.drain_into(&mut back).unwrap(), stream.len() as u64);
            assert!(back == stream, "{tier}: the prefetched stream differs");
        }
    }

    /// Accepts `room` bytes, then fails like a pipe whose reader is gone.
    struct ClosingSink {
        room: usize,
    }

    impl Write for ClosingSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_prefetch_ends_with_its_sink_or_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = memory_path(dir.path(), ArchiveTier::Raw);
        write_memory(
            &vec![7u8; 8 * PREFETCH_CHUNK][..],
            &path,
            ArchiveTier::Raw,
            None,
        )
        .unwrap();
        // The sink closes early: the error is the sink's, and the reader has stopped
        // (drain_into joined it) although most of the file was never queued.
        let prefetch = Prefetch::start(&path, ArchiveTier::Raw, None, PREFETCH_CHUNK).unwrap();
        let err = prefetch
            .drain_into(ClosingSink {
                room: PREFETCH_CHUNK + 1,
            })
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
        // No archive: the reader's error comes through.
        let missing = dir.path().join("memory.zstd");
        let prefetch = Prefetch::start(&missing, ArchiveTier::Zstd, None, PREFETCH_CHUNK).unwrap();
        let err = prefetch.drain_into(std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn stale_archive_files_go_and_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "memory.zstd",
            "memory.raw.tmp",
            "archive.json.tmp",
            "disk.qcow2",
            "qemu.pid",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let removed = remove_stale(dir.path()).unwrap();
        assert_eq!(
            removed,
            ["archive.json.tmp", "memory.raw.tmp", "memory.zstd"]
        );
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["disk.qcow2", "qemu.pid"]);
        assert!(remove_stale(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_delta_without_a_template_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = memory_path(dir.path(), ArchiveTier::Delta);
        let err = write_memory(&b"stream"[..], &path, ArchiveTier::Delta, None).unwrap_err();
        assert!(err.to_string().contains("template"), "{err}");
        let err = read_memory(&path, ArchiveTier::Delta, None, std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("template"), "{err}");
    }

    #[test]
    fn a_delta_against_a_ram_file_is_the_sparse_stream() {
        use crate::sparse::tests::{Builder, SECTION_END, page};
        const PAGE: usize = 4096;
        let dir = tempfile::tempdir().unwrap();
        let ram: Vec<u8> = (1..=4).flat_map(page).collect();
        let ram_path = dir.path().join("ram");
        std::fs::write(&ram_path, &ram).unwrap();
        let mut builder = Builder::new(&[(crate::RAM_BLOCK, ram.len() as u64)]);
        builder.section(SECTION_END);
        for index in 0..4 {
            let data = match index {
                1 => page(99),
                _ => ram[index * PAGE..(index + 1) * PAGE].to_vec(),
            };
            builder.record(crate::RAM_BLOCK, (index * PAGE) as u64, Ok(&data));
        }
        builder.end_of_section();
        let stream = builder.finish();
        let base = DeltaBase::Ram {
            path: ram_path.clone(),
            id: 7,
        };
        let path = memory_path(dir.path(), ArchiveTier::Delta);
        let size = write_memory(&stream[..], &path, ArchiveTier::Delta, Some(&base)).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut sparse = Vec::new();
        let len = read_memory(&path, ArchiveTier::Delta, Some(&base), &mut sparse).unwrap();
        assert_eq!(len, sparse.len() as u64);
        // Three pages dropped (the first one's block name moves to the kept one).
        assert_eq!(sparse.len(), stream.len() - 3 * (8 + PAGE));
        let prefetch = Prefetch::start(&path, ArchiveTier::Delta, Some(base), 1 << 20).unwrap();
        let mut prefetched = Vec::new();
        prefetch.drain_into(&mut prefetched).unwrap();
        assert!(prefetched == sparse);
        // Another template's RAM file, or the file read as a delta of a raw stream: refused.
        let other = DeltaBase::Ram {
            path: ram_path.clone(),
            id: 8,
        };
        let err = read_memory(&path, ArchiveTier::Delta, Some(&other), std::io::sink());
        assert_eq!(err.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        let stream_base = DeltaBase::Stream(ram_path);
        let err = read_memory(
            &path,
            ArchiveTier::Delta,
            Some(&stream_base),
            std::io::sink(),
        );
        assert!(err.unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn record_marks_a_complete_archive() {
        let dir = tempfile::tempdir().unwrap();
        let memory = memory_path(dir.path(), ArchiveTier::Zstd);
        let record = ArchiveRecord {
            info: ArchiveInfo {
                tier: ArchiveTier::Zstd,
                path: memory.clone(),
                size_bytes: 3,
                memory_mib: 64,
                took_ms: 1,
            },
            disk: Some("disk.qcow2".into()),
            disk_bytes: Some(1),
            qemu_version: "7.2.0".into(),
            created_unix_ms: 0,
            spec: spec(),
        };
        write_record(dir.path(), &record).unwrap();
        assert_eq!(read_record(dir.path()), None, "no memory file yet");
        std::fs::write(&memory, b"abc").unwrap();
        assert_eq!(read_record(dir.path()), Some(record.clone()));
        let json = std::fs::read_to_string(dir.path().join(RECORD_FILE)).unwrap();
        assert!(json.contains("\"tier\": \"zstd\""), "{json}");
        remove(dir.path(), &record).unwrap();
        assert_eq!(read_record(dir.path()), None);
        assert!(!memory.exists());
    }
}
