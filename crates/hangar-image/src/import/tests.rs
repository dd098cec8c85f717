//! The import checks on images crafted with qemu-img here, and staging of real disks on
//! loop devices (root only; skipped otherwise).

use std::process::Command;

use super::*;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn limits() -> ImportLimits {
    ImportLimits {
        max_upload_bytes: 64 << 20,
        max_virtual_bytes: 1 << 30,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn a_qcow2_whose_backing_file_is_a_host_path_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let evil = dir.path().join("evil.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "/etc/shadow",
        "-u",
        s(&evil),
        "64M",
    ]);
    let err = inspect(&evil, DiskFormat::Qcow2, &limits()).expect_err("refused");
    assert!(
        matches!(&err, ImportError::RefusedBackingFile(p) if p == "/etc/shadow"),
        "{err}"
    );
    assert!(err.is_refusal());
    // The whole import refuses it before anything is converted, and leaves no target.
    let target = dir.path().join("model.qcow2");
    let err = import_disk(
        &evil,
        DiskFormat::Qcow2,
        &limits(),
        dir.path(),
        &target,
        "imported",
    )
    .expect_err("refused");
    assert!(matches!(err, ImportError::RefusedBackingFile(_)), "{err}");
    assert!(!target.exists());
    assert!(!dir.path().join("disk.raw").exists());
}

#[test]
fn an_external_data_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("data.qcow2");
    let data = dir.path().join("data.raw");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", s(&data)),
        s(&image),
        "64M",
    ]);
    let err = inspect(&image, DiskFormat::Qcow2, &limits()).expect_err("refused");
    assert!(matches!(err, ImportError::RefusedDataFile(_)), "{err}");
}

#[test]
fn an_encrypted_image_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&image),
        "64M",
    ]);
    let err = inspect(&image, DiskFormat::Qcow2, &limits()).expect_err("refused");
    assert!(matches!(err, ImportError::RefusedEncrypted), "{err}");
}

#[test]
fn sizes_over_the_limits_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&big), "2G"]);
    let err = inspect(&big, DiskFormat::Qcow2, &limits()).expect_err("refused");
    assert!(
        matches!(err, ImportError::RefusedVirtualSize { size, limit } if size == 2 << 30 && limit == 1 << 30),
        "{err}"
    );
    let small = dir.path().join("small.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&small), "16M"]);
    let tight = ImportLimits {
        max_upload_bytes: 1024,
        max_virtual_bytes: 1 << 30,
    };
    let err = inspect(&small, DiskFormat::Qcow2, &tight).expect_err("refused");
    assert!(
        matches!(err, ImportError::RefusedUploadSize { limit: 1024 }),
        "{err}"
    );
}

#[test]
fn a_vmdk_pointing_at_a_host_file_is_refused_and_a_monolithic_one_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flat = dir.path().join("flat.vmdk");
    std::fs::write(
        &flat,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/hostname\" 0\n",
    )
    .expect("write descriptor");
    let err = inspect(&flat, DiskFormat::Vmdk, &limits()).expect_err("refused");
    assert!(
        matches!(&err, ImportError::RefusedExtent(p) if p == "/etc/hostname"),
        "{err}"
    );
    let mono = dir.path().join("mono.vmdk");
    qemu_img(&["create", "-f", "vmdk", s(&mono), "32M"]);
    let facts = inspect(&mono, DiskFormat::Vmdk, &limits()).expect("accepted");
    assert_eq!(facts.virtual_bytes, 32 << 20);
}

#[test]
fn the_format_is_never_probed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let evil = dir.path().join("evil.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "/etc/shadow",
        "-u",
        s(&evil),
        "64M",
    ]);
    // Named raw, the file is read as raw bytes: its qcow2 header (and backing file) mean
    // nothing, and its size is the file's.
    let facts = inspect(&evil, DiskFormat::Raw, &limits()).expect("raw is raw");
    assert_eq!(facts.format, DiskFormat::Raw);
    assert!(facts.virtual_bytes < 1 << 20, "{facts:?}");
    // Named vmdk, a qcow2 is unreadable, not taken for what it is.
    let err = inspect(&evil, DiskFormat::Vmdk, &limits()).expect_err("refused");
    assert!(
        matches!(err, ImportError::RefusedUnreadable { .. }),
        "{err}"
    );
    assert!("iso".parse::<DiskFormat>().is_err());
}

