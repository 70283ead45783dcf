//! The `weir` binary as a child process: spawn it with a clean environment and its output in
//! files, signal it, wait for it with deadlines, and read the reference service's record file.
//!
//! Every child is killed (SIGKILL) and reaped when its [`WeirProcess`] is dropped, and a small
//! `sh` watchdog kills it if the test process dies without dropping it (same trick as the
//! broker's: the watchdog blocks reading a pipe only this process holds).
//!
//! Nothing here sleeps as a correctness assumption: [`wait_until`] polls a condition until a
//! deadline and fails naming what it waited for and what it last saw.

use super::{kill_wait, watchdog};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(50);

/// The `weir` binary under test.
pub fn weir_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

/// A temp dir for one test's record files and process logs. Removed on drop, unless the test
/// is panicking or `WEIR_TEST_KEEP_DIRS` is set: then it is kept and its path printed.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh dir under the system temp dir.
    pub fn new(prefix: &str) -> TestDir {
        let path = std::env::temp_dir().join(super::broker::unique(prefix));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the dir.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("WEIR_TEST_KEEP_DIRS").is_some() {
            eprintln!("test dir kept: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// How to start `weir serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// `WEIR_BROKERS`.
    pub brokers: String,
    /// `WEIR_GROUP_ID`.
    pub group: String,
    /// `WEIR_SERVICE__RECORD_FILE`.
    pub record_file: PathBuf,
    /// Further `WEIR_*` (or other) variables, e.g. `("WEIR_CONSUMER__MAX_IN_FLIGHT", "256")`.
    pub env: Vec<(String, String)>,
    /// A TOML configuration, written next to the logs and passed with `--config` (for keys
    /// environment variables cannot spell, such as librdkafka properties with dots).
    pub config_toml: Option<String>,
}

impl ServeOptions {
    /// Brokers, group and record file; 2 s drain and revoke timeouts (they fit inside
    /// [`FAST_GROUP_TOML`]'s session timeout); the admin server on an ephemeral port of
    /// 127.0.0.1 (see [`WeirProcess::admin_addr`]); the reference service's test hooks on
    /// (`details.simulate`; off by default in the service, so a test of the default drops
    /// them with [`without`](Self::without)).
    pub fn new(brokers: &str, group: &str, record_file: &Path) -> ServeOptions {
        ServeOptions {
            brokers: brokers.to_owned(),
            group: group.to_owned(),
            record_file: record_file.to_owned(),
            env: vec![
                ("WEIR_CONSUMER__DRAIN_TIMEOUT".into(), "2s".into()),
                ("WEIR_CONSUMER__REVOKE_TIMEOUT".into(), "2s".into()),
                // An ephemeral port: tests run several services at once.
                ("WEIR_ADMIN_ADDR".into(), "127.0.0.1:0".into()),
                ("WEIR_SERVICE__TEST_HOOKS".into(), "true".into()),
            ],
            config_toml: None,
        }
    }

    /// Adds (or replaces) an environment variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> ServeOptions {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Removes an environment variable (one of [`new`](Self::new)'s defaults, to run with the
    /// service's own default instead).
    pub fn without(mut self, key: &str) -> ServeOptions {
        self.env.retain(|(k, _)| k != key);
        self
    }

    /// Sets the TOML configuration file's contents.
    pub fn config(mut self, toml: &str) -> ServeOptions {
        self.config_toml = Some(toml.to_owned());
        self
    }
}

/// A running (or exited) `weir` child process. Killed and reaped on drop.
pub struct WeirProcess {
    name: String,
    child: Option<Child>,
    watchdog: Option<Child>,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl WeirProcess {
    /// Spawns `weir <args>` with only `env` from the `WEIR_*` namespace (inherited `WEIR_*`,
    /// `OTEL_*` and `RUST_LOG` variables are removed, so the test runner's own settings cannot
    /// leak into the service's configuration). Output goes to `<dir>/<name>.stdout` and `.stderr`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str], env: &[(String, String)]) -> WeirProcess {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let out = File::create(&stdout)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stdout.display()));
        let err = File::create(&stderr)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr.display()));
        let mut command = Command::new(weir_bin());
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            let inherited = key.to_string_lossy();
            if inherited.starts_with("WEIR_")
                || inherited.starts_with("OTEL_")
                || inherited == "RUST_LOG"
            {
                command.env_remove(&key);
            }
        }
        // anyhow would print a stack trace under every error with RUST_BACKTRACE=1.
        command.env("RUST_LIB_BACKTRACE", "0");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {} {args:?}: {e}", weir_bin()));
        let watchdog = watchdog(child.id());
        WeirProcess {
            name: name.to_owned(),
            child: Some(child),
            watchdog,
            status: None,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }

    /// Starts `weir serve` as `name` (its logs are `<dir>/<name>.stderr`).
    pub fn serve(dir: &Path, name: &str, options: &ServeOptions) -> WeirProcess {
        WeirProcess::command(dir, name, "serve", options)
    }

    /// Starts `weir <command>` (`serve`, `retry-worker`, ...) as `name` with the settings of
    /// `options`, as [`serve`](Self::serve) does.
    pub fn command(dir: &Path, name: &str, command: &str, options: &ServeOptions) -> WeirProcess {
        let mut env = vec![
            ("WEIR_BROKERS".to_owned(), options.brokers.clone()),
            ("WEIR_GROUP_ID".to_owned(), options.group.clone()),
            (
                "WEIR_SERVICE__RECORD_FILE".to_owned(),
                options.record_file.display().to_string(),
            ),
        ];
        env.extend(options.env.iter().cloned());
        match &options.config_toml {
            Some(toml) => {
                let path = dir.join(format!("{name}.toml"));
                fs::write(&path, toml)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                let path = path.display().to_string();
                WeirProcess::spawn(dir, name, &["--config", &path, command], &env)
            }
            None => WeirProcess::spawn(dir, name, &[command], &env),
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the child is held until drop")
    }

    /// Time since spawn.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sends a signal with the `kill` command (`TERM`, `KILL`, `INT`, ...). The process must
    /// not have been reaped yet (its pid could be recycled otherwise).
    pub fn signal(&mut self, signal: &str) {
        assert!(
            self.try_status().is_none(),
            "{} already exited ({:?}); not sending SIG{signal}",
            self.name,
            self.status
        );
        let status = Command::new("kill")
            .args(["-s", signal])
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// SIGTERM: the graceful stop.
    pub fn sigterm(&mut self) {
        self.signal("TERM");
    }

    /// SIGKILL: a crash.
    pub fn sigkill(&mut self) {
        self.signal("KILL");
    }

    /// The exit status, if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("try_wait on a child");
            }
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL and wait for the exit (a few seconds at most).
    pub async fn kill_and_wait(&mut self) -> ExitStatus {
        self.sigkill();
        self.wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{} did not exit within 10 s of SIGKILL", self.name))
    }

    /// Fails at once (with its log) if the process exited, instead of waiting out a deadline.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "{} exited unexpectedly ({status})\n{}",
                self.name(),
                self.stderr_tail(8 * 1024)
            );
        }
    }

    /// Everything the process wrote to stderr so far (its JSON log lines, for `serve`).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The admin server's address, from the `Serving.` log line (`None` until it is logged).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.serving_field("admin_addr")
    }

    /// The HTTP API's address (with a database configured), from the `Serving.` log line.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.serving_field("http_addr")
    }

    fn serving_field(&self, field: &str) -> Option<std::net::SocketAddr> {
        self.logged_addr("Serving.", field)
    }

    /// An address field of the first log line with `message` (`None` until it is logged), e.g.
    /// `admin_addr` of `weir retry-worker`'s "Retrying parked records.".
    pub fn logged_addr(&self, message: &str, field: &str) -> Option<std::net::SocketAddr> {
        self.stderr().lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["fields"]["message"] != message {
                return None;
            }
            v["fields"][field].as_str()?.parse().ok()
        })
    }

    /// The stderr file's path.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// The last `bytes` of stderr, headed by the process name, for failure messages.
    pub fn stderr_tail(&self, bytes: u64) -> String {
        format!(
            "--- tail of {} stderr ({}) ---\n{}\n--- end ---",
            self.name,
            self.stderr.display(),
            tail(&self.stderr, bytes)
        )
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        // Watchdog first, so it can never fire at a recycled pid.
        kill_wait(self.watchdog.take());
        if let Some(mut child) = self.child.take() {
            if self.status.is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.stderr_tail(4 * 1024));
        }
    }
}

