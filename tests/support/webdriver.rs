//! A headless Chromium driven through its WebDriver server (Debian's `chromium-driver`) by
//! `fantoccini`, the W3C WebDriver client Selenium's protocol calls for: no browser is
//! downloaded. [`Browser`] keeps the handful of calls the browser tests make (open a page,
//! click, type, run a script, save a screenshot), each panicking with what it was doing.
//!
//! The driver runs on a free port of loopback. When [`ChromeDriver`] drops (a failed test too),
//! it ends its sessions first, so the browsers close, then the driver is killed; a watchdog
//! kills the driver if the test process dies first.

use super::broker::free_port;
use super::{kill_wait, watchdog};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `chromedriver`.
pub struct ChromeDriver {
    child: Option<Child>,
    watchdog: Option<Child>,
    base: String,
    port: u16,
    /// Sessions opened, ended at drop (a killed driver would leave its browser running).
    sessions: std::sync::Mutex<Vec<String>>,
}

impl ChromeDriver {
    /// Starts `chromedriver` at `path` and waits until it is ready.
    pub async fn start(path: &Path) -> ChromeDriver {
        let port = free_port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let watchdog = watchdog(child.id());
        let driver = ChromeDriver {
            child: Some(child),
            watchdog,
            base: format!("http://127.0.0.1:{port}"),
            port,
            sessions: std::sync::Mutex::default(),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/status", driver.base)).send().await {
                let status: Value = r.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }

    /// A new headless browser session. `WEIR_TEST_CHROMIUM` names the browser binary if the
    /// driver would not find it on its own.
    pub async fn session(&self) -> Browser {
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000"]
        });
        if let Some(binary) = std::env::var_os("WEIR_TEST_CHROMIUM") {
            options["binary"] = json!(binary.to_string_lossy());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        capabilities.insert("unhandledPromptBehavior".into(), json!("accept"));
        // Loopback over plain HTTP: no TLS connector needed.
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.base)
            .await
            .unwrap_or_else(|e| panic!("no browser session: {e}"));
        if let Ok(Some(id)) = client.session_id().await {
            self.sessions.lock().unwrap().push(id);
        }
        Browser { client }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // A plain blocking request: drop may run on a runtime thread, or while panicking, when
        // the clients' own clean-up (on the runtime) may never run.
        for id in self.sessions.lock().map(|s| s.clone()).unwrap_or_default() {
            use std::io::{Read as _, Write as _};
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
            if let Ok(mut stream) =
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
            {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    stream,
                    "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        kill_wait(self.child.take());
        kill_wait(self.watchdog.take());
    }
}

/// One browser session.
pub struct Browser {
    client: Client,
}

impl Browser {
    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("WebDriver goto {url}: {e}"));
    }

    /// The page's URL.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_else(|e| panic!("WebDriver url: {e}"))
    }

    /// The page's title.
    pub async fn title(&self) -> String {
        self.client
            .title()
            .await
            .unwrap_or_else(|e| panic!("WebDriver title: {e}"))
    }

    /// Runs `script` (a function body; `arguments` holds `args`, a JSON array) and returns its
    /// result.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        let args = match args {
            Value::Array(args) => args,
            other => vec![other],
        };
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("WebDriver execute: {e}"))
    }

    /// The visible text of the page's body.
    pub async fn text(&self) -> String {
        self.execute("return document.body.innerText;", json!([]))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Clicks the first element matching `css` (as a person would: it must be visible).
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("WebDriver click {css}: {e}"));
    }

    /// Waits until an element matches `css` (a click's navigation may still be loading when
    /// the click returns); panics naming it after `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) {
        let found = self
            .client
            .wait()
            .at_most(timeout)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(css))
            .await;
        if let Err(e) = found {
            panic!("no {css} within {timeout:?} at {}: {e}", self.url().await);
        }
    }

    /// Types `text` into the first element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("WebDriver type into {css}: {e}"));
    }

    /// Saves a PNG of the viewport at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("WebDriver screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Ends the session (closes the browser).
    pub async fn quit(self) {
        let _ = self.client.close().await;
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }
}
