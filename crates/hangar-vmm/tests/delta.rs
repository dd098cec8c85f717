//! The `delta` archive codec against real QEMU streams: a busybox guest serving a request
//! counter (the `http-counter` service of `catalog/demo.toml`) is archived raw as a template;
//! restored (a clone), it serves requests and is archived raw again. The clone's stream,
//! encoded against the template, decodes back byte for byte, is much smaller than its zstd
//! archive, and a VM restored from the decoded stream continues the counter.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use hangar_vmm::delta::{self, TemplateIndex};
use hangar_vmm::qemu::QemuBackend;
use hangar_vmm::{ArchiveTier, Hypervisor};

use common::*;

/// Compares what is written with the bytes of a file, without holding either in memory.
struct SameAs {
    expected: std::io::BufReader<File>,
    offset: u64,
    scratch: Vec<u8>,
}

impl Write for SameAs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scratch.resize(buf.len(), 0);
        self.expected.read_exact(&mut self.scratch)?;
        if let Some(at) = buf.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            return Err(std::io::Error::other(format!(
                "decoded stream differs at byte {}",
                self.offset + at as u64
            )));
        }
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Archives `id` raw and keeps its memory stream at `keep` (a hard link: restoring removes
/// the archive's own name).
async fn archive_raw(backend: &QemuBackend, id: &str, keep: &Path) -> u64 {
    let info = backend
        .archive(id, ArchiveTier::Raw)
        .await
        .expect("archive raw");
    std::fs::hard_link(&info.path, keep).unwrap();
    eprintln!(
        "{id}: raw archive {} bytes in {} ms",
        info.size_bytes, info.took_ms
    );
    info.size_bytes
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

#[test]
fn a_clone_is_stored_as_a_small_delta_of_its_template() {
    let _serial = serial();
    let guest = guest();
    let rig = rig("hgd");
    let (tmp, backend) = (&rig.tmp, rig.backend.clone());
    let port = free_port();
    let spec = spec("ctr", &guest, port);
    let id = spec.id.as_str();
    let template = tmp.path().join("template.raw");
    let clone = tmp.path().join("clone.raw");

    runtime().block_on(async {
        // The template: booted to ready, one request served, archived raw.
        let _launched = boot_counter(&backend, &spec).await;
        assert_eq!(counter(port).await, 1);
        archive_raw(&backend, id, &template).await;

        // The clone: restored from it, serves requests, archived raw.
        backend.restore(&spec).await.expect("restore the template");
        for expected in 2..=6 {
            assert_eq!(counter(port).await, expected);
        }
        let raw_bytes = archive_raw(&backend, id, &clone).await;

        let started = Instant::now();
        let index = TemplateIndex::build(&template).unwrap();
        let index_took = started.elapsed();
        eprintln!(
            "template index: {} pages of {} in {index_took:?}",
            index.pages(),
            mb(index.template_len())
        );

        let delta_path = tmp.path().join("clone.delta");
        let started = Instant::now();
        let stats = delta::encode(File::open(&clone).unwrap(), &template, &index, &delta_path)
            .expect("encode");
        let encode_took = started.elapsed();
        eprintln!("encode: {stats:?} in {encode_took:?}");
        assert_eq!(stats.stream_bytes, raw_bytes);
        assert!(
            stats.pages_total > 0 && stats.pages_referenced > 0,
            "{stats:?}"
        );

        let started = Instant::now();
        let same = SameAs {
            expected: std::io::BufReader::new(File::open(&clone).unwrap()),
            offset: 0,
            scratch: Vec::new(),
        };
        let decoded = delta::decode(&delta_path, &template, same).expect("decode");
        eprintln!(
            "decode (compared with the clone's stream): {:?}",
            started.elapsed()
        );
        assert_eq!(decoded, raw_bytes);
        let started = Instant::now();
        delta::verify(&delta_path, &template).expect("verify");
        eprintln!("verify: {:?}", started.elapsed());

        let zstd_path = tmp.path().join("clone.zstd");
        let started = Instant::now();
        let zstd_bytes = hangar_vmm::archive::write_memory(
            File::open(&clone).unwrap(),
            &zstd_path,
            ArchiveTier::Zstd,
            None,
        )
        .unwrap();
        eprintln!("zstd -1 of the clone's stream: {:?}", started.elapsed());
        let template_zstd = hangar_vmm::archive::write_memory(
            File::open(&template).unwrap(),
            &tmp.path().join("template.zstd"),
            ArchiveTier::Zstd,
            None,
        )
        .unwrap();
        eprintln!(
            "sizes: template raw {}, zstd {}; clone raw {}, zstd {}, delta {} ({:.1}% of zstd)",
            mb(index.template_len()),
            mb(template_zstd),
            mb(raw_bytes),
            mb(zstd_bytes),
            mb(stats.output_bytes),
            stats.output_bytes as f64 * 100.0 / zstd_bytes as f64
        );
        assert!(
            stats.output_bytes * 4 <= zstd_bytes,
            "the delta ({}) should be at most 25% of the zstd archive ({zstd_bytes})",
            stats.output_bytes
        );

        // A VM restored from the decoded stream continues the counter: the decoded stream
        // replaces the raw archive's memory file.
        let memory = hangar_vmm::archive::memory_path(&backend.paths(id).dir, ArchiveTier::Raw);
        std::fs::remove_file(&memory).unwrap();
        let mut file = File::create(&memory).unwrap();
        delta::decode(&delta_path, &template, &mut file).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let started = Instant::now();
        backend
            .restore(&spec)
            .await
            .expect("restore the decoded stream");
        assert_eq!(counter(port).await, 7, "the counter continues");
        eprintln!(
            "restored from the decoded stream, answering in {:?}",
            started.elapsed()
        );
        backend.destroy(id).await.unwrap();
    });
}
