use super::*;
use proptest::prelude::*;

const SHOP: &str = include_str!("../../../../examples/shop.toml");

fn catalog() -> Catalog {
    Catalog::demo()
}

fn spec(text: &str) -> StackSpec {
    StackSpec::from_toml(text).unwrap()
}

fn err(text: &str) -> StackError {
    spec(text).plan(&catalog(), 3).unwrap_err()
}

#[test]
fn the_example_plans_peers_first_with_addresses_resolved() {
    let plan = spec(SHOP).plan(&catalog(), 7).unwrap();
    assert_eq!(plan.name, "shop");
    assert_eq!(plan.segment, "10.213.7.0/24");
    let names: Vec<&str> = plan.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["api-1", "api-2", "cache", "front"]);
    let addresses: Vec<&str> = plan.members.iter().map(|m| m.address.as_str()).collect();
    assert_eq!(
        addresses,
        ["10.213.7.10", "10.213.7.11", "10.213.7.12", "10.213.7.13"]
    );
    let front = plan.member("front").unwrap();
    assert_eq!(
        front.settings["backends"],
        "server 10.213.7.10:80; server 10.213.7.11:80;"
    );
    assert_eq!(front.public, ["http"]);
    assert_eq!(
        front.peers,
        BTreeSet::from(["api-1".to_owned(), "api-2".to_owned()])
    );
    assert_eq!(front.egress, EgressPolicy::Segment);
    assert_eq!(front.address_cidr(), "10.213.7.13/24");
    assert_eq!(
        plan.levels,
        vec![
            vec!["api-1".to_owned(), "api-2".into(), "cache".into()],
            vec!["front".to_owned()]
        ]
    );
    assert_eq!(plan.wake_order().last().unwrap(), "front");
    assert_eq!(plan.hosts()[2], ("cache".into(), "10.213.7.12".into()));
    // MACs: locally administered unicast, distinct within the segment.
    let macs: BTreeSet<&str> = plan.members.iter().map(|m| m.mac.as_str()).collect();
    assert_eq!(macs.len(), 4);
    assert!(
        macs.iter()
            .all(|mac| mac.starts_with("02:") && mac.len() == 17)
    );
    assert!(front.mac.ends_with(":07:0d"));
}

