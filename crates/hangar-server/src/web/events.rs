//! `GET /v1/events`: what changed, as server-sent events, for the console's live lists.
//!
//! One poller per server ([`Hub`]) reads the store every [`POLL_EVERY`] while anyone
//! listens (and stops when the last subscriber goes): VMs, the latest tasks, pools, farm
//! hosts and templates. It diffs each read with the one before ([`diff`]) and broadcasts
//! the changes; reading the store rather than hooking the code that changes it means a
//! change made by another replica counts too. Each subscriber gets the changes its caller
//! may see ([`allowed`]): an admin all; anyone else VMs they may see
//! ([`crate::api::auth::roles::visible`]) and their own tasks, nothing of pools, hosts or templates.
//!
//! Event names and data are the contract's: `vm` ([`VmEvent`], `state` `deleted` when a
//! VM goes), `task` ([`TaskEvent`]), `pool`, `host`, `template`; a `: keepalive` comment
//! every [`KEEPALIVE_EVERY`]. A subscriber whose session or token is revoked or expires
//! is ended at its next keepalive. A new subscriber gets no snapshot: it reads the lists
//! (`GET /v1/vms`, ...) and then the changes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use futures::Stream;
use hangar_api::{HostEvent, PoolEvent, TaskEvent, TemplateEvent, VmEvent};
use hangar_core::{Mode, Role};
use hangar_store::{TaskRecord, VmRecord, now_ms};
use tokio::sync::broadcast;

use crate::api::auth::Caller;
use crate::api::error::ErrorBody;
use crate::manager::Manager;

/// How often the poller reads the store while anyone listens.
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// How often a subscriber gets a keepalive comment (and its token is checked again).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// How many of the latest tasks the poller follows.
const TASKS_FOLLOWED: u32 = 200;

/// One change, with what [`allowed`] needs to decide who sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Vm { event: VmEvent, mode: Mode },
    Task { event: TaskEvent, owner: String },
    Pool(PoolEvent),
    Host(HostEvent),
    Template(TemplateEvent),
}

impl Change {
    /// The server-sent event of this change.
    fn event(&self) -> Event {
        let (name, data) = match self {
            Change::Vm { event, .. } => ("vm", serde_json::to_string(event)),
            Change::Task { event, .. } => ("task", serde_json::to_string(event)),
            Change::Pool(event) => ("pool", serde_json::to_string(event)),
            Change::Host(event) => ("host", serde_json::to_string(event)),
            Change::Template(event) => ("template", serde_json::to_string(event)),
        };
        Event::default()
            .event(name)
            .data(data.unwrap_or_else(|_| "{}".into()))
    }
}

/// Whether `user` of `role` sees `change`.
pub fn allowed(user: &str, role: Role, change: &Change) -> bool {
    if role == Role::Admin {
        return true;
    }
    match change {
        Change::Vm { event, mode } => event.owner == user || *mode == Mode::Shared,
        Change::Task { owner, .. } => owner == user,
        Change::Pool(_) | Change::Host(_) | Change::Template(_) => false,
    }
}

/// What the poller compares, read from the store at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// id → (state, owner, mode, when it entered the state): a VM that left a state and
    /// came back to it between two polls differs by the last.
    pub vms: BTreeMap<String, (String, String, Mode, u64)>,
    /// id → (the event it would make, owner).
    pub tasks: BTreeMap<String, (TaskEvent, String)>,
    /// name → counts.
    pub pools: BTreeMap<String, PoolEvent>,
    /// name → what of it shows (address, state, facts).
    pub hosts: BTreeMap<String, String>,
    /// key → (service, what of it shows: host, hash, size).
    pub templates: BTreeMap<String, (String, String)>,
}

impl Snapshot {
    fn add_vm(&mut self, vm: &VmRecord) {
        self.vms.insert(
            vm.id.clone(),
            (
                vm.state.to_string(),
                vm.owner.clone(),
                vm.mode,
                vm.state_since_ms,
            ),
        );
    }

    fn add_task(&mut self, task: &TaskRecord) {
        self.tasks.insert(
            task.id.clone(),
            (
                TaskEvent {
                    id: task.id.clone(),
                    state: task.state.as_str().into(),
                    stage: task.stage.clone(),
                    percent: task.percent,
                    vm: task.vm_id.clone(),
                },
                task.owner.clone(),
            ),
        );
    }
}

