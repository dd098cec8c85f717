//! The names hangar answers for, as a value: built from the store's VMs on each question,
//! answered without IO. [`Zone::from_vms`] is where VMs' names come from,
//! [`Zone::add_stacks`] adds the stacks' (`<member>.<stack>.<domain>`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hangar_core::{Mode, VmState};
use hangar_store::{StackRecord, VmRecord};

/// One name's endpoints: where its service ports answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// Port name → stable `ADDRESS:PORT`.
    pub ports: BTreeMap<String, SocketAddr>,
}

impl Entry {
    /// The distinct addresses of its ports, in order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self.ports.values().map(SocketAddr::ip).collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// What a name is in the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Not the zone's domain nor under it: this server does not answer for it (REFUSED).
    Outside,
    /// Under the domain but no such name (NXDOMAIN).
    NoSuchName,
    /// The domain itself: it exists, with no address.
    Apex,
    /// A name with endpoints (A/AAAA records).
    Name(&'a Entry),
    /// `_PORT._tcp.NAME`: one port of a name (an SRV record to `NAME`, the port's number).
    Port {
        /// The name (relative to the domain) the port is of.
        name: &'a str,
        port: SocketAddr,
    },
}

/// The zone: names relative to `domain`, each with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    domain: String,
    names: BTreeMap<String, Entry>,
}

/// VMs whose stable endpoints answer (or wake them): they have names.
fn named(vm: &VmRecord) -> bool {
    matches!(
        vm.state,
        VmState::Active | VmState::Sleeping | VmState::Archived
    )
}

impl Zone {
    /// An empty zone for `domain` (case and a final dot do not matter).
    pub fn new(domain: &str) -> Zone {
        Zone {
            domain: normalize(domain),
            names: BTreeMap::new(),
        }
    }

    /// The zone of `domain` over the store's VMs: `<vm>.<domain>` for every VM with
    /// stable endpoints (active, sleeping, archived), and `<service>.<domain>` for each
    /// shared service, with the endpoints of every such VM offering it. Stacks' names are
    /// added by [`Zone::add_stacks`].
    pub fn from_vms(domain: &str, vms: &[VmRecord]) -> Zone {
        let mut zone = Zone::new(domain);
        for vm in vms.iter().filter(|vm| named(vm)) {
            zone.add(&vm.id, &vm.endpoints);
            if vm.mode == Mode::Shared {
                for service in &vm.services {
                    zone.add(service, &vm.endpoints);
                }
            }
        }
        zone
    }

    /// Adds `<member>.<stack>` for every member of `stacks` whose VM (found in `vms`) has
    /// a name (see [`Zone::from_vms`]) and a public endpoint: the member's stable endpoints.
    /// Members without public ports (reachable only on the stack's segment) have no name.
    pub fn add_stacks(&mut self, stacks: &[StackRecord], vms: &[VmRecord]) {
        for stack in stacks {
            for (member, vm_id) in &stack.members {
                let Some(vm) = vms.iter().find(|vm| &vm.id == vm_id && named(vm)) else {
                    continue;
                };
                if !vm.endpoints.is_empty() {
                    self.add(&format!("{member}.{}", stack.name), &vm.endpoints);
                }
            }
        }
    }