#[test]
fn json_takes_members_too() {
    let json = r#"{"name":"s","members":{"a":{"service":"redis"}}}"#;
    let spec: StackSpec = serde_json::from_str(json).unwrap();
    assert_eq!(spec.members["a"].service, "redis");
    let back: StackSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn unknown_fields_are_refused() {
    let e = StackSpec::from_toml("name = \"s\"\n[member.a]\nservice = \"redis\"\nports = []\n")
        .unwrap_err();
    assert!(e.to_string().contains("ports"), "{e}");
}

#[test]
fn unknown_services_name_the_closest() {
    let e = err("name = \"s\"\n[member.a]\nservice = \"rediss\"\n");
    assert!(
        matches!(&e, StackError::UnknownService { alternatives, .. } if alternatives.contains(&"redis".to_owned())),
        "{e:?}"
    );
    assert!(e.to_string().contains("did you mean redis"), "{e}");
}

#[test]
fn names_must_be_dns_labels() {
    assert!(matches!(
        err("name = \"Shop\"\n[member.a]\nservice = \"redis\"\n"),
        StackError::BadName {
            what: "stack name",
            ..
        }
    ));
    assert!(matches!(
        err("name = \"s\"\n[member.a_b]\nservice = \"redis\"\n"),
        StackError::BadName {
            what: "member name",
            ..
        }
    ));
    assert!(matches!(
        err("name = \"s\"\n[member.a-]\nservice = \"redis\"\n"),
        StackError::BadName { .. }
    ));
    assert!(is_label("api-1", 63));
    assert!(!is_label("1api", 63));
    assert!(!is_label(&"a".repeat(64), 63));
}

#[test]
fn empty_and_oversized_stacks_are_refused() {
    assert_eq!(err("name = \"s\"\nmember = {}\n"), StackError::Empty);
    let mut text = String::from("name = \"s\"\n");
    for i in 0..=MAX_MEMBERS {
        text.push_str(&format!("[member.m{i}]\nservice = \"redis\"\n"));
    }
    assert_eq!(err(&text), StackError::TooMany(MAX_MEMBERS + 1));
}

#[test]
fn public_ports_must_be_the_services() {
    let e = err("name = \"s\"\n[member.a]\nservice = \"redis\"\npublic = [\"http\"]\n");
    assert!(
        matches!(&e, StackError::UnknownPort { ports, .. } if ports == &["redis"]),
        "{e:?}"
    );
}

#[test]
fn settings_must_be_the_services_and_valid() {
    let e = err("name = \"s\"\n[member.a]\nservice = \"redis\"\nenv = { maxmem = \"1\" }\n");
    assert!(e.to_string().contains("did you mean maxmemory"), "{e}");
    let e = err("name = \"s\"\n[member.a]\nservice = \"redis\"\nenv = { maxmemory = \"lots\" }\n");
    assert!(matches!(e, StackError::BadSetting { .. }), "{e:?}");
}

#[test]
fn references_to_unknown_peers_or_fields_are_refused() {
    let base = "name = \"s\"\n[member.api]\nservice = \"http-counter\"\n[member.front]\nservice = \"web-proxy\"\n";
    let e = err(&format!(
        "{base}env = {{ backends = \"server {{{{ peers.apx.address }}}};\" }}\n"
    ));
    assert!(
        matches!(&e, StackError::UnknownPeer { peer, alternatives, .. } if peer == "apx" && alternatives == &["api"]),
        "{e:?}"
    );
    let e = err(&format!(
        "{base}env = {{ backends = \"{{{{ peers.api.ip }}}}\" }}\n"
    ));
    assert!(
        matches!(&e, StackError::UnknownField { field, .. } if field == "ip"),
        "{e:?}"
    );
    assert!(e.to_string().contains("ports.PORT; its ports: http"), "{e}");
    let e = err(&format!(
        "{base}env = {{ backends = \"{{{{ peers.api.ports.web }}}}\" }}\n"
    ));
    assert!(matches!(e, StackError::UnknownField { .. }), "{e:?}");
    // Every field resolves; other placeholders are left as written.
    let plan = spec(&format!(
        "{base}env = {{ backends = \"{{{{peers.api.name}}}} {{{{ peers.api.ports.http }}}} {{{{ hostname }}}}\" }}\n"
    ))
    .plan(&catalog(), 0)
    .unwrap();
    assert_eq!(
        plan.member("front").unwrap().settings["backends"],
        "api 80 {{ hostname }}"
    );
}

#[test]
fn cycles_are_refused_and_self_references_allowed() {
    let text = "name = \"s\"\n\
        [member.a]\nservice = \"web-proxy\"\nenv = { backends = \"{{ peers.b.address }}\" }\n\
        [member.b]\nservice = \"web-proxy\"\nenv = { backends = \"{{ peers.c.address }}\" }\n\
        [member.c]\nservice = \"web-proxy\"\nenv = { backends = \"{{ peers.b.address }} {{ peers.c.address }}\" }\n";
    let e = err(text);
    assert_eq!(
        e,
        StackError::Cycle(vec!["b".into(), "c".into(), "b".into()])
    );
    let plan = spec("name = \"s\"\n[member.a]\nservice = \"web-proxy\"\nenv = { backends = \"{{ peers.a.address }}\" }\n")
        .plan(&catalog(), 0)
        .unwrap();
    assert_eq!(plan.levels, vec![vec!["a".to_owned()]]);
}

#[test]
fn egress_must_be_known() {
    let e = err("name = \"s\"\n[member.a]\nservice = \"redis\"\negress = \"everywhere\"\n");
    assert!(matches!(e, StackError::BadEgress { .. }), "{e:?}");
    assert!(e.to_string().starts_with("member a: egress policy"), "{e}");
    let e = err("name = \"s\"\n[member.a]\nservice = \"redis\"\negress = \"allow=x:0\"\n");
    assert!(matches!(e, StackError::BadEgress { .. }), "{e:?}");
    let egress = |text: &str| {
        let file = format!("name = \"s\"\n[member.a]\nservice = \"redis\"\negress = \"{text}\"\n");
        spec(&file).plan(&catalog(), 0).unwrap().members[0]
            .egress
            .clone()
    };
    // Nothing beyond the segment, whichever name says it.
    for nothing in ["segment", "none", "loopback"] {
        assert_eq!(egress(nothing), EgressPolicy::Segment, "{nothing}");
    }
    assert_eq!(egress("open"), EgressPolicy::Open);
    assert_eq!(egress("allow=127.0.0.1:5432").kind(), "allow");
}

#[test]
fn segments_round_trip_and_the_lowest_free_is_taken() {
    assert_eq!(segment_index(&segment_cidr(42)), Some(42));
    assert_eq!(segment_index("10.213.042.0/24"), None);
    assert_eq!(segment_index("10.214.1.0/24"), None);
    assert_eq!(free_segment(&BTreeSet::from([0, 1, 3])), Some(2));
    assert_eq!(free_segment(&(0..=u8::MAX).collect()), None);
}

proptest! {
    /// Any acyclic reference graph is planned so that every member's peers come in an
    /// earlier level, and every member appears exactly once.
    #[test]
    fn levels_put_peers_first(edges in proptest::collection::vec((0usize..8, 0usize..8), 0..20)) {
        let names: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
        let mut text = String::from("name = \"p\"\n");
        for (i, name) in names.iter().enumerate() {
            // Only references to lower-numbered members: acyclic by construction.
            let refs: Vec<String> = edges
                .iter()
                .filter(|(from, to)| *from == i && to < from)
                .map(|(_, to)| format!("{{{{ peers.m{to}.address }}}}"))
                .collect();
            text.push_str(&format!(
                "[member.{name}]\nservice = \"web-proxy\"\nenv = {{ backends = \"{}\" }}\n",
                refs.join(" ")
            ));
        }
        let plan = spec(&text).plan(&catalog(), 1).unwrap();
        let order = plan.wake_order();
        prop_assert_eq!(order.len(), 8);
        let level_of = |n: &str| plan.levels.iter().position(|l| l.iter().any(|m| m == n)).unwrap();
        for member in &plan.members {
            for peer in &member.peers {
                prop_assert!(level_of(peer) < level_of(&member.name));
            }
        }
    }

    /// Text without a peer reference renders to itself.
    #[test]
    fn text_without_references_is_unchanged(text in "[a-z{} .]{0,40}") {
        prop_assume!(!text.contains("peers."));
        let out: Result<String, ()> = render_peers(&text, |_, _| Err(()));
        prop_assert_eq!(out, Ok(text));
    }
}