/// The changes from `before` to `after`, VMs first, then tasks, pools, hosts, templates.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut changes = Vec::new();
    for (id, now) in &after.vms {
        if before.vms.get(id) != Some(now) {
            let (state, owner, mode, _) = now.clone();
            changes.push(Change::Vm {
                event: VmEvent {
                    id: id.clone(),
                    state,
                    owner,
                },
                mode,
            });
        }
    }
    for (id, (_, owner, mode, _)) in &before.vms {
        if !after.vms.contains_key(id) {
            changes.push(Change::Vm {
                event: VmEvent {
                    id: id.clone(),
                    state: "deleted".into(),
                    owner: owner.clone(),
                },
                mode: *mode,
            });
        }
    }
    for (id, now) in &after.tasks {
        if before.tasks.get(id) != Some(now) {
            changes.push(Change::Task {
                event: now.0.clone(),
                owner: now.1.clone(),
            });
        }
    }
    for (name, now) in &after.pools {
        if before.pools.get(name) != Some(now) {
            changes.push(Change::Pool(now.clone()));
        }
    }
    let names = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
        a.keys()
            .chain(b.keys())
            .filter(|name| a.get(*name) != b.get(*name))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    for name in names(&before.hosts, &after.hosts) {
        changes.push(Change::Host(HostEvent { name }));
    }
    let mut services = std::collections::BTreeSet::new();
    for (key, (service, _)) in before.templates.iter().chain(&after.templates) {
        if before.templates.get(key) != after.templates.get(key) {
            services.insert(service.clone());
        }
    }
    for service in services {
        changes.push(Change::Template(TemplateEvent { service }));
    }
    changes
}

/// Reads a [`Snapshot`]; what cannot be read is left out (and logged).
async fn snapshot(manager: &Manager) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let store = manager.store();
    match store.vms(false).await {
        Ok(vms) => vms.iter().for_each(|vm| snapshot.add_vm(vm)),
        Err(err) => tracing::debug!(error = %err, "events: cannot read vms"),
    }
    match store.tasks(TASKS_FOLLOWED).await {
        Ok(tasks) => tasks.iter().for_each(|task| snapshot.add_task(task)),
        Err(err) => tracing::debug!(error = %err, "events: cannot read tasks"),
    }
    match manager.pool_views().await {
        Ok(pools) => {
            for pool in pools {
                snapshot.pools.insert(
                    pool.name.clone(),
                    PoolEvent {
                        name: pool.name,
                        ready: pool.ready,
                        booting: pool.booting,
                        target: pool.target,
                    },
                );
            }
        }
        Err(err) => tracing::debug!(error = %err, "events: cannot read pools"),
    }
    if let Ok(hosts) = store.hosts().await {
        for host in hosts {
            let shown = format!("{} {:?} {}", host.address, host.state, host.facts);
            snapshot.hosts.insert(host.name, shown);
        }
    }
    if let Ok(templates) = store.templates().await {
        for template in templates {
            let shown = format!(
                "{} {} {}",
                template.host, template.hash, template.size_bytes
            );
            snapshot
                .templates
                .insert(template.key, (template.service, shown));
        }
    }
    snapshot
}

/// The shared poller: running while it has subscribers.
#[derive(Default)]
pub struct Hub {
    sender: Mutex<Option<broadcast::Sender<Arc<Change>>>>,
}

impl Hub {
    /// A receiver of every change from now on; starts the poller if none runs.
    pub fn subscribe(&self, manager: &Arc<Manager>) -> broadcast::Receiver<Arc<Change>> {
        let mut sender = self.sender.lock().expect("event hub");
        if let Some(sender) = sender.as_ref() {
            return sender.subscribe();
        }
        let (new, receiver) = broadcast::channel(4096);
        *sender = Some(new.clone());
        tokio::spawn(poll(Arc::downgrade(manager), new));
        receiver
    }

    /// Whether the poller runs (someone listens, or the last one left less than a poll ago).
    pub fn polling(&self) -> bool {
        self.sender.lock().expect("event hub").is_some()
    }
}

/// The poller: diffs the store every [`POLL_EVERY`] until no one listens.
async fn poll(manager: Weak<Manager>, sender: broadcast::Sender<Arc<Change>>) {
    let mut before = match manager.upgrade() {
        Some(manager) => snapshot(&manager).await,
        None => return,
    };
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(manager) = manager.upgrade() else {
            return;
        };
        {
            // Under the hub's lock: no one subscribes between the count and the stop.
            let mut hub = manager.events.sender.lock().expect("event hub");
            if sender.receiver_count() == 0 {
                *hub = None;
                return;
            }
        }
        let after = snapshot(&manager).await;
        for change in diff(&before, &after) {
            let _ = sender.send(Arc::new(change));
        }
        before = after;
    }
}

