//! Components a service is built from (seed 000's "service provider data"): server software
//! and patches (Debian packages), and applications (files, configuration templates, start
//! commands, ports, ready criteria, per-request settings). Every component states what it
//! runs on, requires and conflicts with; [`Components::closure`] resolves a set of roots
//! into everything they need, dependencies first, and [`Components::viable_on`] says
//! whether that set can exist on an operating system, and if not, why.
//!
//! Names are one namespace across software, patches and applications, so that `requires`
//! needs no kind prefix.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::catalog::{FileSpec, Os, OsBase, is_name};

/// What a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    /// Server software: Debian packages (`[software.NAME]`).
    Software,
    /// Package pins or extra packages over software (`[patch.NAME]`).
    Patch,
    /// Files, templates, processes and ports (`[app.NAME]`, or a service's own).
    App,
}

impl ComponentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Software => "software",
            ComponentKind::Patch => "patch",
            ComponentKind::App => "app",
        }
    }
}

/// A Debian package, optionally pinned to a version (`name` or `name=version`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub struct Package {
    pub name: String,
    pub version: Option<String>,
}

impl Package {
    /// Parses `name` or `name=version`, checked against Debian's rules for names and
    /// versions (so that nothing else can reach apt's command line).
    pub fn parse(text: &str) -> Result<Package, String> {
        let (name, version) = match text.split_once('=') {
            Some((name, version)) => (name, Some(version)),
            None => (text, None),
        };
        let name_ok = name.len() >= 2
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !name_ok {
            return Err(format!(
                "{text:?} is not a Debian package name (lowercase letters, digits, '+', '-', '.')"
            ));
        }
        if let Some(version) = version {
            let version_ok = version.starts_with(|c: char| c.is_ascii_digit())
                && version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
            if !version_ok {
                return Err(format!("{text:?}: {version:?} is not a Debian version"));
            }
        }
        Ok(Package {
            name: name.to_owned(),
            version: version.map(str::to_owned),
        })
    }

    /// As apt-get takes it: `name` or `name=version`.
    pub fn apt_arg(&self) -> String {
        match &self.version {
            Some(version) => format!("{}={version}", self.name),
            None => self.name.clone(),
        }
    }
}

/// A per-request setting of an application (`[app.NAME.settings.KEY]`): given in a request
/// as `--env KEY=VALUE`, passed to its processes as `HANGAR_KEY` and substituted for
/// `{{KEY}}` in its templates. Never stored in a shared layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    #[serde(default)]
    pub description: String,
    /// Used when the request gives none; a setting without a default is required.
    pub default: Option<String>,
    /// Hidden in listings (passwords).
    #[serde(default)]
    pub secret: bool,
    /// What a value may look like (`format = "size"`); checked when a request gives one,
    /// before anything starts. Default: [`SettingFormat::Text`].
    #[serde(default, skip_serializing_if = "SettingFormat::is_text")]
    pub format: SettingFormat,
}

impl Setting {
    /// Checks a value given for this setting against its format: `Err` says what is
    /// wrong, in words a client can act on.
    pub fn check(&self, value: &str) -> Result<(), String> {
        self.format.check(value)
    }
}

/// What a setting's value may look like. Every format refuses control characters
/// (newlines included) and values over [`SettingFormat::MAX_LEN`] bytes; settings are
/// rendered into configuration files and passed to processes, so a format is what keeps a
/// value from becoming a second directive or argument there.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SettingFormat {
    /// Any printable text, spaces included (passwords, greetings).
    #[default]
    Text,
    /// One word: 1 to 63 letters, digits, `_`, `-` and `.` (names of users, databases).
    Word,
    /// A whole number, possibly negative (at most 18 digits).
    Int,
    /// An amount of memory or disk: digits, then an optional unit of `k`, `kb`, `m`, `mb`,
    /// `g`, `gb`, `t` or `tb` in any case (`64mb`, `1G`, `4096`).
    Size,
}

