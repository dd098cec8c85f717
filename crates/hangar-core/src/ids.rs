//! Identifiers. VM and task ids are ULIDs with a kind prefix (`vm-…`, `task-…`): unique
//! without coordination, sortable by creation time, and safe in file names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! prefixed_id {
    ($name:ident, $prefix:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, unique id.
            pub fn generate() -> Self {
                Self(format!(
                    "{}{}",
                    $prefix,
                    ulid::Ulid::new().to_string().to_lowercase()
                ))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                let rest = s.strip_prefix($prefix).ok_or_else(|| IdError {
                    kind: stringify!($name),
                    value: s.to_owned(),
                })?;
                if rest.len() == 26 && ulid::Ulid::from_string(rest).is_ok() {
                    Ok(Self(s.to_ascii_lowercase()))
                } else {
                    Err(IdError {
                        kind: stringify!($name),
                        value: s.to_owned(),
                    })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

prefixed_id!(VmId, "vm-");
prefixed_id!(TaskId, "task-");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {kind}")]
pub struct IdError {
    kind: &'static str,
    value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_differ() {
        let a = VmId::generate();
        let b = VmId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<VmId>().unwrap(), a);
        assert!(a.as_str().starts_with("vm-"));
        assert_eq!(a.as_str().len(), 3 + 26);
    }

    #[test]
    fn wrong_prefix_or_garbage_is_rejected() {
        let task = TaskId::generate();
        assert!(task.as_str().parse::<VmId>().is_err());
        assert!("vm-".parse::<VmId>().is_err());
        assert!("vm-../../etc/passwd".parse::<VmId>().is_err());
        assert!(serde_json::from_str::<VmId>("\"vm-x\"").is_err());
    }
}
