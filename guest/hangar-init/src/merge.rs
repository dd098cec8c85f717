//! Merging the system databases of read-only layers built side by side.
//!
//! A composed root stacks the layers of several applications over one OS layer; each
//! application's layers were built over the OS layer alone, so each carries its own copy
//! of the files every package installation rewrites: the user and group databases and
//! dpkg's status. overlayfs shows only the topmost copy, which would hide the users and
//! packages of every other application. [`merge_databases`] writes the union of every
//! layer's copy into the root (so into its writable upper layer), entry by entry:
//!
//! - `/etc/passwd`, `/etc/shadow`: one line per user, keyed by the name before the first
//!   `:`; the topmost layer's line wins.
//! - `/etc/group`, `/etc/gshadow`: the same, with the member list (the last field) the
//!   union of every layer's.
//! - `/var/lib/dpkg/status`: one stanza per package (`Package` and `Architecture`), the
//!   topmost layer's stanza winning, sorted by package as dpkg writes it.
//!
//! Entries keep the order in which the lowest layer holding them lists them, followed
//! by the entries later layers add.

use std::collections::BTreeMap;
use std::path::Path;

/// How one database is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `name:...` lines, the topmost wins.
    Lines,
    /// `name:...:members` lines, the topmost wins, members are the union.
    Groups,
    /// dpkg status stanzas.
    Stanzas,
}

/// The databases a composed root merges, with how.
pub const DATABASES: &[(&str, Kind)] = &[
    ("etc/passwd", Kind::Lines),
    ("etc/shadow", Kind::Lines),
    ("etc/group", Kind::Groups),
    ("etc/gshadow", Kind::Groups),
    ("var/lib/dpkg/status", Kind::Stanzas),
];

/// Merges `copies` of one database, topmost layer first.
pub fn merge(kind: Kind, copies: &[&str]) -> String {
    match kind {
        Kind::Lines => merge_lines(copies, false),
        Kind::Groups => merge_lines(copies, true),
        Kind::Stanzas => merge_stanzas(copies),
    }
}

fn merge_lines(copies: &[&str], groups: bool) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut lines: BTreeMap<String, String> = BTreeMap::new();
    // Bottom first, so that a higher layer's line replaces a lower one's.
    for copy in copies.iter().rev() {
        for line in copy.lines().filter(|line| !line.trim().is_empty()) {
            let key = line.split(':').next().unwrap_or(line).to_owned();
            let merged = match lines.get(&key) {
                None => {
                    order.push(key.clone());
                    line.to_owned()
                }
                Some(previous) if groups => union_members(line, previous),
                Some(_) => line.to_owned(),
            };
            lines.insert(key, merged);
        }
    }
    let mut out = String::new();
    for key in order {
        out.push_str(&lines[&key]);
        out.push('\n');
    }
    out
}

/// `line` with its last field (a comma-separated member list) extended by the members of
/// `previous` it lacks.
fn union_members(line: &str, previous: &str) -> String {
    let (head, members) = line.rsplit_once(':').unwrap_or((line, ""));
    let (_, previous_members) = previous.rsplit_once(':').unwrap_or((previous, ""));
    let mut all: Vec<&str> = members.split(',').filter(|m| !m.is_empty()).collect();
    for member in previous_members.split(',').filter(|m| !m.is_empty()) {
        if !all.contains(&member) {
            all.push(member);
        }
    }
    format!("{head}:{}", all.join(","))
}

fn merge_stanzas(copies: &[&str]) -> String {
    let mut stanzas: BTreeMap<(String, String), String> = BTreeMap::new();
    for copy in copies.iter().rev() {
        for stanza in copy.split("\n\n") {
            let stanza = stanza.trim_matches('\n');
            if stanza.is_empty() {
                continue;
            }
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .map(|value| value.trim().to_owned())
                    .unwrap_or_default()
            };
            stanzas.insert((field("Package"), field("Architecture")), stanza.to_owned());
        }
    }
    let mut out = String::new();
    for stanza in stanzas.values() {
        out.push_str(stanza);
        out.push_str("\n\n");
    }
    out
}

