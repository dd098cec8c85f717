//! Busybox base images: a directory tree with busybox, its applet links, the usual
//! directories, root's passwd/group entries and the given files, made into an ext4
//! filesystem (`mkfs.ext4 -d`) and converted to qcow2.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::{AssetError, AssetSources, BaseImage, DEFAULT_BUSYBOX, ImageFile, cache, tools};

/// Version of the image layout; bump it when the build of an image changes.
const IMAGE_FORMAT: u32 = 1;

/// Free space added to the content, in bytes.
const HEADROOM: u64 = 32 << 20;

/// Directories every image has, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
    ("var/log", 0o755),
    ("www", 0o755),
];

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// The busybox binary to use, checked to be statically linked.
pub struct Busybox {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

pub fn read_busybox(sources: &AssetSources) -> Result<Busybox, AssetError> {
    let path = sources
        .busybox
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX));
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AssetError::BusyboxMissing { path });
        }
        Err(e) => return Err(AssetError::io(format!("read {}", path.display()), e)),
    };
    if tools::has_interpreter(&bytes) {
        return Err(AssetError::BusyboxNotStatic { path });
    }
    Ok(Busybox { path, bytes })
}

/// The applets a busybox offers (`busybox --list`).
fn applets(busybox: &Path) -> Result<Vec<String>, AssetError> {
    let output = tools::run(Command::new(busybox).arg("--list"))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox" && !name.contains('/'))
        .map(str::to_string)
        .collect())
}

/// Checks an image file path and returns it relative to the image root.
pub fn relative_path(path: &str) -> Result<PathBuf, AssetError> {
    let invalid = |reason: &str| AssetError::InvalidImageFile {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid("not absolute"));
    }
    let mut out = PathBuf::new();
    for component in p.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return Err(invalid("contains '..'")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid("names the root"));
    }
    Ok(out)
}

/// The hash naming an image of these inputs.
fn image_hash(busybox_digest: &[u8], files: &BTreeMap<String, ImageFile>) -> String {
    let mut hasher = cache::InputHasher::new("busybox-image", IMAGE_FORMAT);
    hasher.field("busybox", busybox_digest);
    for (path, file) in files {
        hasher.field("path", path.as_bytes());
        hasher.field("mode", &file.mode.to_le_bytes());
        hasher.field("contents", &file.contents);
    }
    hasher.finish()
}

/// Filesystem size for `content` bytes: content plus headroom, rounded up to a MiB.
pub fn filesystem_size(content: u64) -> u64 {
    (content + HEADROOM).next_multiple_of(1 << 20)
}

pub fn ensure_busybox_image(
    cache_dir: &Path,
    sources: &AssetSources,
    files: &BTreeMap<String, ImageFile>,
) -> Result<BaseImage, AssetError> {
    let busybox = read_busybox(sources)?;
    for path in files.keys() {
        relative_path(path)?;
    }
    let hash = image_hash(
        cache::file_digest(cache_dir, &busybox.path)?.as_bytes(),
        files,
    );
    let images = cache_dir.join("images");
    let dest = images.join(format!("{hash}.qcow2"));
    if dest.is_file() {
        tracing::debug!(hash = %hash, "busybox image cached");
        return Ok(BaseImage {
            size_bytes: qcow2_virtual_size(&dest)?,
            path: dest,
            hash,
        });
    }

    let mkfs = tools::find("mkfs.ext4", "e2fsprogs")?;
    let qemu_img = tools::find("qemu-img", "qemu-utils")?;
    tracing::info!(hash = %hash, files = files.len(), "building busybox image");
    let started = std::time::Instant::now();

    let tmp = cache::temp_dir_in(&images)?;
    let root = tmp.path().join("root");
    populate(&root, &busybox, files)?;
    let size = filesystem_size(tree_size(&root)?);
    let raw = tmp.path().join("image.raw");
    tools::run(
        Command::new(&mkfs)
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .args(["-L", "hangar-root"])
            .arg(&raw)
            .arg(format!("{}M", size >> 20)),
    )?;
    let qcow2 = tmp.path().join("image.qcow2");
    tools::run(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;
    cache::publish_file(&qcow2, &dest)?;
    tracing::info!(
        hash = %hash,
        size_bytes = size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "busybox image ready"
    );
    Ok(BaseImage {
        path: dest,
        hash,
        size_bytes: size,
    })
}

/// Lays out the image tree under `root`.
fn populate(
    root: &Path,
    busybox: &crate::rootfs::Busybox,
    files: &BTreeMap<String, ImageFile>,
) -> Result<(), AssetError> {
    let io = |what: String| move |e| AssetError::io(what, e);
    for (dir, mode) in std::iter::once(&("", 0o755)).chain(DIRS) {
        let path = root.join(dir);
        std::fs::create_dir_all(&path).map_err(io(format!("mkdir {}", path.display())))?;
        set_mode(&path, *mode)?;
    }
    let bin = root.join("bin");
    let target = bin.join("busybox");
    std::fs::write(&target, &busybox.bytes).map_err(io(format!("write {}", target.display())))?;
    set_mode(&target, 0o755)?;
    for applet in applets(&busybox.path)? {
        let link = bin.join(&applet);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(io(format!("symlink {}", link.display())))?;
        }
    }
    if bin.join("sh").symlink_metadata().is_err() {
        std::os::unix::fs::symlink("busybox", bin.join("sh"))
            .map_err(io("symlink /bin/sh".into()))?;
    }
    for (name, contents) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        let path = root.join(name);
        std::fs::write(&path, contents).map_err(io(format!("write {}", path.display())))?;
        set_mode(&path, 0o644)?;
    }
    for (path, file) in files {
        let dest = root.join(relative_path(path)?);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        if dest
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(&dest).map_err(io(format!("remove {}", dest.display())))?;
        }
        std::fs::write(&dest, &file.contents).map_err(io(format!("write {}", dest.display())))?;
        set_mode(&dest, file.mode)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), AssetError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AssetError::io(format!("chmod {}", path.display()), e))
}

