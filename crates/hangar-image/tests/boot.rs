//! Boots a real guest: assets from Debian's cloud kernel (fetched with `apt-get download`
//! unless `HANGAR_TEST_CACHE` names a cache that already has it), a busybox base image
//! serving `/www/index.html`, QEMU `microvm` under TCG, and the whole agent protocol:
//! hello, configure, readiness, HTTP through the port forward, exec, reidentify.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hangar_image::{AssetSources, ImageFile, ensure_busybox_image, ensure_guest_assets};
use hangar_proto::{
    GuestConfig, GuestMessage, HostMessage, Identity, NetworkConfig, PROTOCOL_VERSION, RootConfig,
    ServiceCommand,
};

const PAGE: &str = "<h1>hello from a hangar guest</h1>\n";

/// Kills QEMU when dropped (also when the test panics) and then shows the guest console.
struct Qemu {
    child: Child,
    console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.console).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- guest console (last lines) ---\n{tail}\n---");
        }
    }
}

/// The agent channel, host side.
struct Agent {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Agent {
    fn connect(socket: &Path, deadline: Instant) -> Agent {
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Agent {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            next_id: 1,
        }
    }

    fn send(&mut self, message: &HostMessage) {
        self.writer
            .write_all(hangar_proto::encode(message).as_bytes())
            .unwrap();
    }

    /// Next guest message, or None at the deadline. `Failed` fails the test.
    fn recv(&mut self, deadline: Instant) -> Option<GuestMessage> {
        let mut line = String::new();
        loop {
            if Instant::now() > deadline {
                return None;
            }
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("agent socket closed"),
                Ok(_) if line.ends_with('\n') => {
                    let message: GuestMessage = hangar_proto::decode(&line)
                        .unwrap_or_else(|e| panic!("bad guest line {line:?}: {e}"));
                    if !matches!(message, GuestMessage::Hello { .. }) {
                        eprintln!("guest: {message:?}");
                    }
                    if let GuestMessage::Failed { stage, error } = &message {
                        panic!("guest failed at {stage}: {error}");
                    }
                    return Some(message);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("agent read: {e}"),
            }
        }
    }

    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&GuestMessage) -> bool,
    ) -> GuestMessage {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline) {
                Some(message) if pred(&message) => return message,
                Some(_) => {}
                None => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// Sends a request built from a fresh id and returns its reply.
    fn request(&mut self, build: impl FnOnce(u64) -> HostMessage) -> GuestMessage {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&build(id));
        self.wait_for(
            &format!("reply {id}"),
            Duration::from_secs(30),
            |m| matches!(m, GuestMessage::Reply { id: r, .. } if *r == id),
        )
    }

    fn exec(&mut self, argv: &[&str]) -> (bool, Option<i32>, String) {
        let argv = argv.iter().map(|s| s.to_string()).collect();
        match self.request(|id| HostMessage::Exec {
            id,
            argv,
            timeout_ms: 10_000,
        }) {
            GuestMessage::Reply {
                ok, code, stdout, ..
            } => (ok, code, stdout),
            other => unreachable!("{other:?}"),
        }
    }
}

fn identity(hostname: &str) -> Identity {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut seed = now.as_nanos() ^ u128::from(std::process::id());
    let entropy_hex = (0..32)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{:02x}", (seed >> 64) as u8)
        })
        .collect();
    Identity {
        hostname: hostname.into(),
        unix_time_ms: now.as_millis() as u64,
        entropy_hex,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(response) if !response.is_empty() => return response,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("GET http://127.0.0.1:{port}/ failed: {other:?}"),
        }
    }
}