/// Writes the merged databases of the read-only `layers` (mount points, topmost first)
/// into `root` (the overlay over them), for each database at least two layers hold in
/// different versions, unless the writable layer `upper` (its `data/`) already has its
/// own copy (the VM changed it: it is kept). Files are rewritten in place, so they keep
/// the mode and owner the topmost copy has. Returns the databases written.
pub fn merge_databases(
    layers: &[&Path],
    upper: &Path,
    root: &Path,
) -> Result<Vec<&'static str>, String> {
    let mut written = Vec::new();
    for (path, kind) in DATABASES {
        if upper.join(path).exists() {
            continue;
        }
        let mut copies: Vec<String> = Vec::new();
        for layer in layers {
            match std::fs::read_to_string(layer.join(path)) {
                Ok(text) => copies.push(text),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(format!("read {}: {err}", layer.join(path).display())),
            }
        }
        let distinct = copies.iter().skip(1).any(|copy| *copy != copies[0]);
        if !distinct {
            continue;
        }
        let texts: Vec<&str> = copies.iter().map(String::as_str).collect();
        let merged = merge(*kind, &texts);
        if merged == copies[0] {
            continue;
        }
        let target = root.join(path);
        std::fs::write(&target, merged).map_err(|e| format!("write {}: {e}", target.display()))?;
        written.push(*path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE_PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n";

    #[test]
    fn users_of_every_layer_exist_and_the_topmost_line_wins() {
        let redis = format!("{BASE_PASSWD}redis:x:100:101::/var/lib/redis:/usr/sbin/nologin\n");
        let nginx = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nnginx:x:102:103::/nonexistent:/usr/sbin/nologin\n";
        let merged = merge(Kind::Lines, &[nginx, &redis, BASE_PASSWD]);
        assert_eq!(
            merged,
            "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nredis:x:100:101::/var/lib/redis:/usr/sbin/nologin\nnginx:x:102:103::/nonexistent:/usr/sbin/nologin\n"
        );
    }

    #[test]
    fn group_members_are_the_union() {
        let a = "root:x:0:\nssl-cert:x:110:postgres\nredis:x:101:\n";
        let b = "root:x:0:\nssl-cert:x:110:www-data\n";
        let merged = merge(Kind::Groups, &[a, b]);
        assert_eq!(
            merged,
            "root:x:0:\nssl-cert:x:110:postgres,www-data\nredis:x:101:\n"
        );
        // gshadow: name:password:admins:members.
        let merged = merge(Kind::Groups, &["adm:*::syslog\n", "adm:*::root\n"]);
        assert_eq!(merged, "adm:*::syslog,root\n");
    }

    #[test]
    fn dpkg_status_has_every_package_once_sorted() {
        let base = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36\n\nPackage: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2\n";
        let redis = format!(
            "{base}\nPackage: redis-server\nStatus: install ok installed\nArchitecture: amd64\nVersion: 7.0\nDescription: Persistent key-value database\n with network interface\n"
        );
        let nginx = format!(
            "{base}\nPackage: nginx-light\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.22\n"
        );
        let merged = merge(Kind::Stanzas, &[&nginx, &redis, base]);
        let packages: Vec<&str> = merged
            .lines()
            .filter_map(|line| line.strip_prefix("Package: "))
            .collect();
        assert_eq!(packages, ["bash", "libc6", "nginx-light", "redis-server"]);
        assert!(
            merged.contains(
                "Description: Persistent key-value database\n with network interface\n\n"
            )
        );
        assert!(merged.ends_with("\n\n"));
        // A package upgraded in a higher layer: the higher stanza wins.
        let upgraded = base.replace("Version: 5.2", "Version: 5.3");
        let merged = merge(Kind::Stanzas, &[&upgraded, base]);
        assert!(merged.contains("Version: 5.3") && !merged.contains("Version: 5.2"));
    }

    #[test]
    fn databases_are_written_into_the_root_only_when_layers_differ() {
        let dir = std::env::temp_dir().join(format!("hangar-init-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layer = |name: &str, passwd: &str, status: &str| {
            let layer = dir.join(name);
            std::fs::create_dir_all(layer.join("etc")).expect("mkdir");
            std::fs::create_dir_all(layer.join("var/lib/dpkg")).expect("mkdir");
            std::fs::write(layer.join("etc/passwd"), passwd).expect("write");
            std::fs::write(layer.join("etc/group"), "root:x:0:\n").expect("write");
            std::fs::write(layer.join("var/lib/dpkg/status"), status).expect("write");
            layer
        };
        let os = layer("os", BASE_PASSWD, "Package: bash\nArchitecture: amd64\n");
        let redis = layer(
            "redis",
            &format!("{BASE_PASSWD}redis:x:100:101::/:/bin/false\n"),
            "Package: bash\nArchitecture: amd64\n\nPackage: redis-server\nArchitecture: amd64\n",
        );
        let nginx = layer(
            "nginx",
            BASE_PASSWD,
            "Package: bash\nArchitecture: amd64\n\nPackage: nginx-light\nArchitecture: amd64\n",
        );
        // The root as the overlay shows it: the topmost layer's files.
        let root = layer(
            "root",
            BASE_PASSWD,
            "Package: bash\nArchitecture: amd64\n\nPackage: nginx-light\nArchitecture: amd64\n",
        );
        let upper = dir.join("upper");
        std::fs::create_dir_all(&upper).expect("mkdir");
        let written = merge_databases(&[&nginx, &redis, &os], &upper, &root).expect("merges");
        assert_eq!(written, ["etc/passwd", "var/lib/dpkg/status"]);
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("read");
        assert!(passwd.contains("redis:x:100"), "{passwd}");
        let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).expect("read");
        assert!(
            status.contains("Package: redis-server") && status.contains("Package: nginx-light")
        );
        // A database the VM already changed in its own layer is left alone.
        std::fs::create_dir_all(upper.join("etc")).expect("mkdir");
        std::fs::write(upper.join("etc/passwd"), "mine\n").expect("write");
        std::fs::write(root.join("etc/passwd"), "mine\n").expect("write");
        let written = merge_databases(&[&nginx, &redis, &os], &upper, &root).expect("merges");
        assert_eq!(written, ["var/lib/dpkg/status"]);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/passwd")).expect("read"),
            "mine\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