impl SettingFormat {
    /// The longest value any setting takes, in bytes.
    pub const MAX_LEN: usize = 4096;

    fn is_text(&self) -> bool {
        *self == SettingFormat::Text
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SettingFormat::Text => "text",
            SettingFormat::Word => "word",
            SettingFormat::Int => "int",
            SettingFormat::Size => "size",
        }
    }

    /// Checks `value` against the format.
    pub fn check(self, value: &str) -> Result<(), String> {
        if value.len() > Self::MAX_LEN {
            return Err(format!(
                "is {} bytes long, more than {}",
                value.len(),
                Self::MAX_LEN
            ));
        }
        if value.chars().any(char::is_control) {
            return Err("must not contain control characters (newlines, tabs, NUL)".into());
        }
        let refused = match self {
            SettingFormat::Text => None,
            SettingFormat::Word => (!((1..=63).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))))
            .then_some("must be one word of 1 to 63 letters, digits, '_', '-' and '.'"),
            SettingFormat::Int => {
                let digits = value.strip_prefix('-').unwrap_or(value);
                (!((1..=18).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())))
                    .then_some("must be a whole number")
            }
            SettingFormat::Size => {
                let unit_at = value
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(value.len());
                let (digits, unit) = value.split_at(unit_at);
                (!((1..=18).contains(&digits.len())
                    && ["", "k", "kb", "m", "mb", "g", "gb", "t", "tb"]
                        .contains(&unit.to_ascii_lowercase().as_str())))
                .then_some(
                    "must be a size: digits and an optional unit (k, kb, m, mb, g, gb, t, tb), such as 64mb",
                )
            }
        };
        match refused {
            Some(why) => Err(why.to_owned()),
            None => Ok(()),
        }
    }
}

/// One component with its constraints and what it brings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Component {
    pub name: String,
    pub kind: ComponentKind,
    pub description: String,
    /// Debian packages (software and patches).
    pub packages: Vec<Package>,
    /// Operating systems it runs on; empty: any that can hold it.
    pub runs_on: Vec<String>,
    pub requires: Vec<String>,
    pub conflicts: Vec<String>,
}

/// The raw form of `[software.NAME]` and `[patch.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPackaged {
    #[serde(default)]
    description: String,
    packages: Vec<String>,
    #[serde(default)]
    runs_on: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    conflicts: Vec<String>,
}

impl RawPackaged {
    pub(crate) fn into_component(
        self,
        name: &str,
        kind: ComponentKind,
    ) -> Result<Component, String> {
        if self.packages.is_empty() {
            return Err("needs at least one package".into());
        }
        let packages = self
            .packages
            .iter()
            .map(|text| Package::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Component {
            name: name.to_owned(),
            kind,
            description: self.description,
            packages,
            runs_on: self.runs_on,
            requires: self.requires,
            conflicts: self.conflicts,
        })
    }
}

/// Every component of a catalog, checked as a whole: names unique across kinds, every
/// reference known, no cycle in `requires`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Components {
    by_name: BTreeMap<String, Component>,
}

/// Why a set of components cannot exist on an OS ("never"), or why the catalog is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComponentError {
    #[error("component {component:?}: {message}")]
    Invalid { component: String, message: String },
    #[error("component {component:?} {relation} unknown {what} {unknown:?}")]
    Unknown {
        component: String,
        relation: &'static str,
        /// `component` or `os`.
        what: &'static str,
        unknown: String,
    },
    #[error("components require each other in a cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
}