/// The last `bytes` bytes of a file, lossily decoded.
pub fn tail(path: &Path, bytes: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
        let _ = file.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Polls `check` every 50 ms until it returns `Ok`, for at most `timeout`. On timeout, panics
/// naming `what` and the last `Err` (the state seen last).
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`wait_until`] for a check that must await (a query, an HTTP call).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// librdkafka settings for `weir serve` processes in tests (pass to [`ServeOptions::config`]):
/// a short session timeout, so a killed member leaves the group in seconds rather than
/// librdkafka's default 45 s (6 s: `weir serve` refuses a revoke or drain timeout that, with
/// the time `cpu_bound` calls get to return, does not fit inside it; [`ServeOptions::new`]'s
/// 2 s each do); and a shorter rebalance timeout (`max.poll.interval.ms`, sent in
/// JoinGroup), so a rebalance waiting for a member that will not rejoin gives up in 20 s rather
/// than 5 minutes (it must stay above the poll thread's 10 s stall valve). (Once in ~12 full
/// runs Tansu 0.6 kept the survivor of a rebalance revoked and unassigned for over 2 minutes
/// after the other member left during it.)
pub const FAST_GROUP_TOML: &str = r#"
[kafka.consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"max.poll.interval.ms" = "20000"
"#;

/// One line of the reference service's record file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Handled {
    /// The CloudEvent id.
    pub event_id: String,
    /// The CloudEvent type.
    pub event_type: String,
    /// The handler's name.
    pub handler: String,
    /// Where the record came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Which attempt this was (1 = first).
    pub attempt: u32,
}