    /// Adds `name` (relative to the domain, e.g. `web.shop` for `web.shop.<domain>`) with
    /// `endpoints` (port name → `ADDRESS:PORT`; unparsable ones are skipped). A name added
    /// twice holds the ports of both (the first kept for a port name given twice).
    pub fn add(&mut self, name: &str, endpoints: &BTreeMap<String, String>) {
        let entry = self.names.entry(normalize(name)).or_default();
        for (port, addr) in endpoints {
            if let Ok(addr) = addr.parse::<SocketAddr>() {
                entry.ports.entry(port.clone()).or_insert(addr);
            }
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// What `qname` (absolute, any case, a final dot or not) is in this zone.
    pub fn lookup(&self, qname: &str) -> Lookup<'_> {
        let qname = normalize(qname);
        if qname == self.domain {
            return Lookup::Apex;
        }
        let Some(relative) = qname
            .strip_suffix(&self.domain)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        else {
            return Lookup::Outside;
        };
        if let Some(entry) = self.names.get(relative) {
            return Lookup::Name(entry);
        }
        // `_PORT._tcp.NAME`
        if let Some((port, name)) = relative
            .strip_prefix('_')
            .and_then(|rest| rest.split_once("._tcp."))
            && let Some((name, entry)) = self.names.get_key_value(name)
            && let Some(addr) = entry.ports.get(port)
        {
            return Lookup::Port {
                name: name.as_str(),
                port: *addr,
            };
        }
        Lookup::NoSuchName
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, state: VmState, mode: Mode, endpoint: &str) -> VmRecord {
        VmRecord {
            mode,
            services: vec!["http-static".into()],
            endpoints: BTreeMap::from([("http".into(), endpoint.into())]),
            ..crate::test_support::vm_record(id, state)
        }
    }

    #[test]
    fn vms_and_shared_services_have_names_and_nothing_else_does() {
        let vms = [
            vm("vm-a", VmState::Active, Mode::Shared, "127.0.0.1:4001"),
            vm("vm-b", VmState::Archived, Mode::Dedicated, "127.0.0.2:4002"),
            vm("vm-c", VmState::Deleted, Mode::Shared, "127.0.0.3:4003"),
            vm("vm-d", VmState::Ready, Mode::Shared, "127.0.0.4:4004"),
        ];
        let zone = Zone::from_vms("VMS.Test.", &vms);
        let Lookup::Name(a) = zone.lookup("vm-a.vms.test.") else {
            panic!("vm-a")
        };
        assert_eq!(a.addresses(), vec![IpAddr::from([127, 0, 0, 1])]);
        assert!(matches!(zone.lookup("VM-B.vms.test"), Lookup::Name(_)));
        assert_eq!(zone.lookup("vm-c.vms.test"), Lookup::NoSuchName);
        assert_eq!(zone.lookup("vm-d.vms.test"), Lookup::NoSuchName);
        // The shared service: only the shared VM's endpoint.
        let Lookup::Name(service) = zone.lookup("http-static.vms.test") else {
            panic!("service")
        };
        assert_eq!(service.addresses(), vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(zone.lookup("vms.test"), Lookup::Apex);
        assert_eq!(zone.lookup("example.com"), Lookup::Outside);
        assert_eq!(zone.lookup("xvms.test"), Lookup::Outside);
        assert_eq!(zone.lookup("vms.test.example"), Lookup::Outside);
    }

    #[test]
    fn ports_are_srv_names() {
        let zone = Zone::from_vms(
            "vms.test",
            &[vm(
                "vm-a",
                VmState::Active,
                Mode::Dedicated,
                "127.0.0.1:4001",
            )],
        );
        assert_eq!(
            zone.lookup("_http._tcp.vm-a.vms.test"),
            Lookup::Port {
                name: "vm-a",
                port: "127.0.0.1:4001".parse().unwrap()
            }
        );
        assert_eq!(zone.lookup("_ssh._tcp.vm-a.vms.test"), Lookup::NoSuchName);
    }

    #[test]
    fn stack_members_with_a_public_endpoint_have_names() {
        let front = vm(
            "vm-front",
            VmState::Sleeping,
            Mode::Dedicated,
            "127.0.0.9:4009",
        );
        let mut backend = vm("vm-back", VmState::Active, Mode::Dedicated, "x");
        backend.endpoints.clear();
        let gone = vm(
            "vm-gone",
            VmState::Deleted,
            Mode::Dedicated,
            "127.0.0.8:4008",
        );
        let vms = [front, backend, gone];
        let stack = StackRecord {
            name: "shop".into(),
            owner: "test".into(),
            spec: serde_json::Value::Null,
            segment: "10.213.0.0/24".into(),
            state: hangar_core::stack::StackState::Up,
            members: BTreeMap::from([
                ("web".into(), "vm-front".into()),
                ("redis".into(), "vm-back".into()),
                ("old".into(), "vm-gone".into()),
                ("lost".into(), "vm-missing".into()),
            ]),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let mut zone = Zone::from_vms("vms.test", &vms);
        zone.add_stacks(&[stack], &vms);
        let Lookup::Name(web) = zone.lookup("WEB.shop.vms.test.") else {
            panic!("web.shop")
        };
        assert_eq!(web.addresses(), vec![IpAddr::from([127, 0, 0, 9])]);
        assert!(matches!(
            zone.lookup("_http._tcp.web.shop.vms.test"),
            Lookup::Port {
                name: "web.shop",
                ..
            }
        ));
        // No public endpoint, deleted, or not in the store: no name.
        assert_eq!(zone.lookup("redis.shop.vms.test"), Lookup::NoSuchName);
        assert_eq!(zone.lookup("old.shop.vms.test"), Lookup::NoSuchName);
        assert_eq!(zone.lookup("lost.shop.vms.test"), Lookup::NoSuchName);
        assert_eq!(zone.lookup("shop.vms.test"), Lookup::NoSuchName);
    }

    #[test]
    fn added_names_nest_under_the_domain() {
        let mut zone = Zone::new("vms.test");
        zone.add(
            "web.shop",
            &BTreeMap::from([("http".into(), "10.0.0.5:8080".into())]),
        );
        assert!(matches!(zone.lookup("web.shop.vms.test"), Lookup::Name(_)));
        assert_eq!(zone.lookup("shop.vms.test"), Lookup::NoSuchName);
    }
}
