//! Browser test support: Debian's headless Chromium driven over WebDriver (`chromedriver`,
//! through the `fantoccini` crate) against a test server's web console.
//!
//! [`Browser::start`] runs `chromedriver` on a free port as a child process in its own
//! process group, with a private Chromium profile; dropping the [`Browser`] (also when the
//! test panics) kills chromedriver, every Chromium process under it and any process still
//! naming the profile. Helpers panic with what the page showed (its `#flash` text, route and
//! a screenshot under `target/web-screenshots/`), so a failed wait says why.
//!
//! A test binary includes it beside `common` (`#[path = "common/browser.rs"] mod browser;`),
//! so the other test binaries do not build it.

#![allow(dead_code)] // each test binary uses a different part

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long a wait lasts unless a test says otherwise.
pub const WAIT: Duration = Duration::from_secs(15);

/// Where screenshots go: `target/web-screenshots/` (artifacts of the run, not committed).
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR lies in the target dir")
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The path of `program` on `PATH`, if it is there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Whether a script's value is truthy as JavaScript has it (for the values WebDriver returns).
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        _ => true,
    }
}

/// chromedriver and the Chromium it starts; killed with everything under it on drop.
struct Driver {
    child: Child,
    /// The Chromium profile: every browser process names it or descends from chromedriver.
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let root = self.child.id();
        let mut doomed = descendants(root);
        doomed.extend(processes_naming(self.profile.path()));
        // SAFETY: kill(2) has no memory-safety preconditions; the group is chromedriver's
        // own (it was started with process_group(0)), so only its processes are signalled.
        unsafe {
            libc::kill(-(root as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in doomed {
            crate::common::kill(pid);
        }
        for pid in processes_naming(self.profile.path()) {
            crate::common::kill(pid);
        }
    }
}

/// Every process whose parent chain leads to `root` (not `root` itself).
fn descendants(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Processes whose command line mentions `path`.
fn processes_naming(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&raw).contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// A headless Chromium session on a test server's web console.
pub struct Browser {
    pub client: Client,
    /// The server's base URL (`http://127.0.0.1:PORT`).
    pub base: String,
    // Declared last: dropped after the client.
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a Chromium session (headless, a 1280×800 viewport) for the server at
    /// `base`. Panics, saying to run the set-up script, when chromium or chromedriver is not
    /// installed: browser tests are never skipped.
    pub async fn start(base: &str) -> Browser {
        let missing: Vec<&str> = ["chromium", "chromedriver"]
            .into_iter()
            .filter(|program| on_path(program).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "{} not found on PATH: the browser tests need Debian's chromium and \
             chromium-driver; run scripts/install-deps.sh",
            missing.join(" and ")
        );
        let chromium = on_path("chromium").unwrap();
        let profile = tempfile::Builder::new()
            .prefix("hangar-chromium")
            .tempdir()
            .unwrap();
        let port = crate::common::free_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut driver = Driver { child, profile };
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Listening is enough: the session request below waits for it to be ready.
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(status) = driver.child.try_wait().unwrap() {
                panic!(
                    "chromedriver exited with {status}: {}",
                    std::fs::read_to_string(driver.profile.path().join("chromedriver.log"))
                        .unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let user_data = driver.profile.path().join("profile");
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,800",
                    "--no-first-run",
                    format!("--user-data-dir={}", user_data.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|err| {
                // `driver` is dropped while this unwinds: chromedriver goes too.
                let log = std::fs::read_to_string(driver.profile.path().join("chromedriver.log"))
                    .unwrap_or_default();
                panic!("no WebDriver session with chromium: {err}\nchromedriver log:\n{log}")
            });
        let browser = Browser {
            client,
            base: base.trim_end_matches('/').to_owned(),
            driver,
        };
        browser.set_viewport(1280, 800).await;
        browser
    }

    /// Sizes the window so that the page's viewport is `width`×`height` CSS pixels (a
    /// headless window still keeps room for a browser's bars).
    pub async fn set_viewport(&self, width: u32, height: u32) {
        let viewport = "return [window.innerWidth, window.innerHeight];";
        let (mut outer_w, mut outer_h) = (width, height);
        for _ in 0..3 {
            self.client
                .set_window_size(outer_w, outer_h)
                .await
                .unwrap_or_else(|err| panic!("window size {outer_w}x{outer_h}: {err}"));
            let inner = self.js(viewport, vec![]).await;
            let (w, h) = (
                inner[0].as_u64().unwrap() as u32,
                inner[1].as_u64().unwrap() as u32,
            );
            if (w, h) == (width, height) {
                return;
            }
            let grow = |outer: u32, want: u32, got: u32| {
                (i64::from(outer) + i64::from(want) - i64::from(got)).max(100) as u32
            };
            outer_w = grow(outer_w, width, w);
            outer_h = grow(outer_h, height, h);
        }
        let inner = self.js(viewport, vec![]).await;
        panic!("cannot make the viewport {width}x{height}: it is {inner}");
    }

    /// Ends the WebDriver session (chromedriver itself goes on drop).
    pub async fn close(self) {
        let Browser { client, driver, .. } = self;
        let _ = client.close().await;
        drop(driver);
    }

    /// Opens the console at `route` (a hash route such as `#/services`): a page load the
    /// first time, a hash change (no reload) when the console is already open.
    pub async fn route(&self, route: &str) {
        let url = self.client.current_url().await.unwrap();
        if url.as_str().starts_with(&self.base) {
            self.js("location.hash = arguments[0];", vec![json!(route)])
                .await;
        } else {
            self.client
                .goto(&format!("{}/{route}", self.base))
                .await
                .unwrap();
        }
    }

    /// Loads `url` as a new page (another origin, or the console afresh).
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|err| panic!("cannot open {url}: {err}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|err| panic!("script failed: {err}\n{script}"))
    }

    /// Runs `script` whose last argument is a callback it calls with its result.
    pub async fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute_async(script, args)
            .await
            .unwrap_or_else(|err| panic!("async script failed: {err}\n{script}"))
    }

    /// The page's `#flash` text ("" when none).
    pub async fn flash(&self) -> String {
        self.js(
            "const f = document.getElementById('flash'); return f ? f.innerText.trim() : '';",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Writes a PNG of the viewport to `target/web-screenshots/NAME.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|err| panic!("screenshot {name}: {err}"));
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Panics with `what`, the page's route, `#flash` text and a screenshot named after `what`.
    pub async fn fail(&self, what: &str) -> ! {
        let url = match self.client.current_url().await {
            Ok(url) => url.to_string(),
            Err(err) => format!("(no URL: {err})"),
        };
        let flash = self.flash().await;
        let page = self
            .js(
                "const p = document.getElementById('page'); \
                 return p ? (p.dataset.page || '') + ': ' + p.innerText.slice(0, 600) : \
                 document.body ? document.body.innerText.slice(0, 600) : '';",
                vec![],
            )
            .await;
        let name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(60)
            .collect();
        let shot = self.screenshot(&format!("failed-{name}")).await;
        panic!(
            "{what}\n  at {url}\n  #flash: {flash:?}\n  page: {page}\n  screenshot: {}",
            shot.display()
        );
    }

    /// Waits up to `timeout` for an element matching the CSS `selector` and returns it.
    pub async fn wait_for_within(
        &self,
        selector: &str,
        timeout: Duration,
    ) -> fantoccini::elements::Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(found) = self.client.find(Locator::Css(selector)).await {
                return found;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("no {selector} after {timeout:?}")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Browser::wait_for_within`] the default [`WAIT`].
    pub async fn wait_for(&self, selector: &str) -> fantoccini::elements::Element {
        self.wait_for_within(selector, WAIT).await
    }

    /// Waits up to `timeout` until `check` (a script body returning a truthy value when
    /// satisfied) holds, and returns its value; fails saying `what` otherwise.
    pub async fn wait_until(&self, what: &str, timeout: Duration, check: &str) -> Value {
        match self.wait_until_or_not(timeout, check).await {
            Some(value) => value,
            None => self.fail(&format!("{what} (not after {timeout:?})")).await,
        }
    }

    /// Like [`Browser::wait_until`], but `None` instead of failing when `check` does not
    /// hold within `timeout`.
    pub async fn wait_until_or_not(&self, timeout: Duration, check: &str) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.js(check, vec![]).await;
            if truthy(&value) {
                return Some(value);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The trimmed visible text of the first element matching `selector` (waiting for it).
    pub async fn text(&self, selector: &str) -> String {
        let element = self.wait_for(selector).await;
        element.text().await.unwrap().trim().to_owned()
    }

    /// Clicks the first element matching `selector`, waiting for it; found again when the
    /// page re-rendered it between finding and clicking (a live list redraws its rows).
    pub async fn click(&self, selector: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let element = self.wait_for(selector).await;
            match element.click().await {
                Ok(()) => return,
                Err(err) if Instant::now() < deadline && err.to_string().contains("stale") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => self.fail(&format!("cannot click {selector}: {err}")).await,
            }
        }
    }

    /// Replaces the value of the input matching `selector` by typing `text`.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let element = self.wait_for(selector).await;
        element.clear().await.unwrap();
        element.send_keys(text).await.unwrap();
    }

    /// Whether an element matches `selector` now.
    pub async fn exists(&self, selector: &str) -> bool {
        self.js(
            "return document.querySelector(arguments[0]) !== null;",
            vec![json!(selector)],
        )
        .await
            == json!(true)
    }

    /// Opens the console and signs in with `token`; waits for `#whoami` and returns its text.
    pub async fn sign_in(&self, token: &str) -> String {
        self.goto(&format!("{}/", self.base)).await;
        self.type_into("#signin-token", token).await;
        self.click("#signin-submit").await;
        self.signed_in().await
    }

    /// Waits until the sign-in form has gone and `#whoami` shows someone; returns its text.
    pub async fn signed_in(&self) -> String {
        self.wait_until(
            "signed in: #whoami shows the user",
            WAIT,
            "const w = document.getElementById('whoami'); \
             return w && !document.getElementById('signin-token') && w.innerText.trim();",
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
    }

    /// Signs out with `#signout` and waits for the sign-in form.
    pub async fn sign_out(&self) {
        self.click("#signout").await;
        self.wait_for("#signin-token").await;
    }
}