/// Reads a record file incrementally: each [`refresh`](Self::refresh) parses only what was
/// appended since the last one. A trailing line without its newline yet is kept for later.
/// Several processes may append to one file (one `write` per line, `O_APPEND`).
pub struct RecordFile {
    path: PathBuf,
    read: u64,
    partial: Vec<u8>,
    lines: Vec<Handled>,
    /// Lines that did not parse (should stay empty).
    pub garbled: Vec<String>,
}

impl RecordFile {
    /// A reader for `path` (which need not exist yet).
    pub fn new(path: &Path) -> RecordFile {
        RecordFile {
            path: path.to_owned(),
            read: 0,
            partial: Vec::new(),
            lines: Vec::new(),
            garbled: Vec::new(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended; returns all lines so far.
    pub fn refresh(&mut self) -> &[Handled] {
        if let Ok(mut file) = File::open(&self.path) {
            if file.seek(SeekFrom::Start(self.read)).is_ok() {
                let mut bytes = Vec::new();
                if let Ok(n) = file.read_to_end(&mut bytes) {
                    self.read += n as u64;
                    self.partial.extend_from_slice(&bytes);
                }
            }
        }
        if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=end).collect();
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Handled>(line) {
                    Ok(handled) => self.lines.push(handled),
                    Err(_) => self
                        .garbled
                        .push(String::from_utf8_lossy(line).into_owned()),
                }
            }
        }
        &self.lines
    }

    /// Lines read so far (without refreshing).
    pub fn lines(&self) -> &[Handled] {
        &self.lines
    }

    /// Refreshes; the number of lines.
    pub fn count(&mut self) -> usize {
        self.refresh().len()
    }

    /// Refreshes; how many times each event id was handled.
    pub fn counts(&mut self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for line in self.refresh() {
            *counts.entry(line.event_id.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Refreshes; the set of handled event ids.
    pub fn ids(&mut self) -> HashSet<String> {
        self.refresh().iter().map(|l| l.event_id.clone()).collect()
    }
}
/// A plain HTTP/1.0 GET: the status code and the body. For the admin server's endpoints.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The sum of a Prometheus counter's samples whose labels contain every `labels` pair
/// (`name{a="x",...} 12`), from a `/metrics` body.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}
