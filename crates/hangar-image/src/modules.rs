//! Kernel modules for the initramfs: the required set, their dependency closure from
//! each module's `.modinfo` section, and a load order with dependencies first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::AssetError;

/// Modules every guest needs (names with `-` and `_` are equivalent).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_balloon",
    "virtio_rng",
    "overlay",
    "squashfs",
    "erofs",
];

/// One module, ready to be put in the initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    /// Normalised name (`_` for `-`).
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Module names are the same with `-` or `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The `depends=` list of a module's `.modinfo` section (empty when it has none).
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let file = object::File::parse(ko).map_err(|e| format!("not an ELF object: {e}"))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or("no .modinfo section")?;
    let data = section.data().map_err(|e| format!(".modinfo: {e}"))?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(|d| normalize(d.trim()))
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// The closure of `roots` under `depends`, ordered so that every module comes after its
/// dependencies; otherwise in the order first reached (depth first, roots in order).
pub fn load_order(
    roots: &[&str],
    mut depends: impl FnMut(&str) -> Result<Vec<String>, AssetError>,
) -> Result<Vec<String>, AssetError> {
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Vec<String>, AssetError>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), AssetError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|n| n == name).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(name.to_string());
                return Err(AssetError::ModuleCycle { cycle });
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        stack.push(name.to_string());
        for dep in depends(name)? {
            visit(&dep, depends, marks, stack, order)?;
        }
        stack.pop();
        marks.insert(name.to_string(), Mark::Done);
        order.push(name.to_string());
        Ok(())
    }

    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for root in roots {
        visit(
            &normalize(root),
            &mut depends,
            &mut marks,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// Every `.ko` under `dir`, by normalised name.
fn index(dir: &Path) -> Result<(BTreeMap<String, PathBuf>, BTreeSet<String>), AssetError> {
    let mut plain = BTreeMap::new();
    let mut compressed = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .map_err(|e| AssetError::io(format!("list {}", current.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
                continue;
            }
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(stem) = file_name.strip_suffix(".ko") {
                plain.insert(normalize(stem), path.clone());
            } else if let Some((stem, _)) = file_name.split_once(".ko.") {
                compressed.insert(normalize(stem));
            }
        }
    }
    Ok((plain, compressed))
}

/// Reads the required modules and their dependencies from `dir`
/// (`lib/modules/<release>/kernel`), in load order.
pub fn resolve(dir: &Path, required: &[&str]) -> Result<Vec<Module>, AssetError> {
    let (index, compressed) = index(dir)?;
    let mut read: BTreeMap<String, Module> = BTreeMap::new();
    let order = load_order(required, |name| {
        let Some(path) = index.get(name) else {
            if compressed.contains(name) {
                return Err(AssetError::ModuleCompressed {
                    path: dir.join(format!("{name}.ko.*")),
                });
            }
            return Err(AssetError::ModuleMissing {
                name: name.to_string(),
                dir: dir.to_path_buf(),
            });
        };
        let bytes = std::fs::read(path)
            .map_err(|e| AssetError::io(format!("read {}", path.display()), e))?;
        let depends = modinfo_depends(&bytes).map_err(|reason| AssetError::ModuleInfo {
            path: path.clone(),
            reason,
        })?;
        read.insert(
            name.to_string(),
            Module {
                name: name.to_string(),
                path: path.clone(),
                bytes,
            },
        );
        Ok(depends)
    })?;
    tracing::debug!(order = ?order, "module load order");
    Ok(order
        .into_iter()
        .map(|name| read.remove(&name).expect("every ordered module was read"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> impl FnMut(&str) -> Result<Vec<String>, AssetError> {
        let map: BTreeMap<String, Vec<String>> = edges
            .iter()
            .map(|(n, deps)| (n.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect();
        move |name| Ok(map.get(name).cloned().unwrap_or_default())
    }

    #[test]
    fn dependencies_come_first() {
        let order = load_order(
            &["virtio_net", "virtio-blk", "overlay"],
            graph(&[
                ("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
                ("net_failover", &["failover"]),
                ("virtio", &["virtio_ring"]),
                ("virtio_blk", &["virtio", "virtio_ring"]),
            ]),
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net",
                "virtio_blk",
                "overlay"
            ]
        );
        for (i, name) in order.iter().enumerate() {
            assert!(!order[i + 1..].contains(name), "{name} listed once");
        }
    }

    #[test]
    fn cycles_are_errors() {
        let err = load_order(
            &["a"],
            graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel modules depend on each other in a cycle: a -> b -> c -> a"
        );
    }

    #[test]
    fn missing_modules_name_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("erofs.ko.xz"), b"").unwrap();
        let err = resolve(dir.path(), &["virtio_mmio"]).unwrap_err();
        assert!(matches!(err, AssetError::ModuleMissing { .. }), "{err}");
        let err = resolve(dir.path(), &["erofs"]).unwrap_err();
        assert!(matches!(err, AssetError::ModuleCompressed { .. }), "{err}");
    }

    #[test]
    fn reads_depends_from_modinfo() {
        // A minimal ELF64 relocatable object with a .modinfo section.
        let modinfo = b"license=GPL\0depends=virtio,virtio_ring,net-failover\0name=virtio_net\0";
        let ko = tiny_elf_with_section(".modinfo", modinfo);
        assert_eq!(
            modinfo_depends(&ko).unwrap(),
            ["virtio", "virtio_ring", "net_failover"]
        );
        let none = tiny_elf_with_section(".modinfo", b"depends=\0name=virtio\0");
        assert!(modinfo_depends(&none).unwrap().is_empty());
        assert!(modinfo_depends(b"junk").is_err());
    }

    /// ELF64 LE relocatable: header, one data section, a section name table.
    fn tiny_elf_with_section(name: &str, data: &[u8]) -> Vec<u8> {
        let shstrtab = [b"\0", name.as_bytes(), b"\0.shstrtab\0"].concat();
        let data_off = 64usize;
        let shstr_off = data_off + data.len();
        let sh_off = (shstr_off + shstrtab.len()).next_multiple_of(8);
        let mut elf = vec![0u8; sh_off + 3 * 64];
        elf[0..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[40..48].copy_from_slice(&(sh_off as u64).to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        elf[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        elf[60..62].copy_from_slice(&3u16.to_le_bytes()); // shnum
        elf[62..64].copy_from_slice(&2u16.to_le_bytes()); // shstrndx
        elf[data_off..shstr_off].copy_from_slice(data);
        elf[shstr_off..shstr_off + shstrtab.len()].copy_from_slice(&shstrtab);
        let mut section = |index: usize, name_off: u32, kind: u32, off: usize, size: usize| {
            let at = sh_off + index * 64;
            elf[at..at + 4].copy_from_slice(&name_off.to_le_bytes());
            elf[at + 4..at + 8].copy_from_slice(&kind.to_le_bytes());
            elf[at + 24..at + 32].copy_from_slice(&(off as u64).to_le_bytes());
            elf[at + 32..at + 40].copy_from_slice(&(size as u64).to_le_bytes());
            elf[at + 48..at + 56].copy_from_slice(&1u64.to_le_bytes());
        };
        section(1, 1, 1, data_off, data.len()); // PROGBITS
        section(2, (name.len() + 2) as u32, 3, shstr_off, shstrtab.len()); // STRTAB
        elf
    }
}
