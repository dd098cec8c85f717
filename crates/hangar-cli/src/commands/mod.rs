//! One module per command or group of commands; each holds its arguments and what it does.

pub mod accounting;
pub mod agent;
pub mod alerts;
pub mod auth;
pub mod bench;
pub mod check;
pub mod export;
pub mod host;
pub mod hosts;
pub mod images;
pub mod imports;
pub mod migrate;
pub mod policies;
pub mod pools;
pub mod request;
pub mod server;
pub mod services;
pub mod stacks;
pub mod tasks;
pub mod templates;
pub mod vms;

/// `KEY=VALUE` (`--env`), as `(key, value)`.
fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_splits_at_the_first_equals_sign() {
        assert_eq!(
            super::parse_env("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert!(super::parse_env("novalue").is_err());
    }
}