#[test]
fn boots_a_busybox_guest_and_serves_http() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("cache"));
    let sources = AssetSources::default();

    let started = Instant::now();
    let assets = ensure_guest_assets(&cache, &sources).expect("guest assets");
    eprintln!(
        "guest assets ({}) in {:?}: {assets:?}",
        assets.kernel_release,
        started.elapsed()
    );
    let again = Instant::now();
    assert_eq!(
        ensure_guest_assets(&cache, &sources).unwrap(),
        assets,
        "same inputs, same entry"
    );
    eprintln!("cached guest assets in {:?}", again.elapsed());

    let mut files = BTreeMap::new();
    files.insert(
        "/www/index.html".to_string(),
        ImageFile {
            contents: PAGE.as_bytes().to_vec(),
            mode: 0o644,
        },
    );
    let image = ensure_busybox_image(&cache, &sources, &files).expect("busybox image");
    assert_eq!(
        ensure_busybox_image(&cache, &sources, &files).unwrap(),
        image
    );
    eprintln!("base image: {image:?}");

    let overlay = tmp.path().join("overlay.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image.path)
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img create overlay");

    let console = tmp.path().join("console.log");
    let socket = tmp.path().join("agent.sock");
    let port = free_port();
    let cmdline = hangar_image::kernel_cmdline(hangar_image::host_tsc_khz());
    eprintln!("kernel command line: {cmdline}");
    let launched = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on,isa-serial=on,rtc=on",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .arg("-kernel")
        .arg(&assets.vmlinux)
        .arg("-initrd")
        .arg(&assets.initramfs)
        .arg("-append")
        .arg(&cmdline)
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none",
            overlay.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-netdev")
        .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"))
        .args(["-device", "virtio-net-device,netdev=n0"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            socket.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.hangar.agent",
        ])
        .args([
            "-device",
            "virtio-rng-device",
            "-device",
            "virtio-balloon-device",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    let _qemu = Qemu {
        child,
        console: console.clone(),
    };

    let mut agent = Agent::connect(&socket, Instant::now() + Duration::from_secs(10));
    let hello = agent.wait_for("hello", Duration::from_secs(60), |m| {
        matches!(m, GuestMessage::Hello { .. })
    });
    let to_hello = launched.elapsed();
    match &hello {
        GuestMessage::Hello {
            protocol,
            kernel,
            uptime_ms,
        } => {
            assert_eq!(*protocol, PROTOCOL_VERSION);
            assert_eq!(kernel, &assets.kernel_release);
            eprintln!("hello: kernel {kernel}, guest uptime {uptime_ms} ms");
        }
        _ => unreachable!(),
    }

    agent.send(&HostMessage::Configure(Box::new(GuestConfig {
        identity: identity("web-1"),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "10.0.2.15/24".into(),
            gateway: Some("10.0.2.2".into()),
            dns: vec!["10.0.2.3".into()],
        }),
        root: Some(RootConfig {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            layers: Vec::new(),
        }),
        files: vec![],
        services: vec![ServiceCommand {
            name: "web".into(),
            argv: ["httpd", "-f", "-p", "80", "-h", "/www"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            env: BTreeMap::new(),
            workdir: None,
        }],
    })));
    let mut started_services = Vec::new();
    agent.wait_for("configured", Duration::from_secs(60), |m| {
        if let GuestMessage::ServiceStarted { name, .. } = m {
            started_services.push(name.clone());
        }
        matches!(m, GuestMessage::Configured { .. })
    });
    let to_configured = launched.elapsed();
    assert_eq!(started_services, ["web"]);
    eprintln!("TIMING launch->hello {to_hello:?}, launch->configured {to_configured:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match agent.request(|id| HostMessage::CheckListen { id, port: 80 }) {
            GuestMessage::Reply { ok: true, .. } => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("nothing listens on port 80: {other:?}"),
        }
    }
    eprintln!("TIMING launch->listening {:?}", launched.elapsed());
    match agent.request(|id| HostMessage::CheckListen { id, port: 81 }) {
        GuestMessage::Reply { ok, .. } => assert!(!ok, "nothing should listen on 81"),
        other => panic!("{other:?}"),
    }

    let response = http_get(port);
    assert!(
        response.starts_with("HTTP/1.") && response.contains(" 200 "),
        "{response}"
    );
    assert!(response.ends_with(PAGE), "{response}");

    assert_eq!(
        agent.exec(&["hostname"]),
        (true, Some(0), "web-1\n".to_string())
    );
    let (ok, _, boot_id) = agent.exec(&["cat", "/proc/sys/kernel/random/boot_id"]);
    assert!(ok && boot_id.trim().len() == 36, "boot_id {boot_id:?}");
    assert_eq!(agent.exec(&["sh", "-c", "exit 7"]).1, Some(7));

    match agent.request(|id| HostMessage::Ping { id }) {
        GuestMessage::Reply { ok, .. } => assert!(ok),
        other => panic!("{other:?}"),
    }
    match agent.request(|id| HostMessage::Reidentify {
        id,
        identity: identity("web-2"),
    }) {
        GuestMessage::Reply { ok, error, .. } => assert!(ok, "{error:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(agent.exec(&["hostname"]).2, "web-2\n");
    eprintln!("TIMING whole test after launch {:?}", launched.elapsed());
}
