//! What the commands print, shared: tables, `--json`, plain-text values, progress, and an
//! error as its message and exit code.

use std::process::ExitCode;

use crate::error::CliError;

pub mod progress;
pub mod table;

/// A JSON value as plain text (strings unquoted, null empty).
pub fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// How a wire enum (a VM state, a mode, a match kind) is spelled in JSON.
pub fn wire_name(value: &impl serde::Serialize) -> String {
    text(&serde_json::to_value(value).expect("wire types serialize"))
}

/// Prints an answer as pretty JSON on stdout, keys sorted: what `--json` prints (the JSON
/// the server sent, which it made from the same wire types).
pub fn print_json(answer: &impl serde::Serialize) -> Result<(), CliError> {
    let value = serde_json::to_value(answer).expect("wire types serialize");
    println!(
        "{}",
        serde_json::to_string_pretty(&value).expect("JSON values serialize")
    );
    Ok(())
}

/// `12s ago`, `3m ago`, from milliseconds; empty for `None`.
pub fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return String::new();
    };
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// A command's outcome as the process's exit status: on failure, prints the error (and
/// the alternatives the server offered) on stderr and maps it to the exit codes listed in
/// `hangar --help`.
pub fn exit_status(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hangar: {err}");
            for alternative in err.alternatives() {
                eprintln!("  try: hangar request {alternative}");
            }
            for problem in err.problems() {
                eprintln!(
                    "  [{}] {}: {}\n      try: {}",
                    wire_name(&problem.code),
                    problem.field,
                    problem.message,
                    problem.suggestion
                );
            }
            ExitCode::from(err.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_unquotes_strings_and_empties_null() {
        assert_eq!(text(&serde_json::json!("a")), "a");
        assert_eq!(text(&serde_json::Value::Null), "");
        assert_eq!(text(&serde_json::json!(3)), "3");
    }

    #[test]
    fn ago_picks_the_largest_unit() {
        assert_eq!(ago(None), "");
        assert_eq!(ago(Some(12_000)), "12s ago");
        assert_eq!(ago(Some(180_000)), "3m ago");
        assert_eq!(ago(Some(7_200_000)), "2h ago");
        assert_eq!(ago(Some(172_800_000)), "2d ago");
    }
}
