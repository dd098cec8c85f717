//! `hangar check`: the heuristics engine's verdict on a request, without provisioning:
//! every problem with a suggestion, the candidates ranked, and the one a request would get.

use hangar_api::client::Client;
use hangar_api::heuristics::{Candidate, Severity, TimeClass, Verdict};

use super::request::RequestArgs;
use crate::error::CliError;
use crate::output::{print_json, table, wire_name};

/// Prints the verdict on the request `args` describe (the flags of `hangar request`).
/// Exits 0 when the request would be served, 4 when it has a hard problem (as a request
/// would be refused with 422).
pub async fn run(client: &Client, args: RequestArgs) -> Result<(), CliError> {
    let request = args.service_request()?;
    let verdict = client.check(&request).await?;
    if args.json() {
        print_json(&verdict)?;
    } else {
        print!("{}", render(&verdict));
    }
    if verdict.ok {
        Ok(())
    } else {
        Err(CliError::Api {
            status: 422,
            message: format!(
                "this request would be refused: {} problem(s)",
                verdict.errors().count()
            ),
            alternatives: Vec::new(),
            problems: Vec::new(),
        })
    }
}

/// The verdict as text: the outcome, the problems with their suggestions, the candidates.
pub fn render(verdict: &Verdict) -> String {
    let mut out = String::new();
    match &verdict.chosen {
        Some(chosen) => out.push_str(&format!("ok: {}\n", chosen.reason)),
        None => out.push_str("refused: the request cannot be served as asked\n"),
    }
    if !verdict.problems.is_empty() {
        out.push_str("\nproblems:\n");
        for problem in &verdict.problems {
            out.push_str(&format!(
                "  {} [{}] {}: {}\n      try: {}\n",
                match problem.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                },
                wire_name(&problem.code),
                problem.field,
                problem.message,
                problem.suggestion
            ));
        }
    }
    if !verdict.candidates.is_empty() {
        out.push_str("\ncandidates (best first):\n");
        let rows: Vec<Vec<String>> = verdict
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| row(i, c))
            .collect();
        out.push_str(&table::render(
            &[
                "#", "KIND", "SOURCE", "SIZE", "SLICED", "COST", "WASTE", "BLOCKED",
            ],
            &rows,
        ));
    }
    out
}

fn row(i: usize, c: &Candidate) -> Vec<String> {
    let mut waste = Vec::new();
    if c.waste.vcpus > 0 {
        waste.push(format!("+{} vCPU", c.waste.vcpus));
    }
    if c.waste.memory_mib > 0 {
        waste.push(format!("+{} MiB", c.waste.memory_mib));
    }
    if !c.waste.apps.is_empty() {
        waste.push(format!("+{}", c.waste.apps.join(",")));
    }
    vec![
        (i + 1).to_string(),
        wire_name(&c.kind),
        if c.install.is_empty() {
            c.source.clone()
        } else {
            format!("{} +{}", c.source, c.install.join(","))
        },
        format!("{}x{}", c.vcpus, c.memory_mib),
        c.slice_to
            .map(|(vcpus, memory)| format!("{vcpus}x{memory}"))
            .unwrap_or_default(),
        format!(
            "{} ~{}ms",
            match c.cost.class {
                TimeClass::Instant => "instant",
                TimeClass::Fast => "fast",
                TimeClass::Boot => "boot",
                TimeClass::Build => "build",
            },
            c.cost.ms
        ),
        if waste.is_empty() {
            "-".into()
        } else {
            waste.join(" ")
        },
        c.blocked.clone().unwrap_or_default(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_api::heuristics::{CandidateKind, Chosen, Cost, Problem, ProblemCode, Waste};

    fn candidate(kind: CandidateKind, source: &str, blocked: Option<&str>) -> Candidate {
        Candidate {
            kind,
            source: source.into(),
            vcpus: 1,
            memory_mib: 256,
            slice_to: Some((1, 128)),
            install: Vec::new(),
            cost: Cost {
                class: TimeClass::Boot,
                ms: 1700,
            },
            waste: Waste::default(),
            blocked: blocked.map(String::from),
        }
    }

    #[test]
    fn a_verdict_reads_as_outcome_problems_and_ranked_candidates() {
        let verdict = Verdict {
            ok: true,
            problems: vec![Problem {
                code: ProblemCode::UnknownSetting,
                severity: Severity::Warning,
                field: "env.colour".into(),
                message: "no requested application has a setting \"colour\"".into(),
                suggestion: "leave out --env colour".into(),
            }],
            candidates: vec![
                candidate(CandidateKind::Partial, "vm-1", None),
                candidate(CandidateKind::Superset, "vm-2", Some("cannot be sliced")),
            ],
            chosen: Some(Chosen {
                kind: CandidateKind::Partial,
                source: "vm-1".into(),
                reason: "partial pre-OS shell vm-1".into(),
            }),
        };
        let text = render(&verdict);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ok: partial pre-OS shell vm-1");
        assert_eq!(
            lines[3],
            "  warning [unknown_setting] env.colour: no requested application has a setting \"colour\""
        );
        assert_eq!(lines[4], "      try: leave out --env colour");
        assert!(lines[7].starts_with("#  KIND"), "{text}");
        assert!(
            lines[8].starts_with("1  partial   vm-1    1x256  1x128   boot ~1700ms  -"),
            "{text}"
        );
        assert!(lines[9].ends_with("cannot be sliced"), "{text}");
    }
}