/// Bytes of content under `dir` (files at their length, everything else a block).
pub(crate) fn tree_size(dir: &Path) -> Result<u64, AssetError> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .map_err(|e| AssetError::io(format!("list {}", current.display()), e))?;
        for entry in entries.flatten() {
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(|e| AssetError::io(format!("stat {}", entry.path().display()), e))?;
            total += 4096 + if meta.is_file() { meta.len() } else { 0 };
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// The virtual size recorded in a qcow2 header (big-endian u64 at byte 24).
pub fn qcow2_virtual_size(path: &Path) -> Result<u64, AssetError> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| AssetError::io(format!("read the qcow2 header of {}", path.display()), e))?;
    if &header[0..4] != b"QFI\xfb" {
        return Err(AssetError::io(
            format!("{} is not a qcow2 image", path.display()),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        ));
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().expect("8 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_are_checked() {
        assert_eq!(
            relative_path("/www/index.html").unwrap(),
            PathBuf::from("www/index.html")
        );
        assert!(relative_path("www/index.html").is_err());
        assert!(relative_path("/www/../../etc").is_err());
        let err = relative_path("/").unwrap_err().to_string();
        assert!(err.contains("names the root"), "{err}");
    }

    #[test]
    fn sizes_add_headroom_and_round_to_mib() {
        assert_eq!(filesystem_size(0), 32 << 20);
        assert_eq!(filesystem_size(1), 33 << 20);
        assert_eq!(filesystem_size(3 << 20), 35 << 20);
    }

    #[test]
    fn hash_changes_with_files() {
        let mut files = BTreeMap::new();
        let empty = image_hash(b"bb", &files);
        files.insert(
            "/a".to_string(),
            ImageFile {
                contents: b"x".to_vec(),
                mode: 0o644,
            },
        );
        let one = image_hash(b"bb", &files);
        assert_ne!(empty, one);
        files.get_mut("/a").unwrap().mode = 0o755;
        assert_ne!(one, image_hash(b"bb", &files));
        assert_ne!(empty, image_hash(b"bb2", &BTreeMap::new()));
    }

    #[test]
    fn dynamic_busybox_is_refused_with_advice() {
        let sources = AssetSources {
            kernel: None,
            busybox: Some("/bin/sh".into()),
        };
        let err = read_busybox(&sources).err().unwrap().to_string();
        assert!(err.contains("busybox-static"), "{err}");
        let sources = AssetSources {
            kernel: None,
            busybox: Some("/nonexistent/busybox".into()),
        };
        let err = read_busybox(&sources).err().unwrap().to_string();
        assert!(err.contains("apt-get install busybox-static"), "{err}");
    }
}