/// A guest tree with identity in it, including links that point out of the guest.
fn guest_tree(root: &Path) {
    let mkdir = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
    let write = |p: &str, c: &str| std::fs::write(root.join(p), c).expect("write");
    for dir in [
        "etc/ssh",
        "var/lib/dbus",
        "var/lib/dhcp",
        "var/lib/cloud/instances/i-123",
        "var/lib/NetworkManager",
        "var/lib/systemd",
        "usr/lib",
    ] {
        mkdir(dir);
    }
    write("usr/lib/os-release", "ID=debian\n");
    std::os::unix::fs::symlink("../usr/lib/os-release", root.join("etc/os-release")).expect("link");
    write("etc/machine-id", "0123456789abcdef0123456789abcdef\n");
    write("etc/ssh/ssh_host_ed25519_key", "secret");
    write("etc/ssh/ssh_host_ed25519_key.pub", "public");
    write("etc/ssh/sshd_config", "# kept\n");
    write("var/lib/dhcp/dhclient.eth0.leases", "lease {}");
    write("var/lib/cloud/instances/i-123/obj.pkl", "x");
    write("var/lib/NetworkManager/internal.lease", "x");
    write("var/lib/systemd/random-seed", "seed");
    // Links out of the guest: removed, never written through.
    std::os::unix::fs::symlink("/etc/machine-id", root.join("var/lib/dbus/machine-id"))
        .expect("link");
    std::os::unix::fs::symlink("/etc/passwd", root.join("etc/hostname")).expect("link");
}