impl Components {
    /// Checks and indexes the components. `os` is the catalog's operating systems (for
    /// `runs_on`).
    pub fn new(
        components: impl IntoIterator<Item = Component>,
        os: &BTreeMap<String, Os>,
    ) -> Result<Components, ComponentError> {
        let mut by_name = BTreeMap::new();
        for component in components {
            let invalid = |message: String| ComponentError::Invalid {
                component: component.name.clone(),
                message,
            };
            if !is_name(&component.name) {
                return Err(invalid(
                    "names use lowercase letters, digits and '-', start with a letter, at most 40 characters".into(),
                ));
            }
            if os.contains_key(&component.name) {
                return Err(invalid("has the name of an os".into()));
            }
            if let Some(other) = by_name.get(&component.name) {
                let other: &Component = other;
                return Err(invalid(format!(
                    "is defined twice (as {} and as {})",
                    other.kind.as_str(),
                    component.kind.as_str()
                )));
            }
            for name in &component.runs_on {
                if !os.contains_key(name) {
                    return Err(ComponentError::Unknown {
                        component: component.name.clone(),
                        relation: "runs on",
                        what: "os",
                        unknown: name.clone(),
                    });
                }
            }
            if component.requires.contains(&component.name) {
                return Err(invalid("requires itself".into()));
            }
            if component.conflicts.contains(&component.name) {
                return Err(invalid("conflicts with itself".into()));
            }
            by_name.insert(component.name.clone(), component);
        }
        let components = Components { by_name };
        for component in components.by_name.values() {
            for (relation, names) in [
                ("requires", &component.requires),
                ("conflicts with", &component.conflicts),
            ] {
                if let Some(unknown) = names.iter().find(|n| !components.by_name.contains_key(*n)) {
                    return Err(ComponentError::Unknown {
                        component: component.name.clone(),
                        relation,
                        what: "component",
                        unknown: unknown.clone(),
                    });
                }
            }
        }
        components.check_acyclic()?;
        Ok(components)
    }

    pub fn get(&self, name: &str) -> Option<&Component> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Component> {
        self.by_name.values()
    }

    fn check_acyclic(&self) -> Result<(), ComponentError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        fn visit<'a>(
            components: &'a Components,
            name: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), ComponentError> {
            match marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    let start = path.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|n| n.to_string()).collect();
                    cycle.push(name.to_owned());
                    return Err(ComponentError::Cycle { cycle });
                }
                None => {}
            }
            marks.insert(name, Mark::Visiting);
            path.push(name);
            for required in &components.by_name[name].requires {
                visit(components, required, marks, path)?;
            }
            path.pop();
            marks.insert(name, Mark::Done);
            Ok(())
        }
        let mut marks = BTreeMap::new();
        for name in self.by_name.keys() {
            visit(self, name, &mut marks, &mut Vec::new())?;
        }
        Ok(())
    }

    /// `roots` and everything they require, dependencies before what needs them (ties by
    /// the order of `requires`, then of `roots`). Unknown names are skipped (the catalog
    /// checks references when it is loaded).
    pub fn closure<'a>(&'a self, roots: impl IntoIterator<Item = &'a str>) -> Vec<&'a Component> {
        fn visit<'a>(
            components: &'a Components,
            name: &str,
            seen: &mut BTreeSet<&'a str>,
            out: &mut Vec<&'a Component>,
        ) {
            let Some(component) = components.by_name.get(name) else {
                return;
            };
            if !seen.insert(component.name.as_str()) {
                return;
            }
            for required in &component.requires {
                visit(components, required, seen, out);
            }
            out.push(component);
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for root in roots {
            visit(self, root, &mut seen, &mut out);
        }
        out
    }

    /// Whether `set` (a closure) can exist on `os`; the error says why not.
    pub fn viable_on(set: &[&Component], os: &Os) -> Result<(), String> {
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                if a.conflicts.contains(&b.name) || b.conflicts.contains(&a.name) {
                    return Err(format!(
                        "{} {} and {} {} conflict",
                        a.kind.as_str(),
                        a.name,
                        b.kind.as_str(),
                        b.name
                    ));
                }
            }
        }
        for component in set {
            if !component.runs_on.is_empty() && !component.runs_on.contains(&os.name) {
                return Err(format!(
                    "{} {} runs on {}, not on {}",
                    component.kind.as_str(),
                    component.name,
                    component.runs_on.join(", "),
                    os.name
                ));
            }
            if !component.packages.is_empty() && os.base == OsBase::Busybox {
                return Err(format!(
                    "{} {} is made of Debian packages; {} has no package manager",
                    component.kind.as_str(),
                    component.name,
                    os.name
                ));
            }
        }
        Ok(())
    }

    /// Conflicts inside `set` that no OS can resolve, as a message, if any.
    pub fn conflict_in(set: &[&Component]) -> Option<String> {
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                if a.conflicts.contains(&b.name) || b.conflicts.contains(&a.name) {
                    return Some(format!(
                        "{} {} and {} {} conflict",
                        a.kind.as_str(),
                        a.name,
                        b.kind.as_str(),
                        b.name
                    ));
                }
            }
        }
        None
    }
}

