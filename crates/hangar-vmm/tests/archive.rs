//! Archive and restore of real QEMU guests: a busybox guest serving a request counter that
//! lives only in guest memory (the `http-counter` service of `catalog/demo.toml`) and a file
//! written to its disk survive archive → restore cycles in both tiers; a failed archive (a
//! real ENOSPC) leaves the VM running and no partial file.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hangar_proto::Identity;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use hangar_vmm::{Accel, ArchiveTier, Hypervisor, Launched, RunState, VmSpec, VmmError, procs};

use common::*;

#[test]
fn archive_and_restore_keep_memory_and_disk_in_both_tiers() {
    let _serial = serial();
    let guest = guest();
    let rig = rig("hga");
    let backend = rig.backend.clone();
    let port = free_port();
    let spec = spec("ctr", &guest, port);
    let id = spec.id.as_str();

    runtime().block_on(async {
        let launched = boot_counter(&backend, &spec).await;
        for expected in 1..=3 {
            assert_eq!(counter(port).await, expected);
        }
        exec(&launched, "echo hello > /root/f && sync").await;

        let mut expected = 4;
        let mut pid = launched.pid.expect("qemu pid");
        let tiers = [ArchiveTier::Zstd]
            .into_iter()
            .chain([ArchiveTier::Raw; 3])
            .chain([ArchiveTier::Zstd; 3]);
        for (cycle, tier) in tiers.enumerate() {
            let info = backend.archive(id, tier).await.expect("archive");
            let memory_bytes = u64::from(MEMORY_MIB) << 20;
            eprintln!(
                "cycle {cycle}: archive {tier}: {} bytes ({:.1} MB, {:.1}% of guest memory) in {} ms",
                info.size_bytes,
                info.size_bytes as f64 / 1e6,
                info.size_bytes as f64 * 100.0 / memory_bytes as f64,
                info.took_ms
            );
            assert!(!procs::alive(pid), "QEMU {pid} still runs after archive");
            assert_eq!(backend.run_state(id).await.unwrap(), RunState::Gone);
            assert_eq!(info.tier, tier);
            assert_eq!(info.memory_mib, MEMORY_MIB);
            assert!(info.path.is_file(), "{}", info.path.display());
            assert_eq!(
                std::fs::metadata(&info.path).unwrap().len(),
                info.size_bytes
            );
            assert_eq!(backend.archive_info(id), Some(info.clone()));
            let record = hangar_vmm::archive::read_record(&backend.paths(id).dir).unwrap();
            assert_eq!(record.info, info);
            assert_eq!(record.disk.as_deref(), Some(Path::new("disk.qcow2")));
            assert!(record.qemu_version.starts_with(|c: char| c.is_ascii_digit()));
            assert_eq!(record.spec, spec);
            if cycle == 0 {
                eprintln!("qemu {}, disk layer {:?} bytes", record.qemu_version, record.disk_bytes);
            }
            match tier {
                ArchiveTier::Zstd => assert!(
                    info.size_bytes < memory_bytes / 4,
                    "a zstd archive should be much smaller than guest memory: {}",
                    info.size_bytes
                ),
                ArchiveTier::Raw => assert!(info.size_bytes < memory_bytes + (16 << 20)),
                ArchiveTier::Delta => unreachable!("not archived in this test"),
            }
            assert!(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err(),
                "nothing listens while archived"
            );

            let started = Instant::now();
            let restored = backend.restore(&spec).await.expect("restore");
            let restore_took = started.elapsed();
            let value = counter(port).await;
            let first_answer = started.elapsed();
            eprintln!(
                "cycle {cycle}: restore {tier}: {restore_took:?} to running, {first_answer:?} to the first HTTP answer"
            );
            assert_eq!(value, expected, "the counter lives in guest memory");
            expected += 1;
            assert_eq!(exec(&restored, "cat /root/f").await, "hello\n");
            assert!(!info.path.exists(), "the memory file is removed after restore");
            assert_eq!(backend.archive_info(id), None);
            assert_eq!(backend.run_state(id).await.unwrap(), RunState::Running);
            pid = restored.pid.expect("qemu pid");
        }

        // Archiving a paused (sleeping) VM works too, and restore resumes it.
        backend.pause(id).await.unwrap();
        backend.archive(id, ArchiveTier::Zstd).await.expect("archive a paused VM");
        backend.restore(&spec).await.expect("restore");
        assert_eq!(counter(port).await, expected);

        let mismatched = VmSpec {
            memory_mib: 128,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            ..spec.clone()
        };
        backend.archive(id, ArchiveTier::Raw).await.unwrap();
        assert!(matches!(
            backend.restore(&mismatched).await,
            Err(VmmError::Restore { .. })
        ));
        assert!(backend.archive_info(id).is_some(), "a refused restore keeps the archive");
        backend.destroy(id).await.unwrap();
        assert!(!backend.paths(id).dir.exists());
    });
}

