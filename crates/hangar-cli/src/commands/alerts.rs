//! `hangar alerts`: the alerts the server's rules raised (`hangar server --alerts FILE`).

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct AlertsArgs {
    /// Pending and resolved alerts too (default: firing ones only).
    #[arg(long)]
    all: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Each alert's state, name, subject, since when and summary; firing first.
pub async fn list(client: &Client, args: AlertsArgs) -> Result<(), CliError> {
    let alerts = client.alerts(args.all).await?;
    if args.json {
        return print_json(&alerts);
    }
    if alerts.is_empty() {
        println!(
            "{}",
            if args.all {
                "no alerts"
            } else {
                "no alerts firing (--all for pending and resolved ones)"
            }
        );
        return Ok(());
    }
    let rows = alerts.iter().map(|a| {
        let about = a
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let since = match a.state.as_str() {
            "resolved" => a.resolved_at.clone(),
            "firing" => a.firing_since.clone(),
            _ => Some(a.active_since.clone()),
        };
        vec![
            a.state.clone(),
            a.name.clone(),
            if about.is_empty() { "-".into() } else { about },
            since.unwrap_or_default(),
            a.summary.clone(),
        ]
    });
    table::print(&["STATE", "ALERT", "ABOUT", "SINCE", "SUMMARY"], rows);
    Ok(())
}
