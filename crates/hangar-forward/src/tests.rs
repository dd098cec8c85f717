//! The forwarder against plain loopback TCP servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hangar_core::WakeOn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::{EndpointSpec, Reply, Request};
use crate::{Control, ForwardError, Forwarder};

const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// An echo server: everything read is written back; at EOF it shuts down its write side.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

fn spec(vm: &str, target: SocketAddr, active: bool) -> EndpointSpec {
    EndpointSpec {
        vm: vm.into(),
        name: "http".into(),
        listen: LOOPBACK,
        target,
        active,
        wake: WakeOn::OnData,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data`, half-closes, and reads everything back until EOF.
async fn round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test]
async fn bytes_flow_both_ways_and_a_half_close_is_passed_on() {
    let target = echo_server().await;
    let forwarder = Forwarder::new("http://127.0.0.1:1");
    let port = forwarder.open(&spec("vm-a", target, true)).await.unwrap();
    assert_ne!(port, target.port());

    // 4 MiB each way; the echo only ends its answer once it saw our half-close, and we
    // read to EOF, so both the data and the FIN went through in both directions.
    let data = pattern(4 << 20, 7);
    assert!(round_trip(port, &data).await == data);

    // A server that answers only after the client's EOF (like an HTTP/1.0 upload).
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let late = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        stream
            .write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
    });
    let late_port = forwarder.open(&spec("vm-b", late, true)).await.unwrap();
    assert_eq!(round_trip(late_port, b"hello").await, b"got 5 bytes");

    let activity = forwarder.activity();
    assert_eq!(activity["vm-a"].connections, 1);
    assert_eq!(activity["vm-a"].bytes_in, 4 << 20);
    assert_eq!(activity["vm-a"].bytes_out, 4 << 20);
    assert!(activity["vm-a"].last_active_ms > 0);
    assert_eq!(activity["vm-b"].bytes_in, 5);
}

#[tokio::test]
async fn many_connections_at_once_each_get_their_own_bytes() {
    let target = echo_server().await;
    let forwarder = Forwarder::new("http://127.0.0.1:1");
    let port = forwarder.open(&spec("vm-a", target, true)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u8 {
        tasks.push(tokio::spawn(async move {
            let data = pattern(64 * 1024 + usize::from(i), i);
            assert!(round_trip(port, &data).await == data, "connection {i}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let activity = forwarder.activity()["vm-a"];
    assert_eq!((activity.connections, activity.open), (100, 0));
}

/// A stand-in for the server's wake API on `addr`: each `POST /v1/vms/{id}/wake` starts the
/// echo target (if it is not up yet), then answers 200.
async fn wake_api(
    listener: TcpListener,
    target_listener: Arc<std::sync::Mutex<Option<TcpListener>>>,
    wakes: Arc<AtomicUsize>,
) {
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 1024];
        let n = stream.read(&mut request).await.unwrap();
        let text = String::from_utf8_lossy(&request[..n]).into_owned();
        assert!(
            text.starts_with("POST /v1/vms/vm-sleepy/wake HTTP/1.1"),
            "{text}"
        );
        wakes.fetch_add(1, Ordering::SeqCst);
        // The VM takes a moment to come back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let listener = target_listener.lock().unwrap().take();
        if let Some(listener) = listener {
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        let _ = write.shutdown().await;
                    });
                }
            });
        }
        let vm = serde_json::json!({
            "id": "vm-sleepy", "host": "local", "services": ["web"], "endpoints": {},
            "direct_endpoints": {}, "state": "active", "mode": "dedicated", "owner": "local",
            "env": {}, "memory_mib": 64, "vcpus": 1, "created_at": "", "last_used_at": "",
            "idle_ms": 0, "state_since": "",
        })
        .to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{vm}",
            vm.len()
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
    }
}

#[tokio::test]
async fn bytes_sent_to_a_sleeping_vm_wait_and_arrive_once_the_server_woke_it() {
    // The VM's address, reserved but not yet listening (the VM is archived).
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = reserved.local_addr().unwrap();
    drop(reserved);
    // The server's address: down at first (restarting).
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api_addr = api.local_addr().unwrap();
    drop(api);

    let forwarder = Forwarder::new(&format!("http://{api_addr}"));
    let port = forwarder
        .open(&spec("vm-sleepy", target, false))
        .await
        .unwrap();

    let started = Instant::now();
    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(200_000, i);
                (round_trip(port, &data).await == data, Instant::now())
            })
        })
        .collect();

    // The server comes up after 600 ms; the forwarder keeps asking meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let wakes = Arc::new(AtomicUsize::new(0));
    let target_listener = Arc::new(std::sync::Mutex::new(Some(
        TcpListener::bind(target).await.unwrap(),
    )));
    tokio::spawn(wake_api(
        TcpListener::bind(api_addr).await.unwrap(),
        target_listener,
        wakes.clone(),
    ));
    for client in clients {
        let (intact, done) = client.await.unwrap();
        assert!(intact, "every byte sent before the wake arrived, in order");
        assert!(done - started >= Duration::from_millis(600));
    }
    assert_eq!(
        wakes.load(Ordering::SeqCst),
        1,
        "one wake for all waiting connections"
    );
    // Now active: a new connection goes straight through.
    assert_eq!(round_trip(port, b"again").await, b"again");
    assert_eq!(wakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn close_ends_listeners_and_connections_and_sync_keeps_only_what_it_lists() {
    let target = echo_server().await;
    let forwarder = Forwarder::new("http://127.0.0.1:1");
    let a = forwarder.open(&spec("vm-a", target, true)).await.unwrap();
    let b = forwarder.open(&spec("vm-b", target, true)).await.unwrap();
    // Opening again keeps the port.
    assert_eq!(
        forwarder.open(&spec("vm-a", target, true)).await.unwrap(),
        a
    );

    let mut open = TcpStream::connect(("127.0.0.1", a)).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();

    assert!(forwarder.close("vm-a").await);
    assert!(!forwarder.close("vm-a").await);
    assert!(
        TcpStream::connect(("127.0.0.1", a)).await.is_err(),
        "no listener left"
    );
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the open connection was ended");

    // Sync: vm-b is not listed (closed), vm-c is opened on the port it had before.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c_port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let mut c = spec("vm-c", target, true);
    c.listen.set_port(c_port);
    let results = forwarder.sync(&[c]).await;
    assert_eq!(results, vec![Ok(c_port)]);
    assert!(TcpStream::connect(("127.0.0.1", b)).await.is_err());
    assert_eq!(round_trip(c_port, b"abc").await, b"abc");
    assert_eq!(forwarder.activity().keys().collect::<Vec<_>>(), ["vm-c"]);
    assert!(!forwarder.set_active("vm-b", true));
}

#[tokio::test]
async fn the_process_holds_its_data_dir_alone_and_answers_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_owned();
    let running = tokio::spawn({
        let data_dir = data_dir.clone();
        async move { crate::run(&data_dir, "http://127.0.0.1:1").await }
    });
    let paths = crate::ForwarderPaths::new(&data_dir);
    let control = loop {
        if let Ok(control) = Control::connect(&paths.socket()).await {
            break control;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let Reply::Pong { pid, vms } = control.call(&Request::Ping).await.unwrap() else {
        panic!("not a pong");
    };
    assert_eq!((pid, vms), (std::process::id(), 0));
    assert!(matches!(
        crate::run(&data_dir, "http://127.0.0.1:1").await,
        Err(ForwardError::AlreadyRunning(_))
    ));

    let target = echo_server().await;
    let started = Instant::now();
    let mut rounds = Vec::new();
    for active in [true, false].into_iter().cycle().take(200) {
        let request = Request::SetActive {
            vm: "vm-a".into(),
            active,
        };
        let t = Instant::now();
        control.call(&request).await.unwrap();
        rounds.push(t.elapsed());
    }
    rounds.sort();
    eprintln!(
        "control round trip: p50 {:?}, max {:?} ({:?} for 200)",
        rounds[100],
        rounds[199],
        started.elapsed()
    );
    let Reply::Port { port } = control
        .call(&Request::Open(spec("vm-a", target, true)))
        .await
        .unwrap()
    else {
        panic!("no port");
    };
    assert_eq!(
        round_trip(port, b"through the process").await,
        b"through the process"
    );
    let err = control
        .call(&Request::Open(EndpointSpec {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            name: "other".into(),
            ..spec("vm-b", target, true)
        }))
        .await;
    assert!(matches!(err, Err(ForwardError::Refused(_))), "{err:?}");

    control.call(&Request::Shutdown).await.unwrap();
    running.await.unwrap().unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    assert!(!paths.pidfile().exists() && !paths.socket().exists());
}

/// Issue 13, finding 6: `quiesce` marks a VM asleep only when no connection to it is
/// open; a connection in flight is left alone and gets its whole answer.
#[tokio::test]
async fn quiesce_leaves_a_vm_with_an_open_connection_awake() {
    let target = echo_server().await;
    let forwarder = Forwarder::new("http://127.0.0.1:1");
    let port = forwarder.open(&spec("vm-a", target, true)).await.unwrap();
    assert_eq!(forwarder.quiesce("vm-unknown"), (true, 0));

    let mut open = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    assert_eq!(forwarder.quiesce("vm-a"), (false, 1), "in use");
    // Still active: bytes keep flowing, and a second connection goes straight through.
    open.write_all(b"y").await.unwrap();
    open.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");
    assert_eq!(round_trip(port, b"second").await, b"second");
    assert_eq!(forwarder.activity()["vm-a"].open, 1);
    assert!(forwarder.activity()["vm-a"].last_byte_ms > 0);
    drop(open);

    // Closed: quiesced, and a new connection now waits for a wake (the server at
    // 127.0.0.1:1 never answers it, so the client gets nothing back).
    let deadline = Instant::now() + Duration::from_secs(5);
    while forwarder.activity()["vm-a"].open > 0 {
        assert!(Instant::now() < deadline, "the connection stays counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(forwarder.quiesce("vm-a"), (true, 0));
    let mut waiting = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    waiting.write_all(b"z").await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut one)).await;
    assert!(read.is_err(), "not forwarded while asleep: {read:?}");
    assert_eq!(
        forwarder.quiesce("vm-a"),
        (false, 1),
        "a connection waiting for a wake is in use too"
    );
}

/// Issue 13, finding 7: on an `on-data` port a bare connect to a sleeping VM wakes
/// nothing (closed at once, or silent until the first-bytes wait ends); a client that
/// sends bytes wakes it. On an `on-connect` port, connecting is enough.
#[tokio::test]
async fn a_sleeping_vm_wakes_on_data_not_on_a_bare_connect_unless_its_port_says_so() {
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = reserved.local_addr().unwrap();
    drop(reserved);
    let api = TcpListener::bind(LOOPBACK).await.unwrap();
    let api_addr = api.local_addr().unwrap();
    let wakes = Arc::new(AtomicUsize::new(0));
    let target_listener = Arc::new(std::sync::Mutex::new(Some(
        TcpListener::bind(target).await.unwrap(),
    )));
    tokio::spawn(wake_api(api, target_listener, wakes.clone()));
    let forwarder = Forwarder::new(&format!("http://{api_addr}"))
        .with_first_bytes_wait(Duration::from_millis(300));
    let port = forwarder
        .open(&spec("vm-sleepy", target, false))
        .await
        .unwrap();

    // Connect and close at once: a port scan.
    for _ in 0..5 {
        drop(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // Connect and say nothing: closed after the wait, without a wake.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut rest = Vec::new();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
        .await
        .expect("closed by the forwarder")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(rest.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(wakes.load(Ordering::SeqCst), 0, "nothing woke the VM");
    let activity = forwarder.activity()["vm-sleepy"];
    assert_eq!((activity.open, activity.last_active_ms), (0, 0), "no use");

    // A client that speaks: woken, answered.
    assert_eq!(round_trip(port, b"hello").await, b"hello");
    assert_eq!(wakes.load(Ordering::SeqCst), 1);

    // On-connect: a bare connect to the sleeping VM is enough.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = reserved.local_addr().unwrap();
    drop(reserved);
    let api = TcpListener::bind(LOOPBACK).await.unwrap();
    let api_addr = api.local_addr().unwrap();
    let wakes = Arc::new(AtomicUsize::new(0));
    let target_listener = Arc::new(std::sync::Mutex::new(Some(
        TcpListener::bind(other).await.unwrap(),
    )));
    tokio::spawn(wake_api(api, target_listener, wakes.clone()));
    let greeting = Forwarder::new(&format!("http://{api_addr}"));
    let port = greeting
        .open(&EndpointSpec {
            wake: WakeOn::OnConnect,
            ..spec("vm-sleepy", other, false)
        })
        .await
        .unwrap();
    let connected = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while wakes.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no wake on connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(connected);
}

/// A live migration's switchover: while a VM is held, a new connection waits (it reaches
/// neither the old target nor a wake), connections already forwarded go on and are
/// counted; re-pointed and active again, the held connection reaches the new target.
#[tokio::test]
async fn held_connections_wait_and_go_to_the_new_target() {
    let old = echo_server().await;
    let new = echo_server().await;
    // The server URL answers nothing: a wake request would fail the connection.
    let forwarder = Forwarder::new("http://127.0.0.1:1");
    let port = forwarder.open(&spec("vm-m", old, true)).await.unwrap();

    let mut forwarded = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    forwarded.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    forwarded.read_exact(&mut byte).await.unwrap();
    assert_eq!(
        forwarder.handle(Request::Hold { vm: "vm-m".into() }).await,
        Reply::Held {
            known: true,
            open: 1
        }
    );
    assert_eq!(forwarder.hold("vm-unknown"), (false, 0));

    let held = tokio::spawn(async move { round_trip(port, b"after the move").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "a held connection must wait");
    // The connection forwarded before the hold still works, and then closes.
    forwarded.write_all(b"y").await.unwrap();
    forwarded.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"y");
    drop(forwarded);
    let deadline = Instant::now() + Duration::from_secs(5);
    while forwarder.activity()["vm-m"].open != 0 {
        assert!(
            Instant::now() < deadline,
            "the closed connection is still counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut moved = spec("vm-m", new, true);
    moved.listen = SocketAddr::new(LOOPBACK.ip(), port);
    assert_eq!(forwarder.open(&moved).await.unwrap(), port);
    let back = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held connection goes on once released")
        .unwrap();
    assert_eq!(back, b"after the move");
}