/// The event stream of `caller`: its changes and keepalives, until its token stops
/// working.
fn stream_of(
    manager: Arc<Manager>,
    caller: Caller,
    receiver: broadcast::Receiver<Arc<Change>>,
    keepalive: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(
        (manager, caller, receiver, tick),
        |(manager, caller, mut receiver, mut tick)| async move {
            loop {
                tokio::select! {
                    change = receiver.recv() => match change {
                        Ok(change) if allowed(&caller.user, caller.role, &change) => {
                            let event = change.event();
                            return Some((Ok(event), (manager, caller, receiver, tick)));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::debug!(missed, user = %caller.user, "events: a slow subscriber missed changes");
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = tick.tick() => {
                        let usable = matches!(
                            manager.store().token(&caller.token_id).await,
                            Ok(Some(token)) if token.usable_at(now_ms())
                        );
                        if !usable {
                            return None;
                        }
                        let event = Event::default().comment("keepalive");
                        return Some((Ok(event), (manager, caller, receiver, tick)));
                    }
                }
            }
        },
    )
}

/// Live changes as server-sent events (see the module documentation for what each
/// caller gets).
#[utoipa::path(
    get,
    path = "/v1/events",
    responses(
        (status = 200, content_type = "text/event-stream", description = "events `vm`, `task`, `pool`, `host`, `template` (JSON data) and `: keepalive` comments"),
        (status = 401, body = ErrorBody, description = "not signed in"),
    )
)]
pub(crate) async fn events(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = manager.events.subscribe(&manager);
    Sse::new(stream_of(manager, caller, receiver, KEEPALIVE_EVERY))
}

/// [`events`] with a keepalive of `every` (for tests).
#[cfg(test)]
pub(crate) fn events_every(
    manager: Arc<Manager>,
    caller: Caller,
    every: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = manager.events.subscribe(&manager);
    Sse::new(stream_of(manager, caller, receiver, every))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_change(owner: &str, mode: Mode) -> Change {
        Change::Vm {
            event: VmEvent {
                id: "vm-1".into(),
                state: "active".into(),
                owner: owner.into(),
            },
            mode,
        }
    }

    #[test]
    fn non_admins_see_their_own_and_shared_vms_and_their_own_tasks_only() {
        let task = Change::Task {
            event: TaskEvent {
                id: "task-1".into(),
                state: "running".into(),
                stage: "boot".into(),
                percent: 50,
                vm: None,
            },
            owner: "ana".into(),
        };
        let pool = Change::Pool(PoolEvent {
            name: "web".into(),
            ready: 1,
            booting: 0,
            target: 1,
        });
        let dedicated = vm_change("ana", Mode::Dedicated);
        let shared = vm_change("ana", Mode::Shared);
        for change in [&task, &pool, &dedicated, &shared] {
            assert!(allowed("root", Role::Admin, change));
        }
        assert!(allowed("ana", Role::Provisioner, &dedicated));
        assert!(allowed("ana", Role::Provisioner, &task));
        assert!(!allowed("bo", Role::Provisioner, &dedicated));
        assert!(allowed("bo", Role::Access, &shared));
        assert!(!allowed("bo", Role::Provisioner, &task));
        assert!(!allowed("ana", Role::Provisioner, &pool));
        let host = Change::Host(HostEvent { name: "h".into() });
        assert!(!allowed("ana", Role::Provisioner, &host));
    }

    #[test]
    fn the_diff_names_what_appeared_changed_and_went() {
        let mut before = Snapshot::default();
        before.vms.insert(
            "vm-a".into(),
            ("active".into(), "ana".into(), Mode::Dedicated, 1),
        );
        before.vms.insert(
            "vm-b".into(),
            ("active".into(), "bo".into(), Mode::Shared, 1),
        );
        before.hosts.insert("h1".into(), "x".into());
        before
            .templates
            .insert("k1".into(), ("web".into(), "1".into()));
        let mut after = before.clone();
        assert!(diff(&before, &after).is_empty());
        // Asleep and awake again between two polls: the same state, entered anew.
        after.vms.get_mut("vm-b").unwrap().3 = 2;
        assert_eq!(
            diff(&before, &after).len(),
            1,
            "a state left and entered again"
        );
        after.vms.get_mut("vm-a").unwrap().0 = "sleeping".into();
        after.vms.remove("vm-b");
        after.hosts.insert("h2".into(), "y".into());
        after.templates.remove("k1");
        after.pools.insert(
            "web".into(),
            PoolEvent {
                name: "web".into(),
                ready: 2,
                booting: 1,
                target: 3,
            },
        );
        let changes = diff(&before, &after);
        let shown: Vec<String> = changes
            .iter()
            .map(|change| match change {
                Change::Vm { event, .. } => format!("vm {} {}", event.id, event.state),
                Change::Task { event, .. } => format!("task {}", event.id),
                Change::Pool(pool) => format!("pool {} {}", pool.name, pool.ready),
                Change::Host(host) => format!("host {}", host.name),
                Change::Template(template) => format!("template {}", template.service),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "vm vm-a sleeping",
                "vm vm-b deleted",
                "pool web 2",
                "host h2",
                "template web"
            ]
        );
    }
}