/// Free bytes on the filesystem holding `dir`.
fn available_bytes(dir: &Path) -> u64 {
    let output = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_failed_archive_leaves_the_vm_running_and_no_partial_file() {
    let _serial = serial();
    let tmp = tempfile::Builder::new()
        .prefix("hga")
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    std::fs::create_dir(&vms_dir).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&vms_dir)
        .output();
    match mount {
        Ok(output) if output.status.success() => {}
        other => {
            eprintln!(
                "SKIPPED: cannot mount a small tmpfs for a real ENOSPC (needs root): {other:?}"
            );
            return;
        }
    }
    let _cleanup = Cleanup {
        vms_dir: vms_dir.clone(),
        mounted: true,
    };
    let guest = guest();
    let backend = QemuBackend::new(QemuConfig::new(vms_dir.clone(), Accel::Tcg));
    let port = free_port();
    let spec = spec("full", &guest, port);
    let id = spec.id.as_str();

    runtime().block_on(async {
        let launched = boot_counter(&backend, &spec).await;
        assert_eq!(counter(port).await, 1);
        // Leave 2 MiB: far less than the snapshot needs, enough for the guest's disk layer.
        let filler = vms_dir.join("filler");
        let fill = available_bytes(&vms_dir).saturating_sub(2 << 20);
        std::fs::write(&filler, vec![0xa5u8; usize::try_from(fill).unwrap()]).unwrap();

        for tier in [ArchiveTier::Zstd, ArchiveTier::Raw] {
            let err = backend
                .archive(id, tier)
                .await
                .expect_err("the archive cannot fit");
            eprintln!("archive {tier} on a full disk: {err}");
            assert!(matches!(err, VmmError::Archive { .. }), "{err:?}");
            assert!(
                err.to_string().contains("No space left on device"),
                "the error says why: {err}"
            );
            assert_eq!(backend.run_state(id).await.unwrap(), RunState::Running);
            assert!(procs::alive(launched.pid.unwrap()));
            let leftovers: Vec<_> = std::fs::read_dir(vms_dir.join(id))
                .unwrap()
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("memory") || name.starts_with("archive"))
                .collect();
            assert!(leftovers.is_empty(), "partial files remain: {leftovers:?}");
            assert_eq!(backend.archive_info(id), None);
        }
        assert_eq!(
            counter(port).await,
            2,
            "the VM still answers, memory intact"
        );
        assert_eq!(exec(&launched, "echo alive").await, "alive\n");

        // With room again, the same VM archives and restores.
        std::fs::remove_file(&filler).unwrap();
        let info = backend.archive(id, ArchiveTier::Zstd).await.unwrap();
        eprintln!("archive after freeing space: {} bytes", info.size_bytes);
        backend.restore(&spec).await.unwrap();
        assert_eq!(counter(port).await, 3);
        backend.destroy(id).await.unwrap();
    });
}

/// What a clone of the template reports about itself: hostname, 16 fresh random bytes,
/// and the file the template wrote to its disk.
async fn whoami(launched: &Launched) -> (String, String, String) {
    let out = exec(
        launched,
        "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /root/f",
    )
    .await;
    let mut lines = out.lines().map(str::to_owned);
    let mut next = || lines.next().unwrap_or_default();
    (next(), next(), next())
}