fn mkfs(tree: &Path, image: &Path, size: &str) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(image)
        .arg(size)
        .output()
        .expect("mkfs.ext4 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes an MBR with one Linux partition from sector 2048 to the end of a `total`-byte
/// disk.
fn write_mbr(disk: &Path, total: u64) {
    use std::io::{Seek, SeekFrom};
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[0] = 0x80;
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    let sectors = u32::try_from(total / 512 - 2048).expect("small disk");
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open disk");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(&mbr).expect("write mbr");
}

/// Reads `rel` (not following a final link) from the root filesystem of `raw`.
fn read_back(raw: &Path, work: &Path, partitioned: bool) -> (Option<String>, Vec<String>) {
    let range = if partitioned {
        let part = partitions(raw).expect("table")[0];
        Some((part.offset, part.size))
    } else {
        None
    };
    let attached = Loop::attach(raw, range).expect("loop");
    let device = attached.device.clone();
    let mounted = Mounted::mount(&device, &work.join("check"))
        .expect("mount")
        .expect("ext4");
    let root = mounted.point.clone();
    let machine_id = std::fs::read_to_string(root.join("etc/machine-id")).ok();
    let mut present = Vec::new();
    for p in [
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_ed25519_key.pub",
        "etc/ssh/sshd_config",
        "var/lib/dbus/machine-id",
        "var/lib/dhcp/dhclient.eth0.leases",
        "var/lib/cloud/instances/i-123",
        "var/lib/NetworkManager/internal.lease",
        "var/lib/systemd/random-seed",
    ] {
        if std::fs::symlink_metadata(root.join(p)).is_ok() {
            present.push(p.to_string());
        }
    }
    let hostname_meta = std::fs::symlink_metadata(root.join("etc/hostname")).expect("hostname");
    assert!(
        hostname_meta.file_type().is_file(),
        "hostname is a file now"
    );
    present.push(std::fs::read_to_string(root.join("etc/hostname")).expect("read hostname"));
    (machine_id, present)
}

#[test]
fn staging_strips_identity_from_a_partitioned_disk_and_a_bare_filesystem() {
    if !hostfs::is_root() {
        eprintln!("skipped: staging needs root (loop devices, mounts)");
        return;
    }
    let passwd_before = std::fs::read("/etc/passwd").expect("host passwd");
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    guest_tree(&tree);

    // A partitioned disk: MBR, one ext4 partition at 1 MiB; uploaded as qcow2.
    let fs = dir.path().join("fs.ext4");
    mkfs(&tree, &fs, "32M");
    let disk = dir.path().join("disk.img");
    let total: u64 = 40 << 20;
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(total))
        .expect("disk");
    write_mbr(&disk, total);
    let out = Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"])
        .output()
        .expect("dd");
    assert!(out.status.success());
    let upload = dir.path().join("upload.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&disk), s(&upload)]);

    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("work");
    let target = dir.path().join("model.qcow2");
    let imported = import_disk(
        &upload,
        DiskFormat::Qcow2,
        &limits(),
        &work,
        &target,
        "imported-host",
    )
    .expect("imported");
    assert_eq!(imported.layout, DiskLayout::FullDisk { root_partition: 1 });
    assert_eq!(imported.virtual_bytes, total);
    assert!(
        imported
            .stripped
            .contains(&"/etc/ssh/ssh_host_ed25519_key".to_string()),
        "{:?}",
        imported.stripped
    );
    assert_eq!(
        std::fs::read("/etc/passwd").expect("host passwd"),
        passwd_before,
        "a link in the guest must not write the host"
    );
    assert_eq!(
        hostfs::mounts_under(dir.path()).expect("mounts"),
        Vec::<PathBuf>::new()
    );
    // Read the stored model back.
    let back = dir.path().join("back.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&target), s(&back)]);
    let (machine_id, present) = read_back(&back, dir.path(), true);
    assert_eq!(machine_id.as_deref(), Some(""));
    assert_eq!(
        present,
        vec![
            "etc/ssh/sshd_config".to_string(),
            "imported-host\n".to_string()
        ]
    );

    // A bare filesystem, uploaded raw.
    let work = dir.path().join("work2");
    std::fs::create_dir(&work).expect("work");
    let target = dir.path().join("model2.qcow2");
    let bare = dir.path().join("bare.ext4");
    mkfs(&tree, &bare, "32M");
    let imported = import_disk(
        &bare,
        DiskFormat::Raw,
        &limits(),
        &work,
        &target,
        "placeholder",
    )
    .expect("imported");
    assert_eq!(imported.layout, DiskLayout::Filesystem);
    let back = dir.path().join("back2.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&target), s(&back)]);
    let (machine_id, present) = read_back(&back, dir.path(), false);
    assert_eq!(machine_id.as_deref(), Some(""));
    assert_eq!(present.last().map(String::as_str), Some("placeholder\n"));
}

#[test]
fn a_disk_without_an_os_is_refused_and_nothing_stays_attached() {
    if !hostfs::is_root() {
        eprintln!("skipped: staging needs root (loop devices, mounts)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("data")).expect("mkdir");
    let bare = dir.path().join("bare.ext4");
    mkfs(&tree, &bare, "16M");
    let target = dir.path().join("model.qcow2");
    let err = import_disk(&bare, DiskFormat::Raw, &limits(), dir.path(), &target, "x")
        .expect_err("no OS");
    assert!(matches!(err, ImportError::RefusedNoRoot), "{err}");
    assert!(!target.exists());
    assert_eq!(
        hostfs::mounts_under(dir.path()).expect("mounts"),
        Vec::<PathBuf>::new()
    );
    let loops = Command::new("losetup")
        .args(["-j"])
        .arg(dir.path().join("disk.raw"))
        .output()
        .expect("losetup -j");
    assert!(String::from_utf8_lossy(&loops.stdout).trim().is_empty());
}

#[test]
fn partitions_are_read_from_an_mbr_and_from_a_gpt() {
    let dir = tempfile::tempdir().expect("tempdir");
    // MBR: one partition from sector 2048 to the end.
    let mbr_disk = dir.path().join("mbr.img");
    let total: u64 = 8 << 20;
    std::fs::File::create(&mbr_disk)
        .and_then(|f| f.set_len(total))
        .expect("disk");
    write_mbr(&mbr_disk, total);
    assert_eq!(
        partitions(&mbr_disk).expect("mbr"),
        vec![Partition {
            number: 1,
            offset: 2048 * 512,
            size: total - 2048 * 512
        }]
    );

    // GPT: a protective MBR, the header at LBA 1, entries at LBA 2; partition 2 used.
    use std::io::{Seek, SeekFrom};
    let gpt_disk = dir.path().join("gpt.img");
    let mut file = std::fs::File::create(&gpt_disk).expect("disk");
    file.set_len(total).expect("size");
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0xee;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((total / 512 - 1) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    file.write_all(&mbr).expect("mbr");
    let mut header = [0u8; 92];
    header[0..8].copy_from_slice(b"EFI PART");
    header[72..80].copy_from_slice(&2u64.to_le_bytes());
    header[80..84].copy_from_slice(&4u32.to_le_bytes());
    header[84..88].copy_from_slice(&128u32.to_le_bytes());
    file.seek(SeekFrom::Start(512)).expect("seek");
    file.write_all(&header).expect("header");
    let mut entry = [0u8; 128];
    entry[0] = 0xaf; // a non-zero type GUID
    entry[32..40].copy_from_slice(&4096u64.to_le_bytes());
    entry[40..48].copy_from_slice(&8191u64.to_le_bytes());
    file.seek(SeekFrom::Start(1024 + 128)).expect("seek");
    file.write_all(&entry).expect("entry");
    // An entry past the end of the disk is left out.
    let mut beyond = entry;
    beyond[32..40].copy_from_slice(&(total / 512 + 10).to_le_bytes());
    beyond[40..48].copy_from_slice(&(total / 512 + 20).to_le_bytes());
    file.write_all(&beyond).expect("entry");
    drop(file);
    assert_eq!(
        partitions(&gpt_disk).expect("gpt"),
        vec![Partition {
            number: 2,
            offset: 4096 * 512,
            size: 4096 * 512
        }]
    );

    // No table (a bare filesystem): no partitions.
    let bare = dir.path().join("bare.img");
    std::fs::write(&bare, vec![0u8; 4096]).expect("bare");
    assert!(partitions(&bare).expect("bare").is_empty());
}
