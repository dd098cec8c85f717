//! Lifecycle policies: `hangar policies` lists them with the memory and disk budgets,
//! `hangar policy set|reset` changes a service's at run time.

use std::time::Duration;

use hangar_api::{PolicyBody, PolicyView};

use crate::error::CliError;
use crate::output::{print_json, table, wire_name};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct PoliciesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Set a service's idle timers, keep-active rate or archive tier (kept across restarts);
    /// options left out stay as they are.
    #[command(
        after_help = "Durations: 500ms, 3s, 10m, 1h, 2d; `off` unsets (never).\n\
        Example: hangar policy set http-counter --sleep-after 10m --archive-after 1h --delete-after 7d"
    )]
    Set {
        /// Service name (see `hangar services`).
        service: String,
        /// Idle time of an active VM before it sleeps (paused in memory).
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        sleep_after: Option<Timer>,
        /// Time asleep before a VM is archived (without --sleep-after: idle time before an
        /// active VM is archived).
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        archive_after: Option<Timer>,
        /// Time archived before a VM is deleted with its archive.
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        delete_after: Option<Timer>,
        /// Requests per minute above which the service's VMs stay active even when idle.
        #[arg(long, value_name = "PER_MIN|off", value_parser = parse_rate)]
        keep_active_above: Option<Rate>,
        /// How archives are written: raw (fastest wake), zstd (smaller), delta (pages that
        /// differ from the service template; zstd for VMs not cloned from one).
        #[arg(long, value_parser = ["raw", "zstd", "delta"])]
        archive_tier: Option<String>,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Go back to the catalog's policy for a service.
    Reset { service: String },
}

/// A timer given on the command line: a duration, or `off`.
#[derive(Clone)]
pub struct Timer(Option<String>);

fn parse_timer(text: &str) -> Result<Timer, String> {
    if matches!(text, "off" | "never") {
        return Ok(Timer(None));
    }
    humantime::parse_duration(text)
        .map(|_| Timer(Some(text.to_owned())))
        .map_err(|err| format!("{text:?} is not a duration like 500ms, 3s, 10m, 1h ({err})"))
}

/// A rate given on the command line: requests per minute, or `off`.
#[derive(Clone)]
pub struct Rate(Option<f64>);

fn parse_rate(text: &str) -> Result<Rate, String> {
    if matches!(text, "off" | "never") {
        return Ok(Rate(None));
    }
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(Rate(Some(rate))),
        _ => Err(format!("{text:?} is not a number of requests per minute")),
    }
}

/// `hangar policies`: every service's policy, its demand, and the budgets.
pub async fn list(client: &Client, args: PoliciesArgs) -> Result<(), CliError> {
    let policies = client.policies().await?;
    if args.json {
        return print_json(&policies);
    }
    let timer = |d: Option<Duration>| match d {
        Some(d) => humantime::format_duration(d).to_string(),
        None => "-".into(),
    };
    let rows = policies.services.iter().map(|view| {
        let p = &view.policy;
        let keep = match p.keep_active_above {
            Some(rate) => format!(">{}/min", rate.0),
            None => "-".into(),
        };
        let mut tier = p.archive_tier.to_string();
        if view.archive_tier_used != tier {
            tier = format!("{tier} (as {})", view.archive_tier_used);
        }
        vec![
            view.service.clone(),
            timer(p.sleep_after),
            timer(p.archive_after),
            timer(p.delete_after),
            keep,
            format!(
                "{:.1}{}",
                view.rate_per_min,
                if view.kept_active {
                    " (kept active)"
                } else {
                    ""
                }
            ),
            tier,
            wire_name(&view.source).replace('_', "-"),
        ]
    });
    table::print(
        &[
            "SERVICE",
            "SLEEP AFTER",
            "ARCHIVE AFTER",
            "DELETE AFTER",
            "KEEP ACTIVE",
            "REQ/MIN",
            "TIER",
            "SET IN",
        ],
        rows,
    );
    for (what, budget) in [("memory", &policies.memory), ("disk", &policies.disk)] {
        let limit = match budget.budget_mib {
            Some(mib) => format!("{mib} MiB"),
            None => "unlimited".into(),
        };
        println!("{what}: {:.1} MiB used of {limit}", budget.used_mib);
    }
    for view in &policies.services {
        if let Some(note) = &view.note {
            println!("{}: {note}", view.service);
        }
    }
    Ok(())
}

/// `hangar policy set|reset`.
pub async fn run(client: &Client, command: PolicyCommand) -> Result<(), CliError> {
    match command {
        PolicyCommand::Set {
            service,
            sleep_after,
            archive_after,
            delete_after,
            keep_active_above,
            archive_tier,
            json,
        } => {
            let body = PolicyBody {
                sleep_after: sleep_after.map(|Timer(value)| value),
                archive_after: archive_after.map(|Timer(value)| value),
                delete_after: delete_after.map(|Timer(value)| value),
                keep_active_above: keep_active_above.map(|Rate(value)| value),
                archive_tier: archive_tier
                    .map(|tier| tier.parse())
                    .transpose()
                    .map_err(CliError::Usage)?,
            };
            let view = client.set_policy(&service, &body).await?;
            if json {
                return print_json(&view);
            }
            print_policy(&view);
            Ok(())
        }
        PolicyCommand::Reset { service } => {
            let view = client.reset_policy(&service).await?;
            print_policy(&view);
            Ok(())
        }
    }
}

/// `policy SERVICE: sleep after 3s, archive after 5s, ...` for a policy view.
fn print_policy(view: &PolicyView) {
    let p = &view.policy;
    let mut parts: Vec<String> = [
        ("sleep after", p.sleep_after),
        ("archive after", p.archive_after),
        ("delete after", p.delete_after),
    ]
    .into_iter()
    .filter_map(|(name, d)| Some(format!("{name} {}", humantime::format_duration(d?))))
    .collect();
    if let Some(rate) = p.keep_active_above {
        parts.push(format!("kept active above {} requests/min", rate.0));
    }
    parts.push(format!("archive tier {}", p.archive_tier));
    println!(
        "policy {} ({}): {}",
        view.service,
        wire_name(&view.source).replace('_', "-"),
        parts.join(", ")
    );
    if let Some(note) = &view.note {
        println!("note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unsets_a_timer_or_rate_and_bad_values_are_refused() {
        assert!(matches!(parse_timer("off"), Ok(Timer(None))));
        assert!(matches!(parse_timer("10m"), Ok(Timer(Some(t))) if t == "10m"));
        assert!(parse_timer("soon").is_err());
        assert!(matches!(parse_rate("never"), Ok(Rate(None))));
        assert!(matches!(parse_rate("2.5"), Ok(Rate(Some(r))) if r == 2.5));
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("inf").is_err());
    }
}