#[test]
fn clones_of_a_template_resume_where_it_was_with_their_own_identity_ports_and_disk() {
    let _serial = serial();
    let guest = guest();
    let rig = rig("hgt");
    let (tmp, backend) = (&rig.tmp, rig.backend.clone());
    let template_port = free_port();
    let template_dir = tmp.path().join("templates").join("counter");

    runtime().block_on(async {
        let source = spec("tpl", &guest, template_port);
        let launched = boot_counter(&backend, &source).await;
        assert_eq!(counter(template_port).await, 1);
        exec(&launched, "echo template > /root/f && sync").await;
        backend.pause("tpl").await.expect("pause");
        let template = backend
            .make_template("tpl", &template_dir)
            .await
            .expect("make template");
        eprintln!(
            "template: {} bytes in {} ms",
            template.size_bytes, template.took_ms
        );
        assert_eq!(
            hangar_vmm::template::read(&template_dir),
            Some(template.clone())
        );
        assert!(
            !backend.paths("tpl").dir.exists(),
            "the source VM is consumed"
        );
        assert_eq!(backend.run_state("tpl").await.unwrap(), RunState::Gone);

        let mut clones = Vec::new();
        for (i, name) in ["c1", "c2"].into_iter().enumerate() {
            let port = free_port();
            let started = Instant::now();
            let launched = backend
                .clone_template(&spec(name, &guest, port), &template)
                .await
                .expect("clone");
            let cloned = started.elapsed();
            assert_eq!(backend.run_state(name).await.unwrap(), RunState::Paused);
            backend.resume(name).await.expect("resume");
            let reply = launched
                .agent
                .reidentify(
                    Identity {
                        hostname: name.into(),
                        unix_time_ms: 0,
                        entropy_hex: format!("{i:02x}").repeat(32),
                    },
                    Duration::from_secs(10),
                )
                .await
                .expect("reidentify");
            assert!(reply.ok, "{reply:?}");
            eprintln!(
                "{name}: cloned in {cloned:?}, answering after {:?}",
                started.elapsed()
            );
            // The counter lives in guest memory: each clone continues from the template's.
            assert_eq!(counter(port).await, 2, "{name}");
            clones.push((name, port, launched));
        }
        let (h1, r1, f1) = whoami(&clones[0].2).await;
        let (h2, r2, f2) = whoami(&clones[1].2).await;
        assert_eq!((h1.as_str(), h2.as_str()), ("c1", "c2"));
        assert_ne!(r1, r2, "clones share random state");
        assert_eq!((f1.as_str(), f2.as_str()), ("template", "template"));
        // Disks are separate layers over the template's.
        exec(&clones[0].2, "echo c1 > /root/f && sync").await;
        assert_eq!(whoami(&clones[1].2).await.2, "template");
        assert_eq!(counter(clones[0].1).await, 3);
        assert_eq!(counter(clones[1].1).await, 3);
        // The template's own port is not taken over by a clone.
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", template_port)).is_err(),
            "a clone listens on the template's port"
        );
        // Archive tiers of a clone: the delta holds what differs from the template.
        let zstd = backend
            .archive("c1", ArchiveTier::Zstd)
            .await
            .expect("zstd");
        let delta = backend
            .archive("c2", ArchiveTier::Delta)
            .await
            .expect("delta");
        eprintln!(
            "clone archives: zstd {} bytes, delta {} bytes ({:.1}%)",
            zstd.size_bytes,
            delta.size_bytes,
            delta.size_bytes as f64 * 100.0 / zstd.size_bytes as f64
        );
        assert_eq!(delta.tier, ArchiveTier::Delta);
        assert!(
            delta.size_bytes * 4 <= zstd.size_bytes,
            "a clone's delta should be at most 25% of its zstd archive"
        );
        for (name, port, _) in &clones {
            let mut restored = spec(name, &guest, *port);
            restored.base_image = template.disk.clone();
            restored.template = Some(template.dir.clone());
            let started = Instant::now();
            backend.restore(&restored).await.expect("restore");
            eprintln!("{name}: restored in {:?}", started.elapsed());
            assert_eq!(
                counter(*port).await,
                4,
                "{name} continues after its archive"
            );
        }
        for (name, _, _) in &clones {
            backend.destroy(name).await.expect("destroy");
        }
        assert!(template.memory.is_file(), "clones leave the template alone");
        hangar_vmm::template::remove(&template_dir).unwrap();
    });
}
