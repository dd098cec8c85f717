//! The guest kernel: getting Debian's cloud kernel package, and turning its bzImage into
//! the uncompressed ELF `vmlinux` that QEMU's `microvm` boots directly (PVH).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{AssetError, cache, tools};

/// The metapackage that always depends on the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Legacy LZ4 frame magic (`lz4 -l`), as used by the kernel's `unlz4`.
const LEGACY_LZ4_MAGIC: u32 = 0x184C_2102;
/// Largest decompressed size of one legacy LZ4 block.
const LEGACY_LZ4_BLOCK: usize = 8 << 20;

/// A kernel package's contents on disk.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `boot/vmlinuz-<release>` (a bzImage).
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>/kernel`.
    pub modules_dir: PathBuf,
}

/// Finds the kernel: an extracted directory, a .deb (extracted once into the cache), or,
/// with no source, Debian's cloud kernel fetched once with `apt-get download`.
pub fn resolve(cache_dir: &Path, source: Option<&Path>) -> Result<KernelTree, AssetError> {
    match source {
        None => {
            let deb = fetch_default(&cache_dir.join("downloads"))?;
            from_deb(cache_dir, &deb)
        }
        Some(path) if path.is_dir() => from_dir(path),
        Some(path) if path.is_file() => from_deb(cache_dir, path),
        Some(path) => Err(AssetError::KernelSource {
            path: path.to_path_buf(),
            reason: "no such file or directory".into(),
        }),
    }
}

/// Reads an extracted kernel package: exactly one `boot/vmlinuz-<release>` with a
/// matching `lib/modules/<release>/kernel`.
pub fn from_dir(dir: &Path) -> Result<KernelTree, AssetError> {
    let bad = |reason: String| AssetError::KernelSource {
        path: dir.to_path_buf(),
        reason,
    };
    let boot = dir.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(|e| bad(format!("cannot list boot/: {e}")))?;
    let mut releases: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .filter(|release| {
            dir.join("lib/modules")
                .join(release)
                .join("kernel")
                .is_dir()
        })
        .collect();
    releases.sort();
    match releases.as_slice() {
        [release] => Ok(KernelTree {
            release: release.clone(),
            vmlinuz: boot.join(format!("vmlinuz-{release}")),
            modules_dir: dir.join("lib/modules").join(release).join("kernel"),
        }),
        [] => Err(bad(
            "no boot/vmlinuz-<release> with a matching lib/modules/<release>/kernel".into(),
        )),
        many => Err(bad(format!(
            "several kernels ({}); give one",
            many.join(", ")
        ))),
    }
}

/// Extracts a kernel .deb into `<cache>/kernels/<sha256 of the deb>/`, once.
fn from_deb(cache_dir: &Path, deb: &Path) -> Result<KernelTree, AssetError> {
    let hash = cache::file_digest(cache_dir, deb)?;
    let kernels = cache_dir.join("kernels");
    let dir = kernels.join(&hash);
    if dir.is_dir() {
        tracing::debug!(deb = %deb.display(), "kernel package already extracted");
        return from_dir(&dir);
    }
    let dpkg_deb = tools::find("dpkg-deb", "dpkg")?;
    tracing::info!(deb = %deb.display(), dest = %dir.display(), "extracting kernel package");
    cache::publish_dir(&kernels, &hash, |tmp| {
        tools::run(Command::new(&dpkg_deb).arg("-x").arg(deb).arg(tmp))?;
        from_dir(tmp).map(|_| ())
    })?;
    from_dir(&dir)
}

/// Returns the real kernel package (`linux-image-<release>_*.deb`) in `downloads`,
/// fetching it with `apt-get download` (via the metapackage's `Depends`) when absent.
fn fetch_default(downloads: &Path) -> Result<PathBuf, AssetError> {
    if let Some(deb) = downloaded_kernel(downloads)? {
        tracing::debug!(deb = %deb.display(), "using the downloaded kernel package");
        return Ok(deb);
    }
    let fetch_err = |detail: String| AssetError::KernelFetch { detail };
    let apt_get = tools::find("apt-get", "apt").map_err(|e| fetch_err(e.to_string()))?;
    let dpkg_deb = tools::find("dpkg-deb", "dpkg").map_err(|e| fetch_err(e.to_string()))?;
    let tmp = cache::temp_dir_in(downloads)?;
    let download = |package: &str| -> Result<PathBuf, AssetError> {
        tracing::info!(package, "downloading with apt-get");
        tools::run(
            Command::new(&apt_get)
                .arg("download")
                .arg(package)
                .current_dir(tmp.path()),
        )
        .map_err(|e| fetch_err(e.to_string()))?;
        find_deb(tmp.path(), package)?
            .ok_or_else(|| fetch_err(format!("apt-get download {package} produced no .deb")))
    };

    let meta = download(KERNEL_METAPACKAGE)?;
    let depends = tools::run(Command::new(&dpkg_deb).arg("-f").arg(&meta).arg("Depends"))
        .map_err(|e| fetch_err(e.to_string()))?;
    let depends = String::from_utf8_lossy(&depends.stdout);
    let package = kernel_dependency(&depends).ok_or_else(|| {
        fetch_err(format!(
            "{KERNEL_METAPACKAGE} depends on no linux-image-<release> package (Depends: {})",
            depends.trim()
        ))
    })?;
    let deb = download(&package)?;
    let dest = downloads.join(deb.file_name().expect("a .deb file name"));
    cache::publish_file(&deb, &dest)?;
    tracing::info!(deb = %dest.display(), "kernel package downloaded");
    Ok(dest)
}

/// A previously downloaded `linux-image-<release>_*.deb` (not the metapackage); the
/// last by name when there are several.
fn downloaded_kernel(downloads: &Path) -> Result<Option<PathBuf>, AssetError> {
    if !downloads.is_dir() {
        return Ok(None);
    }
    let mut debs: Vec<PathBuf> = std::fs::read_dir(downloads)
        .map_err(|e| AssetError::io(format!("list {}", downloads.display()), e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("linux-image-")
                    && !n.starts_with(&format!("{KERNEL_METAPACKAGE}_"))
                    && n.ends_with(".deb")
                    && p.is_file()
            })
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>, AssetError> {
    let prefix = format!("{package}_");
    Ok(std::fs::read_dir(dir)
        .map_err(|e| AssetError::io(format!("list {}", dir.display()), e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

/// The `linux-image-<release>` package named in a `Depends` field, e.g.
/// `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`.
pub fn kernel_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|dep| dep.trim().split([' ', '(']).next().unwrap_or(""))
        .find(|name| {
            name.strip_prefix("linux-image-")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// Extracts the uncompressed ELF kernel from a bzImage whose payload is legacy LZ4.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    let u32_at = |at: usize| {
        bzimage
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| {
                format!(
                    "file too short ({} bytes) for a bzImage header",
                    bzimage.len()
                )
            })
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err("no \"HdrS\" boot protocol signature at 0x202: not a bzImage".into());
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let protected_mode = (setup_sects + 1) * 512;
    let offset = u32_at(0x248)? as usize;
    let length = u32_at(0x24c)? as usize;
    let start = protected_mode + offset;
    let payload = bzimage.get(start..start + length).ok_or_else(|| {
        format!(
            "payload {start}+{length} lies beyond the file ({} bytes)",
            bzimage.len()
        )
    })?;
    let magic = payload.get(0..4).unwrap_or_default();
    if magic != LEGACY_LZ4_MAGIC.to_le_bytes() {
        let format = match magic {
            [0x1f, 0x8b, ..] => "gzip",
            [0xfd, b'7', b'z', b'X'] => "xz",
            [0x28, 0xb5, 0x2f, 0xfd] => "zstd",
            [b'B', b'Z', b'h', ..] => "bzip2",
            _ => "unknown",
        };
        return Err(format!(
            "kernel payload is {format}-compressed, not legacy lz4"
        ));
    }
    let vmlinux = decode_legacy_lz4(payload)?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err("the decompressed payload is not an ELF file".into());
    }
    Ok(vmlinux)
}

/// Decodes a legacy LZ4 stream (`lz4 -l`): the magic, then blocks of
/// `[u32 LE compressed size][LZ4 block]` each decompressing to at most 8 MiB. The kernel
/// build appends the 4-byte uncompressed size; when exactly four bytes remain they are
/// that trailer, checked against the output, not a block. A repeated magic (concatenated
/// streams) is skipped.
pub fn decode_legacy_lz4(stream: &[u8]) -> Result<Vec<u8>, String> {
    if stream.get(0..4) != Some(LEGACY_LZ4_MAGIC.to_le_bytes().as_slice()) {
        return Err("missing legacy lz4 magic".into());
    }
    let mut out = Vec::new();
    let mut block = vec![0u8; LEGACY_LZ4_BLOCK];
    let mut pos = 4;
    while pos < stream.len() {
        let word = stream
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated block header at byte {pos}"))?;
        if pos + 4 == stream.len() {
            if word as usize != out.len() {
                return Err(format!(
                    "trailer says {word} uncompressed bytes, decoded {}",
                    out.len()
                ));
            }
            break;
        }
        pos += 4;
        if word == LEGACY_LZ4_MAGIC {
            continue;
        }
        let compressed = stream
            .get(pos..pos + word as usize)
            .ok_or_else(|| format!("block of {word} bytes at byte {pos} runs past the end"))?;
        let n = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|e| format!("bad lz4 block at byte {pos}: {e}"))?;
        out.extend_from_slice(&block[..n]);
        pos += word as usize;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy stream of `data` in blocks of `block` bytes, with the size trailer.
    fn legacy(data: &[u8], block: usize, trailer: bool) -> Vec<u8> {
        let mut s = LEGACY_LZ4_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
        }
        if trailer {
            s.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        s
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn decodes_multi_block_streams_with_trailer() {
        let data = sample(LEGACY_LZ4_BLOCK + 12345);
        assert_eq!(
            decode_legacy_lz4(&legacy(&data, LEGACY_LZ4_BLOCK, true)).unwrap(),
            data
        );
        assert_eq!(
            decode_legacy_lz4(&legacy(&data, LEGACY_LZ4_BLOCK, false)).unwrap(),
            data
        );
    }

    #[test]
    fn rejects_bad_streams() {
        let data = sample(100_000);
        let mut wrong_trailer = legacy(&data, 65536, false);
        wrong_trailer.extend_from_slice(&7u32.to_le_bytes());
        assert!(
            decode_legacy_lz4(&wrong_trailer)
                .unwrap_err()
                .contains("trailer")
        );
        let good = legacy(&data, 65536, true);
        assert!(decode_legacy_lz4(&good[..good.len() - 100]).is_err());
        assert!(
            decode_legacy_lz4(b"\x04\x22\x4d\x18")
                .unwrap_err()
                .contains("magic")
        );
    }

    #[test]
    fn extracts_the_payload_of_a_synthetic_bzimage() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.extend(sample(300_000));
        let payload = legacy(&elf, LEGACY_LZ4_BLOCK, true);
        let setup_sects = 3u8;
        let pm = (setup_sects as usize + 1) * 512;
        let offset = 0x40usize;
        let mut image = vec![0u8; pm + offset];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&payload);
        image.extend_from_slice(&[0u8; 64]); // whatever follows the payload
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);

        image[0x202] = b'X';
        assert!(extract_vmlinux(&image).unwrap_err().contains("HdrS"));
    }

    #[test]
    fn finds_the_real_kernel_package() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            kernel_dependency(
                "foo, linux-image-cloud-amd64-unsigned | linux-image-6.12.9-cloud-amd64"
            )
            .as_deref(),
            Some("linux-image-6.12.9-cloud-amd64")
        );
        assert_eq!(kernel_dependency("initramfs-tools"), None);
    }

    #[test]
    fn reads_an_extracted_tree() {
        let dir = tempfile::tempdir().unwrap();
        assert!(from_dir(dir.path()).is_err());
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        std::fs::write(dir.path().join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("lib/modules/6.1.0-1-cloud-amd64/kernel")).unwrap();
        let tree = from_dir(dir.path()).unwrap();
        assert_eq!(tree.release, "6.1.0-1-cloud-amd64");
        assert!(tree.vmlinuz.ends_with("boot/vmlinuz-6.1.0-1-cloud-amd64"));
    }
}