/// Renders a configuration template: `{{key}}` becomes the value of `key`. Keys are
/// names (letters, digits, '_', '-'); anything else between braces is left as it is.
pub fn render_template(text: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) if is_placeholder(after[..end].trim()) => {
                let key = after[..end].trim();
                let value = values
                    .get(key)
                    .ok_or_else(|| format!("template names {{{{{key}}}}}, which has no value"))?;
                out.push_str(value);
                rest = &after[end + 2..];
            }
            _ => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The placeholders a template uses.
pub fn template_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) if is_placeholder(after[..end].trim()) => {
                keys.insert(after[..end].trim().to_owned());
                rest = &after[end + 2..];
            }
            _ => rest = after,
        }
    }
    keys
}

fn is_placeholder(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Placeholders every template may use besides the app's settings.
pub const BUILTIN_TEMPLATE_KEYS: &[&str] = &["hostname", "vm"];

/// Files of an application: static (in the shared application layer) or templates
/// (rendered per VM at deploy time).
pub type Files = BTreeMap<String, FileSpec>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::OsBase;

    #[test]
    fn setting_formats_accept_their_values_and_refuse_the_rest() {
        use SettingFormat::*;
        let cases: &[(SettingFormat, &str, bool)] = &[
            (Size, "64mb", true),
            (Size, "1G", true),
            (Size, "4096", true),
            (Size, "64mb requirepass", false),
            (Size, "64mb\nrequirepass x", false),
            (Size, "mb", false),
            (Size, "64pb", false),
            (Size, "", false),
            (Word, "hangar_db-1.x", true),
            (Word, "a b", false),
            (Word, "a;rm", false),
            (Word, "", false),
            (Int, "-12", true),
            (Int, "12", true),
            (Int, "1e3", false),
            (Int, "-", false),
            (Text, "s3cr3t pass'word\"", true),
            (Text, "", true),
            (Text, "line\nbreak", false),
            (Text, "tab\there", false),
            (Text, "nul\0", false),
        ];
        for (format, value, ok) in cases {
            assert_eq!(
                format.check(value).is_ok(),
                *ok,
                "{} {value:?}: {:?}",
                format.as_str(),
                format.check(value)
            );
        }
        assert!(Text.check(&"x".repeat(SettingFormat::MAX_LEN)).is_ok());
        let err = Text
            .check(&"x".repeat(SettingFormat::MAX_LEN + 1))
            .unwrap_err();
        assert!(err.contains("more than 4096"), "{err}");
        let err = Size.check("64mb requirepass").unwrap_err();
        assert!(err.contains("must be a size"), "{err}");
    }

    fn os(name: &str, base: OsBase) -> Os {
        Os {
            name: name.into(),
            version: "12".into(),
            base,
            description: String::new(),
            suite: None,
            packages: Vec::new(),
            min_memory_mib: None,
            min_disk_mib: None,
        }
    }

    fn component(name: &str, requires: &[&str], conflicts: &[&str]) -> Component {
        Component {
            name: name.into(),
            kind: ComponentKind::Software,
            description: String::new(),
            packages: vec![Package::parse(&format!("pkg-{name}")).unwrap()],
            runs_on: Vec::new(),
            requires: requires.iter().map(|s| s.to_string()).collect(),
            conflicts: conflicts.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn oses() -> BTreeMap<String, Os> {
        [
            (
                "debian-12".to_string(),
                os("debian-12", OsBase::Debootstrap),
            ),
            ("busybox".to_string(), os("busybox", OsBase::Busybox)),
        ]
        .into()
    }

    #[test]
    fn packages_parse_and_refuse_shell_text() {
        assert_eq!(
            Package::parse("redis-server").unwrap(),
            Package {
                name: "redis-server".into(),
                version: None
            }
        );
        let pinned = Package::parse("redis-server=5:7.0.15-1~deb12u1").unwrap();
        assert_eq!(pinned.apt_arg(), "redis-server=5:7.0.15-1~deb12u1");
        assert!(Package::parse("redis;rm -rf /").is_err());
        assert!(Package::parse("Redis").is_err());
        assert!(Package::parse("redis=").is_err());
        assert!(Package::parse("-o=x").is_err());
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let components = Components::new(
            [
                component("app", &["web", "cache"], &[]),
                component("web", &["libs"], &[]),
                component("cache", &["libs"], &[]),
                component("libs", &[], &[]),
            ],
            &oses(),
        )
        .unwrap();
        let names: Vec<_> = components
            .closure(["app"])
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["libs", "web", "cache", "app"]);
    }

    #[test]
    fn cycles_and_unknown_references_name_the_component() {
        let err = Components::new(
            [
                component("a", &["b"], &[]),
                component("b", &["c"], &[]),
                component("c", &["a"], &[]),
            ],
            &oses(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "components require each other in a cycle: a -> b -> c -> a"
        );
        let err = Components::new([component("a", &["nope"], &[])], &oses()).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"component "a" requires unknown component "nope""#
        );
        let err = Components::new([component("a", &[], &["nope"])], &oses()).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"component "a" conflicts with unknown component "nope""#
        );
        let mut on_plan9 = component("a", &[], &[]);
        on_plan9.runs_on = vec!["plan9".into()];
        let err = Components::new([on_plan9], &oses()).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"component "a" runs on unknown os "plan9""#
        );
    }

    #[test]
    fn viability_explains_why_not() {
        let components = Components::new(
            [
                component("nginx-light", &[], &["nginx-full"]),
                component("nginx-full", &[], &[]),
            ],
            &oses(),
        )
        .unwrap();
        let both = components.closure(["nginx-light", "nginx-full"]);
        let debian = &oses()["debian-12"];
        assert_eq!(
            Components::viable_on(&both, debian).unwrap_err(),
            "software nginx-light and software nginx-full conflict"
        );
        assert!(Components::conflict_in(&both).is_some());
        let light = components.closure(["nginx-light"]);
        assert!(Components::viable_on(&light, debian).is_ok());
        let err = Components::viable_on(&light, &oses()["busybox"]).unwrap_err();
        assert!(err.contains("has no package manager"), "{err}");
    }

    #[test]
    fn templates_render_named_values() {
        let values: BTreeMap<String, String> = [
            ("password".to_string(), "s3cret".to_string()),
            ("hostname".to_string(), "vm-1".to_string()),
        ]
        .into();
        assert_eq!(
            render_template("pass {{password}} on {{ hostname }} {{not a key}}", &values).unwrap(),
            "pass s3cret on vm-1 {{not a key}}"
        );
        assert!(render_template("{{missing}}", &values).is_err());
        assert_eq!(
            template_keys("a {{x}} b {{ y-z }} {{}}"),
            ["x".to_string(), "y-z".to_string()].into()
        );
    }
}
