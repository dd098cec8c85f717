//! Service templates with real QEMU guests, through the real binary: the first VM of a
//! service is booted and a template is snapshotted beside it; later VMs are clones of the
//! template, each with its own identity, entropy, endpoint and disk.

mod common;

use common::{TestServer, wait_for, whoami};

#[test]
fn clones_of_one_template_have_their_own_identity_and_entropy() {
    let server = TestServer::start_with_templates(&["--pool-memory", "0"]);
    let first = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(first["match"], "created", "{first}");

    let template = wait_for(240, "the http-static template", || {
        let templates = server.json(&["templates"]);
        templates
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["service"] == "http-static" && t["current"] == true)
            .cloned()
    });
    assert!(
        template["size_bytes"].as_u64().unwrap() > 1 << 20,
        "{template}"
    );
    assert!(
        server.ok(&["templates"]).contains("http-static"),
        "the table lists it"
    );

    let mut seen = Vec::new();
    for _ in 0..2 {
        let grant = server.json(&["request", "http-static", "--dedicated"]);
        assert_eq!(grant["match"], "cloned", "{grant}");
        let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
        let who = whoami(&endpoint);
        assert!(
            who["hostname"].eq_ignore_ascii_case(grant["vm"].as_str().unwrap()),
            "a clone takes its own hostname: {who:?} for {grant}"
        );
        seen.push((grant["vm"].as_str().unwrap().to_owned(), who));
    }
    let first_who = whoami(first["endpoint"].as_str().unwrap());
    assert_ne!(
        seen[0].1["random"], seen[1].1["random"],
        "clones share entropy"
    );
    assert_ne!(seen[0].1["random"], first_who["random"]);
    assert_ne!(seen[0].1["hostname"], seen[1].1["hostname"]);

    // Removing clones leaves the template; their processes and files go.
    for (vm, _) in &seen {
        server.ok(&["rm", vm]);
    }
    server.ok(&["rm", first["vm"].as_str().unwrap()]);
    assert!(
        server.qemu_processes().is_empty(),
        "{:?}",
        server.qemu_processes()
    );
    let templates = server.json(&["templates"]);
    assert_eq!(templates.as_array().unwrap().len(), 1, "{templates}");
}
